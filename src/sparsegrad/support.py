"""The fixed support: how it is chosen, the gradient of S at its k entries, and the fold of S into W.

In paper orientation the weight gradient is G = x^T dy (d_in, d_out); with the bases U (d_in, d_in)
and V (d_out, d_out) the transformed gradient is U G V^T. At a support of k entries only

    dL/dS[i, j] = U[i] . G . V[j]       (k values)

is needed: rotate the side of the support with fewer distinct indices (the rows of U it touches,
or of V), then take a sampled product at the entries (see docs/method.md, "The fixed support").

Two structures of the support, both chosen from the preliminary phase's energy (d_in, d_out):
    scattered  the k largest entries anywhere (the paper's choice): they spread over many rows and
               columns, so the gradient there needs many rotated rows of the transformed gradient,
               or all of it.
    block      k entries filling r rows x c columns of S (the last row partly), r the narrow side:
               the gradient needs U's r rows and V's c rows only -- about t r (m + n) + k n
               multiply-adds for t tokens instead of t m n, (m, n) the block's sides' dimensions --
               in dense products; the fold is over r rows. r is small, and the block keeps most of the
               top-k's energy, because HOSVD orders the bases by energy (docs/method.md, "The block
               support").
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.autograd.profiler import record_function

from .sparse_linear import check_k

STRUCTURES = ("scattered", "block")
BLOCK_MAX_ROWS = 64  # a block's narrow side: the fold costs about r / tokens of a forward pass


def topk_support(energy: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major sorted (rows, cols) of the k largest entries of `energy` (d_in, d_out)."""
    d_in, d_out = energy.shape
    check_k(k, d_in, d_out)
    flat = torch.topk(energy.reshape(-1).float(), k, sorted=False).indices.sort().values
    return flat // d_out, flat % d_out


