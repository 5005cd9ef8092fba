"""SparseGradLinear: a linear layer whose weight trains in the HOSVD basis (the paper's Sec. 3).

In paper orientation the weight gradient is G = x^T dy, shape (d_in, d_out). The bases are
U (d_in, d_in) and V (d_out, d_out), orthogonal, rows are basis vectors. The trained change lives
in the transformed space:

    W_eff^T = W_0^T + U^T S V,        dL/dS = U G V^T        (both (d_in, d_out))

The layer keeps W_eff merged in `weight` (frozen), so its forward pass and input gradient are
nn.Linear's (see sparse_linear.py). The layer computes S's gradient and records what of S changed
since the last fold (`take_change`); the fold itself, after each optimizer step, is folding.py's:
in place for float32 / float64 weights, an exact rebuild for bfloat16 / float16 ones (whose S and
bases are float32), each rank its own rows when sharded (sharding.py).

Two selections of S's trained entries, two classes sharing the bases and the autograd function:
    FixedSparseGradLinear    S is non-zero on a support of k entries chosen once from the
                             preliminary phase's energy, scattered (the top-k) or a block of
                             r rows x c columns (cheaper); the k values are a dense parameter
                             (``values``), optimizer state O(k); their gradient is computed
                             exactly at the support (support.py).
    DynamicSparseGradLinear  the paper: S is a dense (d_in, d_out) parameter (``delta``) whose
                             gradient is a sparse tensor of the exact top-k entries of |U G V^T|,
                             taken at every backward.
The MeProp baseline (top-k in the original space, no basis) is meprop.MePropLinear.
"""
from __future__ import annotations

import torch
from torch import nn

from . import folding
from .collectives import all_gather_cat, keep_global_topk, shard_rows
from .folding import Change
from .meprop import MePropLinear
from .shared_bases import SharedBases
from .sparse_linear import LOW_PRECISION, SparseLinear, keep_precision, linear_weight, master_dtype, sparse_entries
from .support import STRUCTURES, SupportPlan, choose_support


