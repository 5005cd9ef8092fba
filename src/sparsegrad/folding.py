"""The fold: the trained change of S into the merged weight -- when, once after each optimizer step from
one place, and how, by a rule chosen once per layer.

When. A SparseGrad layer keeps W_0 + U^T S V merged in `weight`, so its forward pass is nn.Linear's. An
optimizer step changes S; the change must reach `weight` before the next forward. It is folded right
after the step, by a hook that torch calls after the step of every optimizer
(`torch.optim.optimizer.register_optimizer_step_post_hook`): sparsegrad.optimizer, torch's own, the
Trainer's, accelerate's -- each layer whose S the optimizer holds, and which had a gradient, folds.
Forward reads nothing to decide whether to fold, so a step never waits for the device and a compiled
forward holds no check. Writes to S outside an optimizer step (loading, `layer.set_trained`, a user's own
in-place edits) fold through `set_trained`, `load_state_dict`, or `fold(model)`; `state_dict()` and merging
fold what is pending too, so what is saved is always current.

How. Each layer holds one rule (`layer.fold_rule`), chosen when its weight's dtype or placement is set:
  - IN_PLACE, float32 / float64 weights: W += U^T dS V, the step's change. The layers of one role share U
    and V, so they fold together: one sparse and one batched dense product (support.fold), not two per layer;
    block supports fold layer by layer in dense products (a GEMM beats the sparse product at their density).
  - REBUILD, bfloat16 / float16 weights: W = round(W_0 + U^T S V), the sum evaluated in float32 and rounded
    once. Adding each step's change to a bfloat16 weight instead would round once per step: small updates
    would vanish and the error would grow with the steps. W_0 is not stored: it is given back by the weight
    itself, W_0 = round(W - U^T S_old V), which holds for all but a few entries (where the last rounding
    crossed a power of two, or tied); each rebuild checks every entry and keeps the pretrained value of those
    few (the layer's `w0_index`, `w0_value`). No float32 or second copy of the weight is kept.
  - sharding.SHARDED, a layer sharded by FSDP2: each rank folds its own rows of W (collective).
What changed since the last fold is the layer's record (`layer.take_change`); the rules only apply it.
"""
from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.profiler import record_function
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from . import support
from .sparse_linear import LOW_PRECISION
from .support import SupportPlan

_LAYERS: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()
_SERIAL = itertools.count()
_HOOKS = None


def register(layer: nn.Module) -> None:
    """Fold `layer` after every optimizer step that updates its S, and cut its gradient before it where it
    was left whole (called by the constructors of SparseGrad's layers; MePropLinear's, for the cut only). Layers go in the order they were built: the same
    on every rank, as the sharded fold's and top-k's collectives need."""
    global _HOOKS
    _LAYERS[next(_SERIAL)] = layer
    if _HOOKS is None:
        _HOOKS = register_optimizer_step_pre_hook(_before_step), register_optimizer_step_post_hook(_after_step)


def _stepped(optimizer: torch.optim.Optimizer) -> list[nn.Module]:
    """The layers, in build order, whose S this optimizer holds and that have a gradient."""
    if not _LAYERS:  # every SparseGrad layer is gone
        return []
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [layer for _, layer in sorted(_LAYERS.items()) if id(layer.trainable) in held
            and layer.trainable.grad is not None]


def _before_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    # A top-k layer (dynamic, MeProp) that leaves its gradient whole (deferred top-k: summed over micro-batches, reduced
    # over ranks) and that no one cut (sparsegrad.sparsify_gradients, SparseGradCallback): its top-k now,
    # so that no optimizer ever trains every entry of S.
    for layer in _stepped(optimizer):
        if layer.gradient_left_whole():
            layer.sparsify_grad()


def _after_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    # a parameter without a gradient did not move: nothing to read on the device to know what to fold
    moved = [layer for layer in _stepped(optimizer) if hasattr(layer, "fold_rule")]  # (MeProp's weight is itself)
    if moved:
        fold_layers(moved, check=False)


