"""SharedBases: the bases U and V of one role, held once for all of its layers.

Every block's up_proj (say) trains in the same U (d_in, d_in) and V (d_out, d_out). The layers of a role
hold one SharedBases module as their child `bases` (as peft's VeRA holds its shared projections in one
BufferDict): `model.to(...)`, `.double()`, `.cuda()` reach it from every layer, convert it the first time
and find it converted the next, so the layers keep sharing two tensors -- a copy per layer would cost
n_blocks times the bases' memory. The bases stay at least float32 (those of bfloat16 weights too), and
are not saved in state dicts (checkpoints stay small; load them into a model converted with the same bases).
"""
from __future__ import annotations

import torch
from torch import nn

from .sparse_linear import keep_precision


class SharedBases(nn.Module):
    """U (d_in, d_in) and V (d_out, d_out), orthogonal, rows are basis vectors; row-major (the sparse
    kernels would copy anything else on every call). `.to` keeps the given tensors when they fit."""

    def __init__(self, U: torch.Tensor, V: torch.Tensor, *, device=None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, basis in (("U", U), ("V", V)):
            if basis.ndim != 2 or basis.shape[0] != basis.shape[1]:
                raise ValueError(f"basis {name} has shape {tuple(basis.shape)}: a basis is square (d, d)")
            self.register_buffer(name, basis.to(device=device, dtype=dtype or basis.dtype).contiguous(),
                                 persistent=False)

    def _apply(self, fn, recurse=True):
        for name, basis in self._buffers.items():
            self._buffers[name] = keep_precision(fn, basis)
        return self

    def extra_repr(self) -> str:
        return f"U={tuple(self.U.shape)}, V={tuple(self.V.shape)}, dtype={self.U.dtype}"


class BasesPerRole:
    """One SharedBases per pair of source tensors (a role's, as Bases.for_layer gives them), device and
    dtype: what the layers of a model being converted are given."""

    def __init__(self) -> None:
        self._held: dict[tuple, SharedBases] = {}

    def get(self, U: torch.Tensor, V: torch.Tensor, device, dtype: torch.dtype) -> SharedBases:
        key = (id(U), id(V), torch.device(device), dtype)
        if key not in self._held:
            self._held[key] = SharedBases(U, V, device=device, dtype=dtype)
        return self._held[key]