class SparseGradLinear(SparseLinear):
    """Drop-in replacement for nn.Linear that trains k entries of its weight in the (U, V) basis.

    ``SparseGradLinear(..., mode="fixed" | "dynamic")`` builds the class of that mode.

    Args:
        in_features, out_features: d_in, d_out.
        k: number of trained entries (per step, in `dynamic`).
        U: (d_in, d_in) and V: (d_out, d_out) orthogonal bases, rows are basis vectors, or
        bases: the SharedBases of the layer's role, held by every layer of it (sparsegrad.apply gives them).
        dtype: the weight's; bfloat16 / float16 keep S and the bases in float32 (see the module's
            notes on how their weight is rebuilt exactly).
    """

    def __new__(cls, *args, mode: str | None = None, **kwargs):
        built = cls
        if cls is SparseGradLinear:
            built = layer_class(mode or "fixed")
            if not issubclass(built, SparseGradLinear):
                raise ValueError(f"mode={mode!r} is the MeProp baseline: build it with MePropLinear")
        return super().__new__(built)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, k: int,
                 U: torch.Tensor | None = None, V: torch.Tensor | None = None, bases: SharedBases | None = None,
                 mode: str | None = None, device=None, dtype=None, owner: nn.Linear | None = None) -> None:
        if mode is not None and mode != self.mode:
            raise ValueError(f"mode={mode!r} does not fit {type(self).__name__} (mode {self.mode!r})")
        super().__init__(in_features, out_features, bias, k=k, device=device, dtype=dtype, owner=owner)
        if bases is None:
            for name, basis, d in (("U", U, in_features), ("V", V, out_features)):
                if basis is None:
                    raise ValueError(f"mode={self.mode!r} needs the basis {name} ({d}x{d}); "
                                     "compute it with sparsegrad.compute_bases")
            bases = SharedBases(U, V, device=device, dtype=master_dtype(dtype) or U.dtype)
        self._check_bases(bases)
        self.bases = bases  # a child module, the same for every layer of the role
        # low precision: the entries whose pretrained value the weight cannot give back (folding.rebuild)
        low = self.weight.dtype in LOW_PRECISION
        self.register_buffer("w0_index", torch.zeros(0, dtype=self._index_dtype(), device=device) if low else None)
        self.register_buffer("w0_value", self.weight.new_zeros(0) if low else None)
        self.unfolded = False  # S taken out of the weight (see unfold)
        self.fold_rule = folding.rule_for(self.weight.dtype)  # how S reaches the weight
        folding.register(self)  # folded after each optimizer step that updates S

    def _check_bases(self, bases: SharedBases) -> None:
        for name, d in (("U", self.in_features), ("V", self.out_features)):
            shape = tuple(getattr(bases, name).shape)
            if shape != (d, d):
                raise ValueError(f"basis {name} has shape {shape} but this {self.in_features}->{self.out_features} "
                                 f"layer needs ({d}, {d}); the bases were computed for another model or layer")

    @property
    def U(self) -> torch.Tensor:
        return self.bases.U

    @property
    def V(self) -> torch.Tensor:
        return self.bases.V

    @classmethod
    def from_linear(cls, module: nn.Module, *, k: int, mode: str | None = None, **kwargs) -> SparseLinear:
        """Wrap an nn.Linear (or transformers' Conv1D); outputs are unchanged.

        On SparseGradLinear itself, `mode` picks the class ("fixed", "dynamic"; "meprop" gives the
        MePropLinear baseline, which takes no bases).
        """
        if cls is SparseGradLinear:
            target = layer_class(mode or "fixed")
            if target is not FixedSparseGradLinear:  # the support and its energy belong to the fixed mode
                kwargs = {k_: v for k_, v in kwargs.items() if k_ not in ("energy", "support", "structure")}
            if target is MePropLinear:
                return MePropLinear.from_linear(module, k=k)
            return target.from_linear(module, k=k, **kwargs)
        if mode is not None and mode != cls.mode:
            raise ValueError(f"mode={mode!r} does not fit {cls.__name__} (mode {cls.mode!r})")
        return super().from_linear(module, k=k, **kwargs)

    # ------------------------------------------------------------------ state
    def __setstate__(self, state):  # copy.deepcopy and pickle build the layer without __init__
        super().__setstate__(state)
        folding.register(self)

    def _apply(self, fn, recurse=True):
        # S stays at least float32 (and so do the bases: SharedBases._apply)
        kept = {name: t for name, t in (*self._parameters.items(), *self._buffers.items())
                if name in self._master and t is not None}
        for name in kept:
            (self._parameters if name in self._parameters else self._buffers).pop(name)
        try:
            result = super()._apply(fn, recurse)
        finally:
            for name, t in kept.items():
                if isinstance(t, nn.Parameter):
                    converted = keep_precision(fn, t.data)
                    if converted.is_meta != t.is_meta:  # to or from "meta": a new parameter, as nn.Module gives
                        t = nn.Parameter(converted, requires_grad=t.requires_grad)
                    else:
                        t.data = converted
                    self._parameters[name] = t
                else:
                    self._buffers[name] = keep_precision(fn, t)
        low = self.weight.dtype in LOW_PRECISION
        if low and self.w0_index is None:  # narrowed: from here on W_0 is what the weight gives back
            self.w0_index = torch.zeros(0, dtype=self._index_dtype(), device=self.weight.device)
            self.w0_value = self.weight.new_zeros(0)
        elif not low:
            self.w0_index = self.w0_value = None  # float32 / float64 weights take each change in place
        if not self.sharded:  # the sharded rule stays (sharding.py)
            self.fold_rule = folding.rule_for(self.weight.dtype)
        return result

    def _index_dtype(self) -> torch.dtype:
        return torch.int32 if self.in_features * self.out_features < 2**31 else torch.long

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("w0_index", "w0_value"):  # as many entries as the saved layer had
            saved = state_dict.get(prefix + name)
            if saved is not None and getattr(self, name) is not None:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    _master = ("values", "delta", "_merged", "frozen_values")  # S and its fold record: never narrowed below float32

    def trained_entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cols, values) of S's trained entries: what an adapter stores."""
        raise NotImplementedError

    def trained_plan(self) -> tuple[SupportPlan, torch.Tensor] | None:
        """(plan, values) of every trained entry of S, or None when S is zero."""
        raise NotImplementedError

    def gradient_left_whole(self) -> bool:
        """Does S hold a deferred gradient not yet cut to its top-k (see folding._before_step)?"""
        return False

    def delta_weight(self) -> torch.Tensor:
        """U^T S V in weight orientation (d_out, d_in), float32: what S adds to the pretrained weight."""
        return folding.delta(self, self.trained_plan())

    # ------------------------------------------------------------------ the record of what is folded
    def take_change(self, check: bool = True) -> Change | None:
        """The entries of S that may have changed since the last fold, or None; marks them folded.
        check: look on the device whether anything changed (a read-back); without, hand out what may have."""
        raise NotImplementedError

    def folded_plan(self, change: Change) -> tuple[SupportPlan, torch.Tensor] | None:
        """(plan, values) of S as it was at the last fold, before `change`."""
        raise NotImplementedError

    def forget_folded(self) -> None:
        """Record that none of S is in the weight: the next fold folds all of it."""
        raise NotImplementedError

    @torch.no_grad()
    def set_trained(self, values: torch.Tensor) -> None:
        """Set S's trained values (fixed: the (k,) `values`; dynamic: the dense (d_in, d_out) `delta`)
        and fold the change into the weight. Writing the parameter in place skips the fold."""
        self.trainable.copy_(values)
        self.sync()

    def sync(self, check: bool = True) -> None:
        """Fold what changed in S since the last fold into `weight` (none while unfolded); see folding.py."""
        folding.fold_layers([self], check)

    @torch.no_grad()
    def unfold(self) -> None:
        """Take S out of the weight (weight = W_0) and keep it out until `refold`: folds and state_dict()
        leave the weight alone meanwhile; S itself is kept. How a peft adapter is disabled or switched.
        Low-precision weights come back to W_0 exactly (the rebuild), float32 ones to rounding
        (W_0 + D - D), as a merged LoRA's unmerge."""
        if self.unfolded:
            return
        self.sync()
        with torch.autocast(self.weight.device.type, enabled=False):
            self.fold_rule.unfold(self)
        self.forget_folded()
        self.unfolded = True

    @torch.no_grad()
    def refold(self) -> None:
        """Fold all of S into the weight again after `unfold`."""
        self.unfolded = False
        self.sync()

    @torch.no_grad()
    def load_trained(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                     bases: SharedBases | None = None) -> None:
        """Make S the given entries (an adapter's), zero elsewhere, optionally in new bases, and fold it.
        fixed: (rows, cols) become the support (k entries); dynamic: any number up to the layer size."""
        folded = not self.unfolded
        self.unfold()
        if bases is not None:
            self._check_bases(bases)
            self.bases = bases
        self._set_entries(rows.long().to(self.weight.device), cols.long().to(self.weight.device),
                          values.to(self.weight.device))
        self.forget_folded()
        if folded:
            self.refold()

    def _set_entries(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> None:
        raise NotImplementedError


class FixedSparseGradLinear(SparseGradLinear):
    """S trains on a fixed support of k entries (rows, cols), chosen from the preliminary phase's energy.

    Args (besides SparseGradLinear's):
        support: (rows, cols), each (k,), indices into S (d_in, d_out).
    """

    mode = "fixed"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, k: int,
                 U: torch.Tensor | None = None, V: torch.Tensor | None = None, bases: SharedBases | None = None,
                 support: tuple[torch.Tensor, torch.Tensor] | None = None, mode: str | None = None,
                 device=None, dtype=None, owner: nn.Linear | None = None) -> None:
        super().__init__(in_features, out_features, bias, k=k, U=U, V=V, bases=bases, mode=mode, device=device,
                         dtype=dtype, owner=owner)
        if support is None:
            raise ValueError("mode='fixed' needs a support (rows, cols); sparsegrad.apply chooses it from the bases' energy")
        self.register_buffer("rows", None)
        self.register_buffer("cols", None)
        self._order_support(*support)
        self.values = nn.Parameter(torch.zeros(k, device=self.rows.device, dtype=master_dtype(self.weight.dtype)))
        self.register_buffer("_merged", torch.zeros_like(self.values.data))  # values folded
        # entries of S that left the support at a refresh (refresh.py): still folded in the weight and
        # saved in the adapter, no longer trained; None (not in the state dict) until a refresh makes some
        for name in ("frozen_rows", "frozen_cols", "frozen_values"):
            self.register_buffer(name, None)
        self.energy: torch.Tensor | None = None  # (d_in, d_out) sum of (U G V^T)^2 while recording (refresh)

    def _order_support(self, rows, cols) -> torch.Tensor:
        """Check the support and store it in the order the gradient kernels walk it (sorted along the
        side they rotate), as int32: no permutation or index copies are kept beside it. Returns that order."""
        k, d_in, d_out = self.k, self.in_features, self.out_features
        device = self.weight.device
        rows, cols = (torch.as_tensor(t, dtype=torch.long, device=device).reshape(-1) for t in (rows, cols))
        if rows.numel() != k or cols.numel() != k:
            raise ValueError(f"support has {rows.numel()} rows / {cols.numel()} cols, expected k={k}")
        if (rows < 0).any() or (rows >= d_in).any() or (cols < 0).any() or (cols >= d_out).any():
            raise ValueError(f"support indices fall outside the {d_in}x{d_out} transformed weight")
        if torch.unique(rows * d_out + cols).numel() != k:
            raise ValueError("support has repeated entries")
        transposed = SupportPlan.orientation(rows, cols)
        order = torch.argsort(cols * d_in + rows if transposed else rows * d_out + cols)
        self.rows, self.cols = rows[order].to(torch.int32), cols[order].to(torch.int32)
        self._build_plan()
        return order

    @classmethod
    def from_linear(cls, module: nn.Module, *, k: int, mode: str | None = None,
                    energy: torch.Tensor | None = None, support=None, structure: str = "scattered",
                    **kwargs) -> FixedSparseGradLinear:
        """The support is `support`, or k entries of `energy` (d_in, d_out) from the preliminary phase: the top-k
        (structure "scattered") or a block of them ("block"; support.block_support)."""
        if structure not in STRUCTURES:
            raise ValueError(f"structure={structure!r} is not one of {STRUCTURES}")
        if support is None:
            w = linear_weight(module)
            d_out, d_in = w.shape
            if energy is None:
                raise ValueError("mode='fixed' needs the bases' energy to choose its support")
            if tuple(energy.shape) != (d_in, d_out):
                raise ValueError(f"energy has shape {tuple(energy.shape)}, this layer needs ({d_in}, {d_out})")
            support = choose_support(energy.to(w.device), k, structure)
        return super().from_linear(module, k=k, mode=mode, support=support, **kwargs)

    @property
    def trainable(self) -> nn.Parameter:
        return self.values

    @property
    def structure(self) -> str:
        """"block" when the support fills r rows x c columns of S (its gradient then takes dense products only),
        else "scattered"."""
        return "scattered" if self._support_plan().block_cols is None else "block"

    def extra_repr(self) -> str:
        plan = None if self.rows.is_meta else self._support_plan()
        if plan is None or plan.block_cols is None:
            return super().extra_repr()
        shape = (plan.uniq_rows.numel(), plan.block_cols.numel())  # in plan orientation
        r, c = shape[::-1] if plan.transposed else shape
        return f"{super().extra_repr()}, block {r}x{c}"

    def _build_plan(self) -> None:
        """The support's plan, built whenever the support is set or moves (reading it back once), never in a
        step: forward and backward then read nothing, and a compiled graph holds no data-dependent shape."""
        self._plan = None if self.rows.is_meta else SupportPlan.build(self.rows, self.cols, self.in_features,
                                                                      self.out_features)

    def _support_plan(self) -> SupportPlan:
        if self._plan is None:
            self._build_plan()
        return self._plan

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._build_plan()  # its index tensors follow the support to its new device
        return result

    def trained_entries(self):
        values = self.values.detach()
        values = values.full_tensor() if self.sharded else values
        if self.frozen_rows is None:
            return self.rows.long(), self.cols.long(), values
        return (torch.cat((self.rows.long(), self.frozen_rows.long())),
                torch.cat((self.cols.long(), self.frozen_cols.long())), torch.cat((values, self.frozen_values)))

    # ------------------------------------------------------------------ the support refresh (refresh.py)
    def record_energy(self, on: bool = True) -> None:
        """Start (or stop and drop) summing the energy of the transformed gradient, (U G V^T)^2 over the
        coming backward passes: what sparsegrad.refresh.refresh_support chooses the next support from."""
        self.energy = torch.zeros(self.in_features, self.out_features, dtype=torch.float32,
                                  device=self.weight.device) if on else None

    @torch.no_grad()
    def set_support(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                    frozen: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """Make (rows, cols) the support, holding `values`, and `frozen` (rows, cols, values) the entries of S that
        stay folded but train no more -- S as a whole unchanged, so the weight holds it already (sparsegrad.refresh)."""
        order = self._order_support(rows, cols)
        self.values.data.copy_(values[order])
        self._merged.copy_(self.values.data)
        if frozen is None:
            self.frozen_rows = self.frozen_cols = self.frozen_values = None
        else:
            self.frozen_rows, self.frozen_cols = (t.to(self.rows.dtype) for t in frozen[:2])
            self.frozen_values = frozen[2].to(self.values.dtype)

    def take_change(self, check=True, values: torch.Tensor | None = None):
        """values: S's (k,) values now (sharded: the whole of them, gathered); default the layer's own."""
        values = self.values.detach() if values is None else values
        diff = values - self._merged
        if check and not bool(diff.any()):
            return None
        before = self._merged.clone()
        self._merged.copy_(values)
        return Change(self._support_plan(), diff, before)

    def trained_plan(self):
        return self._support_plan(), self.values.detach()

    def folded_plan(self, change):
        return self._support_plan(), change.before

    def forget_folded(self) -> None:
        self._merged.zero_()

    def _set_entries(self, rows, cols, values) -> None:
        order = self._order_support(rows, cols)
        self.values.data.copy_(values[order])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the frozen part is as large as the saved layer's (or absent): taken here, not by nn.Module
        names = ("frozen_rows", "frozen_cols", "frozen_values")
        saved = {name: state_dict.pop(prefix + name, None) for name in names}
        for name in names:
            setattr(self, name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._build_plan()  # the support may have been loaded in place
        for name, t in saved.items():
            setattr(self, name, None if t is None else t.to(self.rows.device))

    def _trainable_grad(self, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        plan = self._support_plan()
        basis_dtype = self.U.dtype
        if self.energy is not None:  # recording for a refresh: the dense transformed gradient, squared
            g = x.to(basis_dtype).t() @ dy.to(basis_dtype)  # (d_in, t) @ (t, d_out)
            self.energy += (self.U @ g @ self.V.t()).float().square_()  # (d_in, d_in) @ (d_in, d_out) @ (d_out, d_out)
        # plan matrix: G = x^T dy (d_in, d_out), or G^T = dy^T x when transposed
        left, right = plan.sides(x.to(basis_dtype), dy.to(basis_dtype))
        return plan.gather(left, right, *plan.sides(self.U, self.V)).to(self.values.dtype)

    def sparsify_grad(self) -> None:
        """Nothing to cut: the gradient lives on the support only."""


class DynamicSparseGradLinear(SparseGradLinear):
    """The paper's selection: S is dense, its gradient keeps the top-k entries of U G V^T per step.

    The gradient is a sparse tensor of those k entries, so an optimizer changes S only there
    (a lazy one: sparsegrad.optimizer, torch.optim.SparseAdam). The layer remembers the entries it
    handed out and their values, and folds what changed there: no dense copy of S is kept.
    """

    mode = "dynamic"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, k: int,
                 U: torch.Tensor | None = None, V: torch.Tensor | None = None, bases: SharedBases | None = None,
                 mode: str | None = None, device=None, dtype=None, owner: nn.Linear | None = None) -> None:
        super().__init__(in_features, out_features, bias, k=k, U=U, V=V, bases=bases, mode=mode, device=device,
                         dtype=dtype, owner=owner)
        self.delta = nn.Parameter(torch.zeros(in_features, out_features, device=device, dtype=master_dtype(dtype)))
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (flat indices, values of S there) since the fold

    @property
    def trainable(self) -> nn.Parameter:
        return self.delta

    def trained_entries(self):
        S = self.delta.detach()
        if self.sharded:  # each rank's non-zero entries, gathered (collective)
            local = S.to_local().reshape(-1)
            flat = local.nonzero().squeeze(1)
            flat, values = all_gather_cat([flat + shard_rows(S)[0] * self.out_features, local[flat]],
                                          S.device_mesh.get_group())
            return flat // self.out_features, flat % self.out_features, values
        flat = S.reshape(-1).nonzero().squeeze(1)
        return flat // self.out_features, flat % self.out_features, S.reshape(-1)[flat]

    def _entries_plan(self, flat: torch.Tensor) -> SupportPlan:
        return SupportPlan.build(flat // self.out_features, flat % self.out_features, self.in_features, self.out_features)

    def _nonzero_plan(self, S: torch.Tensor) -> tuple[SupportPlan, torch.Tensor] | None:
        """(plan, values) of the non-zero entries of a dense S, or None when it is zero."""
        flat = S.reshape(-1).nonzero().squeeze(1)
        return (self._entries_plan(flat), S.reshape(-1)[flat]) if flat.numel() else None

    def trained_plan(self):
        return self._nonzero_plan(self.delta.detach())

    @torch.no_grad()
    def set_trained(self, values: torch.Tensor) -> None:
        self._pending.append((torch.arange(self.delta.numel(), device=self.delta.device),
                              self.delta.detach().reshape(-1).clone()))
        super().set_trained(values)

    def take_change(self, check=True):
        if not self._pending:  # nothing handed out since the last fold (S written in place otherwise: set_trained)
            return None
        flat, diff, before = self.take_pending(self.delta.detach())
        if check or self.weight.dtype in LOW_PRECISION:  # only the entries that moved (read back)
            moved = diff.ne(0)
            if not bool(moved.any()):
                return None
            flat, diff, before = flat[moved], diff[moved], before[moved]
        return Change(None, diff, before, flat)

    def take_pending(self, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sorted flat indices, S - S_before, S_before) of the entries handed out since the last fold; the
        record is cleared. S: the layer's dense S (sharded: this rank's rows). An entry handed out twice
        (accumulation) was recorded twice with one value: its second record's change is zero. Static
        shapes: nothing is read back."""
        flat = torch.cat([f for f, _ in self._pending] or [torch.zeros(0, dtype=torch.long, device=S.device)])
        before = torch.cat([v for _, v in self._pending] or [S.new_zeros(0)])
        self._pending.clear()
        flat, order = flat.sort()
        before = before[order]
        diff = S.reshape(-1)[flat] - before
        repeated = torch.cat((flat.new_zeros(1, dtype=torch.bool), flat[1:] == flat[:-1]))[:flat.numel()]
        return flat, diff.masked_fill_(repeated, 0), before

    def forget_folded(self) -> None:
        flat = self.delta.detach().reshape(-1).nonzero().squeeze(1)
        self._pending = [(flat, self.delta.new_zeros(flat.numel()))] if flat.numel() else []

    def _set_entries(self, rows, cols, values) -> None:
        if rows.numel() > self.delta.numel():
            raise ValueError(f"{rows.numel()} entries do not fit a {self.in_features}x{self.out_features} layer")
        self.delta.data.zero_()
        self.delta.data[rows, cols] = values.to(self.delta.dtype)

    def folded_plan(self, change):
        folded = self.delta.detach().clone().reshape(-1)  # S before the change: a transient copy
        folded[change.flat] = change.before
        return self._nonzero_plan(folded)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # a state dict holds S with the weight it folds to (saving syncs first): nothing is pending
        self._pending.clear()

    def _sparse_topk(self, full: torch.Tensor) -> torch.Tensor:
        """The exact top-k entries of `full` (d_in, d_out) as a sparse gradient; their values of S are recorded."""
        flat = torch.topk(full.reshape(-1).abs(), self.k, sorted=False).indices.sort().values
        self._pending.append((flat, self.delta.detach().reshape(-1)[flat]))
        return sparse_entries(flat, full.reshape(-1)[flat].to(self.delta.dtype), full.shape)

    def gradient_left_whole(self) -> bool:
        grad = self.delta.grad  # cut: a sparse gradient, or (sharded) its entries recorded as pending
        return grad is not None and not self.topk_in_backward and not grad.is_sparse and not self._pending

    @torch.no_grad()
    def sparsify_grad(self) -> None:
        """With topk_in_backward=False: the top-k of the complete (accumulated, all-reduced) gradient."""
        grad = self.delta.grad
        if grad is not None and self.sharded:  # this rank's rows of the reduced gradient: the global top-k
            keep = keep_global_topk(grad, self.k)
            self._pending.append((keep, self.delta.detach().to_local().reshape(-1)[keep]))
        elif grad is not None:
            self.delta.grad = self._sparse_topk(grad.to_dense() if grad.is_sparse else grad)

    def _trainable_grad(self, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        # the full transformed gradient U G V^T, then its exact top-k
        basis_dtype = self.U.dtype
        t, d_in, d_out = x.shape[0], self.in_features, self.out_features
        dense_first = t * d_in * d_out + d_in * d_in * d_out + d_in * d_out * d_out
        rotate_acts = t * d_in * d_in + t * d_out * d_out + t * d_in * d_out
        if dense_first <= rotate_acts:
            g = (x.t() @ dy).to(basis_dtype)  # (d_in, t) @ (t, d_out)
            s = self.U @ g @ self.V.t()  # (d_in, d_in) @ (d_in, d_out) @ (d_out, d_out)
        else:  # few tokens: (x U^T)^T (dy V^T)
            s = (x.to(basis_dtype) @ self.U.t()).t() @ (dy.to(basis_dtype) @ self.V.t())
        # deferred: the complete gradient is summed (accumulation, all-reduce), then cut in sparsify_grad
        return self._sparse_topk(s) if self.topk_in_backward else s.to(self.delta.dtype)


LAYER_CLASSES: dict[str, type[SparseLinear]] = {
    "fixed": FixedSparseGradLinear,
    "dynamic": DynamicSparseGradLinear,
    "meprop": MePropLinear,
}
MODES = tuple(LAYER_CLASSES)


def layer_class(mode: str) -> type[SparseLinear]:
    """The layer class of a mode: "fixed", "dynamic" (SparseGrad) or "meprop" (the baseline)."""
    if mode not in LAYER_CLASSES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    return LAYER_CLASSES[mode]