def block_support(energy: torch.Tensor, k: int, max_rows: int = BLOCK_MAX_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major sorted (rows, cols) of k entries of `energy` (d_in, d_out) filling a block of r x c, its narrow
    side r along S's rows or its columns.

    The shapes tried: r narrow indices, a power of 2 up to max_rows (or, where none can hold k, the fewest
    that can), and c = ceil(k / r) wide ones: the r indices of most energy, then the c of most energy within
    them; the narrow index of least energy holds the k - (r - 1) c entries of most energy in its row. The
    shape keeping the most energy wins (ties: the first tried, fewer rows)."""
    d_in, d_out = energy.shape
    check_k(k, d_in, d_out)
    energy = energy.double()
    sides = ((False, energy), (True, energy.t()))
    shapes = [(t, r) for t, e in sides for r in (2**j for j in range(max_rows.bit_length()))
              if r <= min(max_rows, e.shape[0]) and r * e.shape[1] >= k]
    shapes = shapes or [(t, -(-k // e.shape[1])) for t, e in sides if -(-k // e.shape[1]) <= e.shape[0]]
    best = None
    for transposed, r in shapes:
        e = energy.t() if transposed else energy  # narrow side along its rows
        c = -(-k // r)
        r = -(-k // c)  # the rows that c entries each need
        rows = e.sum(1).topk(r).indices
        cols = e[rows].sum(0).topk(c).indices
        last = k - (r - 1) * c  # entries in the last (least energy) row
        part = cols[e[rows[-1], cols].topk(last).indices]
        kept = float(e[rows[:-1]][:, cols].sum() + e[rows[-1], part].sum())
        if best is None or kept > best[0]:
            best = (kept, transposed, rows, cols, part)
    _, transposed, rows, cols, part = best
    narrow = torch.cat((rows[:-1].repeat_interleave(cols.numel()), rows[-1:].expand(part.numel())))
    wide = torch.cat((cols.repeat(rows.numel() - 1), part))
    rows, cols = (wide, narrow) if transposed else (narrow, wide)
    order = torch.argsort(rows * d_out + cols)
    return rows[order], cols[order]


def choose_support(energy: torch.Tensor, k: int, structure: str = "scattered") -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of a fixed support of k entries of `energy` (d_in, d_out), of the given structure."""
    if structure not in STRUCTURES:
        raise ValueError(f"structure={structure!r} is not one of {STRUCTURES}")
    return block_support(energy, k) if structure == "block" else topk_support(energy, k)


@dataclass
class SupportPlan:
    """A scattered support arranged for rotating its smaller side.

    In plan orientation the matrix is (m, n) = (d_in, d_out), or (d_out, d_in)
    when `transposed`; `a` (m, m) rotates its rows and `b` (n, n) its columns.
    Entries are sorted by (row, col) in plan orientation, as a CSR pattern over
    the r distinct rows; `order` maps them back to the caller's order. A block
    support (its entries fill r rows x c columns, the last row at least partly)
    also keeps its c columns and each entry's place in the dense (r, c) block:
    its gradient is then dense products only.
    """

    transposed: bool
    order: torch.Tensor | None  # (k,) plan position -> caller position; None: already in plan order
    uniq_rows: torch.Tensor  # (r,) distinct plan rows
    crow: torch.Tensor  # (r + 1,) int32 CSR row pointer over the distinct rows
    cols: torch.Tensor  # (k,) int32 plan column of each entry (the layer's own buffer when in plan order)
    n: int  # plan columns
    all_rows: bool = False  # each layer's rows are all m rows, in order (uniq_rows is then arange(m) per layer)
    block_cols: torch.Tensor | None = None  # (c,) a block support's distinct plan columns, sorted
    block_pos: torch.Tensor | None = None  # (k,) int32, each entry's flat place in the dense (r, c) block

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
        block_cols = torch.unique(cols.long())  # sorted
        c, block_pos = block_cols.numel(), None
        if uniq_rows.numel() * c - cols.numel() < c:  # its r rows x c columns but for fewer than c entries: a block
            row_of = torch.repeat_interleave(torch.arange(uniq_rows.numel(), device=rows.device), counts)
            block_pos = (row_of * c + torch.searchsorted(block_cols, cols.long())).to(torch.int32)
        else:
            block_cols = None
        return SupportPlan(transposed, order, uniq_rows, crow, cols.to(torch.int32), n, uniq_rows.numel() == m,
                           block_cols, block_pos)

    def sides(self, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A (d_in-side, d_out-side) pair, e.g. (U, V) or (x, dy), in plan orientation."""
        return (second, first) if self.transposed else (first, second)

    def _csr(self, values: torch.Tensor) -> torch.Tensor:
        return csr(self.crow, self.cols, values, (self.uniq_rows.numel(), self.n))

    def gather(self, left: torch.Tensor, right: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(a @ left^T right @ b^T) at the support, in caller order.

        left (t, m), right (t, n): the plan matrix is left^T right (G or G^T).
        Forms the dense (m, n) gradient and its (r, n) rotation, or (t, r) rotated activations; a block
        support may rotate both sides' activations instead: (t, r) and (t, c).
        """
        a_r = a[self.uniq_rows]  # (r, m)
        out = self._block(left, right, a_r, b) if self.block_cols is not None else self._sampled(left, right, a_r, b)
        if self.order is None:
            return out
        result = torch.empty_like(out)
        result[self.order] = out
        return result

    def _rotated_rows(self, left: torch.Tensor, right: torch.Tensor, a_r: torch.Tensor) -> torch.Tensor:
        """(r, n): the support's r rows of a_r left^T right, the cheaper way."""
        (t, m), r = left.shape, a_r.shape[0]
        if _rotate_activations(t, r, m, self.n):
            with record_function("sparsegrad.rotated_activations"):
                return (left @ a_r.t()).t() @ right  # rotated activations: (r, t) @ (t, n) -> (r, n)
        with record_function("sparsegrad.dense_weight_grad"):
            g = left.t() @ right  # (m, t) @ (t, n): the dense gradient, as full FT computes it
        with record_function("sparsegrad.rotate_rows"):
            return a_r @ g  # (r, m) @ (m, n)

    def _sampled(self, left: torch.Tensor, right: torch.Tensor, a_r: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(k,) in plan order: the rotated rows, then a sampled product at the entries."""
        rot = self._rotated_rows(left, right, a_r)
        with record_function("sparsegrad.sample_support"):
            return sampled_product(self.crow, self.cols, rot, b)  # (k,): rot[i] . b[j] at the entries

    def _block(self, left: torch.Tensor, right: torch.Tensor, a_r: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(k,) in plan order, of a block support: the dense (r, c) block, then its k entries."""
        (t, m), r, c = left.shape, a_r.shape[0], self.block_cols.numel()
        b_c = b[self.block_cols]  # (c, n)
        if _rotate_both(t, r, c, m, self.n):
            with record_function("sparsegrad.rotated_activations"):
                block = (left @ a_r.t()).t() @ (right @ b_c.t())  # (r, t) @ (t, c)
        else:
            rot = self._rotated_rows(left, right, a_r)
            with record_function("sparsegrad.block_columns"):
                block = rot @ b_c.t()  # (r, n) @ (n, c)
        return block.reshape(-1)[self.block_pos]

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
    dense product for all of them: (L r, n) @ (n, n), then (L, m, r) @ (L, r, n). One layer's block support
    takes dense products only: its (r, c) block @ b's c rows, then (m, r) @ (r, n)."""
    L, m = len(weights), a.shape[0]
    dtype = weights[0].dtype
    values = values if plan.order is None else values[plan.order]
    if plan.block_cols is not None:  # one block: dense (r, c) @ (c, n), a GEMM where the sparse product is slow
        block = values.new_zeros(plan.uniq_rows.numel() * plan.block_cols.numel()).index_put_((plan.block_pos,), values)
        p = block.view(-1, plan.block_cols.numel()).to(a.dtype) @ b[plan.block_cols]  # (r, n)
    else:
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


def _rotate_both(t: int, r: int, c: int, m: int, n: int) -> bool:
    """A block of r x c: is rotating both sides' activations, (left a_r^T)^T (right b_c^T), cheaper than rotating
    r rows (r, n) of the gradient, the cheaper way, then their c columns?"""
    return t * (r * m + c * n + r * c) < min(t * r * (m + n), t * m * n + r * m * n) + r * n * c


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