def fold(model: nn.Module) -> None:
    """Fold every change of S not yet in the weights of `model`'s SparseGrad layers (after writing S
    in place yourself). Collective when the model is sharded: every rank calls it."""
    from .layer import SparseGradLinear

    fold_layers([m for m in model.modules() if isinstance(m, SparseGradLinear)])


@torch.no_grad()
def fold_layers(layers: list[nn.Module], check: bool = True) -> None:
    """Fold each layer's change of S since its last fold by its rule, in the given order (the sharded rule's
    collectives need the same order on every rank). check=False: fold what may have changed without looking
    on the device (after an optimizer step that updated S)."""
    by_rule: dict[FoldRule, list[nn.Module]] = {}
    for layer in layers:
        if not layer.unfolded:
            by_rule.setdefault(layer.fold_rule, []).append(layer)
    for rule, members in by_rule.items():
        with record_function("sparsegrad.fold"), torch.autocast(members[0].weight.device.type, enabled=False):
            rule.fold(members, check)


# ---------------------------------------------------------------- the rules
@dataclass
class Change:
    """What changed in S since the last fold: diff = S - S_folded at the plan's entries (caller order);
    `before` holds S_folded there, `flat` their sorted flat indices (None: the fixed support, in its order;
    dynamic: no plan, the entries fold over every row, SupportPlan.every_row)."""

    plan: SupportPlan | None
    diff: torch.Tensor
    before: torch.Tensor
    flat: torch.Tensor | None = None


class FoldRule:
    """How a layer's change of S reaches its weight. One instance per rule: copies and pickles refer to it."""

    name = ""

    def fold(self, layers: list[nn.Module], check: bool) -> None:
        """Fold what changed in each layer's S since its last fold."""
        raise NotImplementedError

    def unfold(self, layer: nn.Module) -> None:
        """Take all of S out of the weight (weight = W_0)."""
        raise NotImplementedError

    def __reduce__(self) -> str:
        return self.name


