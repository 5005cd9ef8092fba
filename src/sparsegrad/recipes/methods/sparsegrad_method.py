"""SparseGrad: top-k in the HOSVD basis, `fixed` (scattered or block support) or `dynamic` selection (the
library's own layers)."""
from __future__ import annotations

import sparsegrad

from .base import Method, MethodOptions


class SparseGrad(Method):
    name = "sparsegrad"
    needs_bases = True

    def convert(self, model, layers, options: MethodOptions):
        sparsegrad.apply(model, options.bases, density=options.density, n_params=options.n_params,
                         mode=options.mode, structure=options.structure, targets=sorted(layers))
        return {}

    def train_mlp(self, module):
        module.trainable.requires_grad_(True)
        return module.k
