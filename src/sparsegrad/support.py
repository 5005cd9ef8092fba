"""The fixed support's kernels: the gradient of S at k scattered entries, and the fold of S into W.

In paper orientation the weight gradient is G = x^T dy (d_in, d_out); with the bases U (d_in, d_in)
and V (d_out, d_out) the transformed gradient is U G V^T. At a support of k entries only

    dL/dS[i, j] = U[i] . G . V[j]       (k values)

is needed: rotate the side of the support with fewer distinct indices (the rows of U it touches,
or of V), then take a sampled product at the entries (see docs/method.md, "The fixed support").
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.autograd.profiler import record_function

from .sparse_linear import check_k


def topk_support(energy: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major sorted (rows, cols) of the k largest entries of `energy` (d_in, d_out)."""
    d_in, d_out = energy.shape
    check_k(k, d_in, d_out)
    flat = torch.topk(energy.reshape(-1).float(), k, sorted=False).indices.sort().values
    return flat // d_out, flat % d_out


@dataclass
class SupportPlan:
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
    all_rows: bool = False  # each layer's rows are all m rows, in order (uniq_rows is then arange(m) per layer)

    @staticmethod
    def orientation(rows: torch.Tensor, cols: torch.Tensor) -> bool:
        """Rotate the side with fewer distinct indices: transposed when that is the columns."""
        return cols.unique().numel() < rows.unique().numel()

    @staticmethod
    def build(rows: torch.Tensor, cols: torch.Tensor, d_in: int, d_out: int) -> SupportPlan:
        transposed = SupportPlan.orientation(rows, cols)
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
        m = d_out if transposed else d_in
        return SupportPlan(transposed, order, uniq_rows, crow, cols.to(torch.int32), n, uniq_rows.numel() == m)

    def sides(self, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A (d_in-side, d_out-side) pair, e.g. (U, V) or (x, dy), in plan orientation."""
        return (second, first) if self.transposed else (first, second)

    def _csr(self, values: torch.Tensor) -> torch.Tensor:
        return csr(self.crow, self.cols, values, (self.uniq_rows.numel(), self.n))

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
            out = sampled_product(self.crow, self.cols, rot, b)  # (k,): rot[i] . b[j] at the entries
        if self.order is None:
            return out
        result = torch.empty_like(out)
        result[self.order] = out
        return result

    @staticmethod
    def every_row(flat: torch.Tensor, d_in: int, d_out: int, layers: int = 1) -> SupportPlan:
        """The plan of entries at the sorted flat indices `flat` into `layers` stacked S's (layers, d_in, d_out),
        over every row of S's smaller side, each layer's after the last's. An entry may repeat (its values sum).
        Static shapes, nothing read back: the dynamic mode's, whose rows change at every step."""
        transposed = d_out < d_in  # rotate the smaller side
        layer, rest = flat // (d_in * d_out), flat % (d_in * d_out)
        rows, cols = rest // d_out, rest % d_out
        if transposed:
            rows, cols, m, n = cols, rows, d_out, d_in
        else:
            m, n = d_in, d_out
        rows = layer * m + rows  # rows of the stack (layers * m, n)
        order = None  # row-major flat indices are in plan order already
        if transposed:
            rows, order = rows.sort(stable=True)
            cols = cols[order]
        crow = torch.searchsorted(rows, torch.arange(layers * m + 1, device=rows.device)).to(torch.int32)
        every = torch.arange(m, device=rows.device).repeat(layers)
        return SupportPlan(transposed, order, every, crow, cols.to(torch.int32), n, True)

    @staticmethod
    def stack(plans: list[SupportPlan]) -> SupportPlan:
        """One plan over the layers' S's stacked along the plan rows (one orientation), each layer padded
        with empty rows to the largest r: what `fold` takes for several layers of one role at once."""
        if len({p.transposed for p in plans}) != 1:
            raise ValueError("stacked plans must share one orientation")
        r = max(p.uniq_rows.numel() for p in plans)
        crows, rows, cols, orders = [], [], [], []
        offset = 0
        for p in plans:
            k, pad = p.cols.numel(), r - p.uniq_rows.numel()
            crows += [p.crow[:-1] + offset, p.crow.new_full((pad,), offset + k)]
            rows += [p.uniq_rows, p.uniq_rows.new_zeros(pad)]  # padded rows are empty: any row of a will do
            cols.append(p.cols)
            orders.append(offset + (p.order if p.order is not None else torch.arange(k, device=p.cols.device)))
            offset += k
        crows.append(plans[0].crow.new_full((1,), offset))
        order = None if all(p.order is None for p in plans) else torch.cat(orders)
        return SupportPlan(plans[0].transposed, order, torch.cat(rows), torch.cat(crows), torch.cat(cols), plans[0].n,
                           all(p.all_rows for p in plans))


def fold(weights: list[torch.Tensor], plan: SupportPlan, values: torch.Tensor, a: torch.Tensor, b: torch.Tensor
         ) -> None:
    """weights[l] (d_out, d_in) += a^T S_l b in weight orientation, for layers sharing the rotations a (m, m) and
    b (n, n) (one role): `plan` covers the S_l stacked along its rows (r rows per layer: one layer's plan,
    SupportPlan.stack or every_row), `values` its entries (caller order). One sparse product and one batched
    dense product for all of them: (L r, n) @ (n, n), then (L, m, r) @ (L, r, n)."""
    L, m = len(weights), a.shape[0]
    dtype = weights[0].dtype
    values = values if plan.order is None else values[plan.order]
    p = plan._csr(values.to(a.dtype)) @ b  # (L r, n)
    r = p.shape[0] // L
    if L == 1:  # one layer: the update is added by the product itself
        a_r = a if plan.all_rows else a[plan.uniq_rows]  # (r, m)
        if plan.transposed:  # plan matrix is W itself: W += a_r^T @ p
            weights[0].addmm_(a_r.t().to(dtype), p.to(dtype))
        else:  # plan matrix is W^T: W += p^T @ a_r
            weights[0].addmm_(p.t().to(dtype), a_r.to(dtype))
        return
    p = p.view(L, r, -1).to(dtype)
    a_r = (a if plan.all_rows else a[plan.uniq_rows].view(L, r, m)).to(dtype)  # (r, m), or (L, r, m)
    update = a_r.transpose(-2, -1) @ p if plan.transposed else p.transpose(1, 2) @ a_r  # (L, d_out, d_in)
    torch._foreach_add_(weights, update.unbind(0))  # one launch for all (as torch.optim's foreach steps)


def csr(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A sparse CSR matrix of `shape` from its row pointer, column indices and values (unchecked: built right)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


def _rotate_activations(t: int, r: int, m: int, n: int) -> bool:
    """Is (left a_r^T)^T right cheaper than forming G = left^T right and rotating r of its rows?"""
    return t * r * (m + n) <= t * m * n + r * m * n


# One opaque operator for torch.compile: the sparse CSR pattern is built and used inside it, so a
# compiled backward holds no sparse tensor (which the compiler cannot trace) and no warning filter.
@torch.library.custom_op("sparsegrad::sampled_product", mutates_args=())
def sampled_product(crow: torch.Tensor, cols: torch.Tensor, rot: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(k,) products rot[i] . b[j] at the entries (i, j) of a CSR pattern (crow over rot's r rows, cols)."""
    pattern = csr(crow, cols, torch.zeros(cols.numel(), dtype=rot.dtype, device=rot.device), (rot.shape[0], b.shape[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        # sampled (r, n) @ (n, n) at the entries (beta * 0: the pattern's zeros do not count)
        return torch.sparse.sampled_addmm(pattern, rot, b.t(), beta=0.0).values().clone()


@sampled_product.register_fake
def _(crow, cols, rot, b):
    return rot.new_empty(cols.shape[0])
