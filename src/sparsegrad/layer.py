"""SparseGradLinear: a linear layer whose weight trains in the HOSVD basis.

Notation (DESIGN.md §1, PyTorch convention): weight W is (d_out, d_in) and
y = x W^T + b. In paper orientation the weight gradient is G = x^T dy, shape
(d_in, d_out). The bases are U (d_in, d_in) and V (d_out, d_out), orthogonal,
rows are basis vectors. The trained change lives in the transformed space:

    W_eff^T = W_0^T + U^T S V,        dL/dS = U G V^T        (both (d_in, d_out))

The layer keeps W_eff merged in `weight` (frozen), so its forward pass is a
plain ``F.linear`` and its input gradient is ``dy @ W_eff`` -- exactly those of
``nn.Linear`` with the same effective weight. Whenever the trained values
change (an optimizer step, a loaded checkpoint), the next forward folds the
difference into `weight`.

Modes:
    fixed    S is non-zero on a support of k entries chosen once from the
             preliminary phase's energy; the k values are a dense trainable
             vector (``values``), optimizer state O(k). Their gradient is
             computed exactly from the dense G: rotate the smaller side of the
             support, then a sampled product (DESIGN §3).
    dynamic  the paper: S is a dense (d_in, d_out) parameter (``delta``) whose
             gradient keeps, at every backward, the exact top-k entries of
             |U G V^T| (zeros elsewhere); all-zero rows of dy are skipped
             (sparse-by-dense multiplication, Sec. 3.3).
    meprop   the MeProp baseline: ``weight`` itself trains with the top-k
             entries of its gradient in the original space.
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.profiler import record_function

from .targets import _is_conv1d, linear_weight

MODES = ("fixed", "dynamic", "meprop")
_TRAINABLE_NAME = {"fixed": "values", "dynamic": "delta", "meprop": "weight"}

# Rows of dy are gathered (the zero rows skipped) when at most this share is non-zero.
_ROW_SKIP_BELOW = 0.9

# id(source basis) -> (weakref to it, fn, converted basis) of the latest Module._apply
# (model.to(...), .double(), ...): a basis shared by many layers is converted once, so
# that the layers keep sharing it.
_CONVERTED_BASES: dict[int, tuple] = {}


def _convert_shared(basis: torch.Tensor, fn) -> torch.Tensor:
    entry = _CONVERTED_BASES.get(id(basis))
    if entry is None or entry[0]() is not basis or entry[1] is not fn:
        key = id(basis)
        ref = weakref.ref(basis, lambda _, key=key: _CONVERTED_BASES.pop(key, None))
        entry = _CONVERTED_BASES[key] = (ref, fn, fn(basis))
    return entry[2]


def check_k(k: int, d_in: int, d_out: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= d_in * d_out:
        raise ValueError(
            f"k={k} is out of range for a {d_in}x{d_out} layer: choose 1 <= k <= {d_in * d_out} "
            f"(n_params per layer) or a density in (0, 1]"
        )
    return k


def topk_support(energy: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major sorted (rows, cols) of the k largest entries of `energy` (d_in, d_out)."""
    d_in, d_out = energy.shape
    check_k(k, d_in, d_out)
    flat = torch.topk(energy.reshape(-1).float(), k, sorted=False).indices.sort().values
    return flat // d_out, flat % d_out


