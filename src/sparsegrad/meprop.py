"""MePropLinear: the MeProp baseline (Sun et al., 2017) that the paper compares SparseGrad with.

The weight itself trains, and its gradient keeps the top-k entries of dL/dW in the original
space: the same budget of k entries per step as SparseGrad's `dynamic` mode, without the basis.
"""
from __future__ import annotations

import torch

from .sparse_linear import SparseLinear, topk_entries


class MePropLinear(SparseLinear):
    """nn.Linear whose weight gradient keeps its k largest-magnitude entries: a sparse COO gradient of k
    entries, which a lazy optimizer (sparsegrad.optimizer) updates without reading the device back."""

    mode = "meprop"
    trains_weight = True

    @property
    def trainable(self):
        return self.weight

    def _trainable_grad(self, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        g = (dy.t() @ x).to(self.weight.dtype)  # (d_out, t) @ (t, d_in): dL/dW
        return topk_entries(g, self.k) if self.topk_in_backward else g
