"""MePropLinear: the MeProp baseline (Sun et al., 2017) that the paper compares SparseGrad with.

The weight itself trains, and its gradient keeps the top-k entries of dL/dW in the original
space: the same budget of k entries per step as SparseGrad's `dynamic` mode, without the basis.
"""
from __future__ import annotations

import weakref

import torch

from . import folding
from .sparse_linear import SparseLinear, topk_entries


class MePropLinear(SparseLinear):
    """nn.Linear whose weight gradient keeps its k largest-magnitude entries: a sparse COO gradient of k
    entries, which a lazy optimizer (sparsegrad.optimizer) updates without reading the device back."""

    mode = "meprop"
    trains_weight = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._cut = None  # a weak reference to the gradient sparsify_grad last cut
        folding.register(self)  # a gradient left whole is cut at the optimizer step (folding.py)

    def __setstate__(self, state):  # copy.deepcopy and pickle build the layer without __init__
        super().__setstate__(state)
        folding.register(self)

    def __getstate__(self):
        return {**super().__getstate__(), "_cut": None}

    @property
    def trainable(self):
        return self.weight

    def gradient_left_whole(self) -> bool:
        """Is the weight's gradient a deferred one that no one cut to its top-k (see folding._before_step)?
        (A cut gradient is a new sparse tensor, or, sharded, the same tensor cut in place: it is remembered.)"""
        grad = self.weight.grad
        return (grad is not None and not self.topk_in_backward and not grad.is_sparse
                and (self._cut is None or self._cut() is not grad))

    @torch.no_grad()
    def sparsify_grad(self) -> None:
        super().sparsify_grad()
        grad = self.weight.grad
        self._cut = None if grad is None else weakref.ref(grad)

    def _trainable_grad(self, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        g = (dy.t() @ x).to(self.weight.dtype)  # (d_out, t) @ (t, d_in): dL/dW
        return topk_entries(g, self.k) if self.topk_in_backward else g