class InPlace(FoldRule):
    """float32 / float64: W += U^T dS V; the layers of one role (and one orientation) in one batched product."""

    name = "IN_PLACE"
    batch_elements = 2**25  # at most this many weight entries per batched product (its (L, d_out, d_in) update)

    def fold(self, layers, check):
        roles: dict[tuple, list] = {}
        for layer in layers:
            change = layer.take_change(check)
            if change is not None:
                # one role: the same two tensors (one SharedBases, or the same U and V given to each layer)
                key = (id(layer.U), id(layer.V), layer.mode, layer.weight.dtype, change.plan and change.plan.transposed)
                roles.setdefault(key, []).append((layer, change))
        for members in roles.values():
            first = members[0][0]
            per = max(1, self.batch_elements // (first.in_features * first.out_features))
            for i in range(0, len(members), per):
                batch, changes = zip(*members[i:i + per])
                if all(c.plan is not None and c.plan.block_cols is not None for c in changes):
                    for layer, change in zip(batch, changes):  # block supports: dense products, layer by layer
                        support.fold([layer.weight.data], change.plan, change.diff, *change.plan.sides(first.U, first.V))
                    continue
                values = torch.cat([c.diff for c in changes])
                if changes[0].plan is not None:  # fixed: the supports' plans, stacked once
                    plan = _stacked([c.plan for c in changes])
                else:  # dynamic: the handed-out entries, over every row of the smaller side
                    size = first.in_features * first.out_features
                    plan = SupportPlan.every_row(torch.cat([c.flat + j * size for j, c in enumerate(changes)]),
                                                 first.in_features, first.out_features, len(changes))
                support.fold([layer.weight.data for layer in batch], plan, values, *plan.sides(first.U, first.V))

    def unfold(self, layer):
        trained = layer.trained_plan()
        if trained is not None:
            plan, values = trained
            support.fold([layer.weight.data], plan, -values, *plan.sides(layer.U, layer.V))


class Rebuild(FoldRule):
    """bfloat16 / float16: W = round(W_0 + U^T S V), exact after any number of steps (see the module's notes).

    One layer at a time: W_0 comes back only if each rebuild recomputes the last one's float32 D bit for bit,
    and a batched product whose batch changes from step to step (a layer without a change sits one out) does
    not promise the same bits for the same layer."""

    name = "REBUILD"

    def fold(self, layers, check):
        for layer in layers:
            change = layer.take_change(check)
            if change is not None:
                rebuild(layer, layer.folded_plan(change), layer.trained_plan())

    def unfold(self, layer):
        rebuild(layer, layer.trained_plan(), None)


IN_PLACE, REBUILD = InPlace(), Rebuild()


def rule_for(dtype: torch.dtype) -> FoldRule:
    """The rule of an unsharded layer whose weight has `dtype`."""
    return REBUILD if dtype in LOW_PRECISION else IN_PLACE


_STACKS: OrderedDict[tuple[int, ...], tuple[tuple[SupportPlan, ...], SupportPlan]] = OrderedDict()


def _stacked(plans: list[SupportPlan]) -> SupportPlan:
    """SupportPlan.stack(plans), kept while the same plans come back (the fixed supports: every step)."""
    if len(plans) == 1:
        return plans[0]
    key = tuple(map(id, plans))
    hit = _STACKS.get(key)
    if hit is None or any(a is not b for a, b in zip(hit[0], plans)):
        hit = _STACKS[key] = (tuple(plans), SupportPlan.stack(plans))
        while len(_STACKS) > 16:  # a few models' roles; older stacks go
            _STACKS.popitem(last=False)
    return hit[1]


def delta(layer: nn.Module, trained: tuple[SupportPlan, torch.Tensor] | None, rows: tuple[int, int] | None = None
          ) -> torch.Tensor:
    """U^T S V of `layer` in weight orientation (d_out, d_in), or its rows lo:hi, float32, S holding the
    (plan, values) `trained` (None: zero); the same bits for the same S."""
    lo, hi = rows or (0, layer.out_features)
    out = torch.zeros(hi - lo, layer.in_features, dtype=torch.float32, device=layer.U.device)
    if trained is not None:
        plan, values = trained
        support.fold([out], plan, values.float(), *plan.sides(layer.U.float(), layer.V.float()[:, lo:hi]))
    return out


def rebuild(layer: nn.Module, folded, trained, weight: torch.Tensor | None = None,
            rows: tuple[int, int] | None = None) -> None:
    """weight = round(W_0 + U^T S V), the sum in float32 and rounded once: exact after any number of steps.

    folded, trained: (plan, values) of S as last folded and as now (None: zero). W_0 comes back from the
    weight: W = round(W_0 + D_old) with D_old = U^T S_old V, so round(W - D_old) = W_0 wherever that rounding
    moved W_0 by less than half a unit of W_0's last place -- every entry but those whose sum crossed a power
    of two or tied. The rebuild checks each entry against the next recovery (which repeats the same float32 D)
    and keeps the pretrained value of the few that would not come back in (w0_index, w0_value).
    weight, rows: a sharded layer's own rows lo:hi of W (its w0 entries index them).
    """
    weight = layer.weight.data if weight is None else weight
    base = (weight.float() - delta(layer, folded, rows)).to(weight.dtype).view(-1)  # W_0, but for the kept entries
    base[layer.w0_index] = layer.w0_value
    change = delta(layer, trained, rows).view(-1)
    new = (base.float() + change).to(weight.dtype)  # rounded once
    lost = ((new.float() - change).to(weight.dtype) != base).nonzero().squeeze(1)
    layer.w0_index, layer.w0_value = lost.to(layer.w0_index.dtype), base[lost]
    weight.view(-1).copy_(new)
