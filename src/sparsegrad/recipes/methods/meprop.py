"""MeProp: the top-k entries of each weight gradient in the original space (sparsegrad.MePropLinear)."""
from __future__ import annotations

import sparsegrad

from .base import Method, MethodOptions


class MeProp(Method):
    name = "meprop"

    def convert(self, model, layers, options: MethodOptions):
        sparsegrad.apply(model, None, density=options.density, n_params=options.n_params, mode="meprop",
                         targets=sorted(layers))
        return {}

    def train_mlp(self, module):
        module.trainable.requires_grad_(True)
        return module.k