@dataclass
class _SupportPlan:
    """A scattered support arranged for rotating its smaller side.

    In plan orientation the matrix is (m, n) = (d_in, d_out), or (d_out, d_in)
    when `transposed`; `a` (m, m) rotates its rows and `b` (n, n) its columns.
    Entries are sorted by (row, col) in plan orientation, as a CSR pattern over
    the r distinct rows; `order` maps them back to the caller's order.
    """

    transposed: bool
    order: torch.Tensor | None  # (k,) plan position -> caller position; None: already in plan order
    uniq_rows: torch.Tensor  # (r,) distinct plan rows
    crow: torch.Tensor  # (r + 1,) int32 CSR row pointer over the distinct rows
    cols: torch.Tensor  # (k,) int32 plan column of each entry (the layer's own buffer when in plan order)
    n: int  # plan columns

    @staticmethod
    def orientation(rows: torch.Tensor, cols: torch.Tensor) -> bool:
        """Rotate the side with fewer distinct indices: transposed when that is the columns."""
        return cols.unique().numel() < rows.unique().numel()

    @staticmethod
    def build(rows: torch.Tensor, cols: torch.Tensor, d_in: int, d_out: int) -> _SupportPlan:
        transposed = _SupportPlan.orientation(rows, cols)
        if transposed:  # rotate the (fewer) columns: work on the transpose
            rows, cols, n = cols, rows, d_in
        else:
            n = d_out
        key = rows.long() * n + cols.long()
        order = None
        if bool((key[1:] <= key[:-1]).any()):  # not in plan order: sort once, remember the permutation
            order = torch.argsort(key)
            rows, cols = rows[order], cols[order]
        uniq_rows, counts = torch.unique_consecutive(rows.long(), return_counts=True)
        crow = torch.zeros(uniq_rows.numel() + 1, dtype=torch.int32, device=rows.device)
        crow[1:] = counts.cumsum(0)
        return _SupportPlan(transposed, order, uniq_rows, crow, cols.to(torch.int32), n)

    def sides(self, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A (d_in-side, d_out-side) pair, e.g. (U, V) or (x, dy), in plan orientation."""
        return (second, first) if self.transposed else (first, second)

    def _csr(self, values: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            return torch.sparse_csr_tensor(
                self.crow, self.cols, values, (self.uniq_rows.numel(), self.n), check_invariants=False
            )

    def gather(self, left: torch.Tensor, right: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(a @ left^T right @ b^T) at the support, in caller order.

        left (t, m), right (t, n): the plan matrix is left^T right (G or G^T).
        Forms the dense (m, n) gradient and its (r, n) rotation, or (t, r) rotated activations.
        """
        t, m = left.shape
        r = self.uniq_rows.numel()
        a_r = a[self.uniq_rows]  # (r, m)
        if _rotate_activations(t, r, m, self.n):
            with record_function("sparsegrad.rotated_activations"):
                rot = (left @ a_r.t()).t() @ right  # rotated activations: (r, t) @ (t, n) -> (r, n)
        else:
            with record_function("sparsegrad.dense_weight_grad"):
                g = left.t() @ right  # (m, t) @ (t, n): the dense gradient, as full FT computes it
            with record_function("sparsegrad.rotate_rows"):
                rot = a_r @ g  # (r, m) @ (m, n)
            del g
        with record_function("sparsegrad.sample_support"):
            pattern = self._csr(torch.zeros(self.cols.numel(), dtype=rot.dtype, device=rot.device))
            # sampled (r, n) @ (n, n) at the entries: rot[i] . b[j]  (zeros: beta * 0)
            out = _sampled_addmm(pattern, rot, b.t()).values()
        if self.order is None:
            return out
        result = torch.empty_like(out)
        result[self.order] = out
        return result

    def fold(self, weight: torch.Tensor, values: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """weight (d_out, d_in) += (a^T S b) in weight orientation; S holds `values` (caller order)."""
        values = values if self.order is None else values[self.order]
        p = self._csr(values.to(a.dtype)) @ b  # (r, n) @ (n, n) -> (r, n)
        a_r = a[self.uniq_rows].to(weight.dtype)  # (r, m)
        if self.transposed:  # plan matrix is W itself: W += a_r^T @ p
            weight.addmm_(a_r.t(), p.to(weight.dtype))
        else:  # plan matrix is W^T: W += p^T @ a_r
            weight.addmm_(p.t().to(weight.dtype), a_r)


def _rotate_activations(t: int, r: int, m: int, n: int) -> bool:
    """Is (left a_r^T)^T right cheaper than forming G = left^T right and rotating r of its rows?"""
    return t * r * (m + n) <= t * m * n + r * m * n


def _sampled_addmm(pattern: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse.sampled_addmm(pattern, mat1, mat2, beta=0.0)


def _nonzero_rows(dy: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """Indices of the rows of dy (tokens, d_out) holding a non-zero (None if skipping won't pay), and their count."""
    nz = dy.ne(0).any(dim=1).nonzero().squeeze(1)
    return (nz if nz.numel() < _ROW_SKIP_BELOW * dy.shape[0] else None), nz.numel()


def _topk_dense(full: torch.Tensor, k: int) -> torch.Tensor:
    """`full` with all but its k largest-magnitude entries set to zero (exactly k kept)."""
    flat = full.reshape(-1)
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.view_as(full)


class _SparseGradFn(torch.autograd.Function):
    """y = x W^T + b with W the merged weight; the trainable tensor's gradient per mode."""

    @staticmethod
    def forward(ctx, x, weight, bias, trainable, layer):
        ctx.layer = layer
        ctx.save_for_backward(x, weight)
        w = weight.to(x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        with torch.autocast(dy.device.type, enabled=False):  # a backward run under autocast keeps its dtypes
            return _SparseGradFn._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, weight = ctx.saved_tensors
        layer: SparseGradLinear = ctx.layer
        d_in, d_out = layer.in_features, layer.out_features
        x2, dy2 = x.reshape(-1, d_in), dy.reshape(-1, d_out)
        rows, n_nonzero = _nonzero_rows(dy2)
        layer.row_counts[0] += n_nonzero
        layer.row_counts[1] += dy2.shape[0]
        if rows is not None:  # Sec. 3.3: only rows of dy with a non-zero take part
            x2, dy_r = x2.index_select(0, rows), dy2.index_select(0, rows)
        else:
            dy_r = dy2

        dx = dw = db = dt = None
        if ctx.needs_input_grad[0]:
            with record_function("sparsegrad.input_grad"):
                dx_r = dy_r @ weight.to(dy.dtype)  # (t, d_out) @ (d_out, d_in)
            if rows is None:
                dx = dx_r.view(*dy.shape[:-1], d_in)
            else:
                dx = dy2.new_zeros(dy2.shape[0], d_in).index_copy_(0, rows, dx_r).view(*dy.shape[:-1], d_in)
        if ctx.needs_input_grad[2]:
            db = dy2.sum(0).to(layer.bias.dtype)  # unrotated sum(dy)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            with record_function(f"sparsegrad.{layer.mode}_grad"):
                grad = layer._trainable_grad(x2, dy_r)
            if layer.mode == "meprop":
                dw = grad
            else:
                dt = grad
        return dx, dw, db, dt, None


class SparseGradLinear(nn.Module):
    """Drop-in replacement for nn.Linear that trains k entries of its weight in the (U, V) basis.

    Args:
        in_features, out_features: d_in, d_out.
        k: number of trained entries (per step, in `dynamic` and `meprop`).
        mode: "fixed", "dynamic" or "meprop" (see module docstring).
        U: (d_in, d_in) and V: (d_out, d_out) orthogonal bases, rows are basis
            vectors; not used by "meprop".
        support: (rows, cols), each (k,), indices into S (d_in, d_out); "fixed" only.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        k: int,
        mode: str = "fixed",
        U: torch.Tensor | None = None,
        V: torch.Tensor | None = None,
        support: tuple[torch.Tensor, torch.Tensor] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.k = check_k(k, in_features, out_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=mode == "meprop")
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.original_type = "Linear"

        if mode == "meprop":
            self.register_buffer("U", None, persistent=False)
            self.register_buffer("V", None, persistent=False)
        else:
            for name, basis, d in (("U", U, in_features), ("V", V, out_features)):
                if basis is None:
                    raise ValueError(f"mode={mode!r} needs the basis {name} ({d}x{d}); compute it with sparsegrad.compute_bases")
                if tuple(basis.shape) != (d, d):
                    raise ValueError(
                        f"basis {name} has shape {tuple(basis.shape)} but this {in_features}->{out_features} "
                        f"layer needs ({d}, {d}); the bases were computed for another model or layer"
                    )
            # Shared by every layer of a role, and held by reference: not in the state_dict
            # (checkpoints stay small; load them into a model converted with the same bases).
            # Row-major storage: the sparse kernels copy anything else on every call.
            self.register_buffer("U", U.to(device=device, dtype=dtype or U.dtype).contiguous(), persistent=False)
            self.register_buffer("V", V.to(device=device, dtype=dtype or V.dtype).contiguous(), persistent=False)

        if mode == "fixed":
            if support is None:
                raise ValueError("mode='fixed' needs a support (rows, cols); sparsegrad.apply chooses it from the bases' energy")
            rows, cols = (torch.as_tensor(t, dtype=torch.long, device=device).reshape(-1) for t in support)
            if rows.numel() != k or cols.numel() != k:
                raise ValueError(f"support has {rows.numel()} rows / {cols.numel()} cols, expected k={k}")
            if (rows < 0).any() or (rows >= in_features).any() or (cols < 0).any() or (cols >= out_features).any():
                raise ValueError(f"support indices fall outside the {in_features}x{out_features} transformed weight")
            if torch.unique(rows * out_features + cols).numel() != k:
                raise ValueError("support has repeated entries")
            # Stored in the order the gradient kernels walk it (sorted along the side they rotate),
            # as int32: no permutation or index copies are kept beside it.
            transposed = _SupportPlan.orientation(rows, cols)
            order = torch.argsort(cols * in_features + rows if transposed else rows * out_features + cols)
            self.register_buffer("rows", rows[order].to(torch.int32))
            self.register_buffer("cols", cols[order].to(torch.int32))
            self.values = nn.Parameter(torch.zeros(k, **factory))
            self.register_buffer("_merged", torch.zeros(k, **factory))
        elif mode == "dynamic":
            self.delta = nn.Parameter(torch.zeros(in_features, out_features, **factory))
            self.register_buffer("_merged", torch.zeros(in_features, out_features, **factory))
        self._plan: _SupportPlan | None = None
        self._plan_key = None
        # [non-zero rows of dy, rows of dy] seen by backward since the last `take_row_counts` (Fig. 3)
        self.row_counts = [0, 0]
        # dynamic / meprop: keep the top-k at every backward (the paper), or leave the full gradient
        # for `sparsify_grad` to cut once it is complete (summed over micro-batches, reduced over ranks)
        self.topk_in_backward = True

    # ------------------------------------------------------------------ building
    @classmethod
    def from_linear(
        cls,
        module: nn.Module,
        *,
        k: int,
        mode: str = "fixed",
        U: torch.Tensor | None = None,
        V: torch.Tensor | None = None,
        energy: torch.Tensor | None = None,
        support: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SparseGradLinear:
        """Wrap an nn.Linear (or transformers' Conv1D); outputs are unchanged.

        In "fixed" mode the support is `support`, or the top-k entries of
        `energy` (d_in, d_out) from the preliminary phase.
        """
        w = linear_weight(module)
        d_out, d_in = w.shape
        if mode == "fixed" and support is None:
            if energy is None:
                raise ValueError("mode='fixed' needs the bases' energy to choose its support")
            if tuple(energy.shape) != (d_in, d_out):
                raise ValueError(f"energy has shape {tuple(energy.shape)}, this layer needs ({d_in}, {d_out})")
            support = topk_support(energy.to(w.device), k)
        layer = cls(
            d_in, d_out, module.bias is not None, k=k, mode=mode, U=U, V=V, support=support,
            device=w.device, dtype=w.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(w)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
                layer.bias.requires_grad_(module.bias.requires_grad)
        layer.original_type = "Conv1D" if _is_conv1d(module) else "Linear"
        return layer

    def to_linear(self) -> nn.Module:
        """A plain nn.Linear (or Conv1D, if that is what was wrapped) with the trained effective weight."""
        self.sync()
        w = self.weight.detach()
        if self.original_type == "Conv1D":
            from transformers.pytorch_utils import Conv1D

            out = Conv1D(self.out_features, self.in_features).to(device=w.device, dtype=w.dtype)
            w = w.t()
        else:
            out = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if self.bias is not None:
                out.bias.copy_(self.bias.detach())
        return out

    # ------------------------------------------------------------------ state
    def _apply(self, fn, recurse=True):
        bases = {name: self._buffers.pop(name) for name in ("U", "V") if self._buffers.get(name) is not None}
        try:
            result = super()._apply(fn, recurse)
        finally:
            for name, basis in bases.items():
                self._buffers[name] = _convert_shared(basis, fn)
        return result

    @property
    def trainable(self) -> nn.Parameter:
        """The tensor the optimizer updates: values (fixed), delta (dynamic) or weight (meprop)."""
        return getattr(self, _TRAINABLE_NAME[self.mode])

    def _support_plan(self) -> _SupportPlan:
        key = (self.rows.data_ptr(), self.rows._version, self.cols._version, self.rows.device)
        if self._plan is None or self._plan_key != key:
            # in plan order already (see __init__): the plan's column indices are the layer's own buffer
            self._plan = _SupportPlan.build(self.rows, self.cols, self.in_features, self.out_features)
            self._plan_key = key
        return self._plan

    @torch.no_grad()
    def sync(self) -> None:
        """Fold trained values that changed since the last fold into `weight`."""
        if self.mode == "meprop":
            return
        current = self.trainable.detach()
        diff = current - self._merged
        if self.weight.dtype not in (torch.float32, torch.float64) and bool(diff.any()):
            raise TypeError(
                f"SparseGradLinear keeps its frozen weight in float32 or float64, not {self.weight.dtype}; "
                "load the model in float32 and train in bfloat16 under torch.autocast"
            )
        if self.mode == "fixed":
            if not bool(diff.any()):
                return
            plan, values = self._support_plan(), diff
        else:
            flat = diff.reshape(-1).nonzero().squeeze(1)
            if flat.numel() == 0:
                return
            rows, cols = flat // self.out_features, flat % self.out_features
            plan, values = _SupportPlan.build(rows, cols, self.in_features, self.out_features), diff.reshape(-1)[flat]
        a, b = plan.sides(self.U, self.V)
        with record_function("sparsegrad.fold"), torch.autocast(self.weight.device.type, enabled=False):
            plan.fold(self.weight.data, values.to(a.dtype), a, b)
        self._merged.copy_(current)

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dimension {self.in_features}, got {tuple(x.shape)}")
        self.sync()
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        with torch.autocast(x.device.type, enabled=False):
            trainable = None if self.mode == "meprop" else self.trainable
            return _SparseGradFn.apply(x, self.weight, self.bias, trainable, self)

    def _trainable_grad(self, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        """Gradient of the trainable tensor from x (t, d_in) and dy (t, d_out), zero rows already skipped."""
        if self.mode == "meprop":  # top-k of dL/dW in the original space, (d_out, d_in)
            g = (dy.t() @ x).to(self.weight.dtype)  # (d_out, t) @ (t, d_in)
            return _topk_dense(g, self.k) if self.topk_in_backward else g

        basis_dtype = self.U.dtype
        if self.mode == "fixed":
            plan = self._support_plan()
            # plan matrix: G = x^T dy (d_in, d_out), or G^T = dy^T x when transposed
            left, right = plan.sides(x.to(basis_dtype), dy.to(basis_dtype))
            return plan.gather(left, right, *plan.sides(self.U, self.V)).to(self.values.dtype)

        # dynamic: the full transformed gradient U G V^T, then its exact top-k
        t, d_in, d_out = x.shape[0], self.in_features, self.out_features
        dense_first = t * d_in * d_out + d_in * d_in * d_out + d_in * d_out * d_out
        rotate_acts = t * d_in * d_in + t * d_out * d_out + t * d_in * d_out
        if dense_first <= rotate_acts:
            g = (x.t() @ dy).to(basis_dtype)  # (d_in, t) @ (t, d_out)
            s = self.U @ g @ self.V.t()  # (d_in, d_in) @ (d_in, d_out) @ (d_out, d_out)
        else:  # few tokens: (x U^T)^T (dy V^T)
            s = (x.to(basis_dtype) @ self.U.t()).t() @ (dy.to(basis_dtype) @ self.V.t())
        return (_topk_dense(s, self.k) if self.topk_in_backward else s).to(self.delta.dtype)

    @torch.no_grad()
    def sparsify_grad(self) -> None:
        """dynamic / meprop with topk_in_backward=False: keep the top-k entries of the complete
        gradient (after accumulation and the data-parallel all-reduce), zeros elsewhere."""
        grad = self.trainable.grad
        if self.mode != "fixed" and grad is not None:
            grad.copy_(_topk_dense(grad, self.k))

    def extra_repr(self) -> str:
        density = self.k / (self.in_features * self.out_features)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"mode={self.mode}, k={self.k} ({100 * density:.2f}%)"
        )
