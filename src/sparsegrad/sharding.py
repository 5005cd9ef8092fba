"""Sharded data parallelism with FSDP2 (`torch.distributed.fsdp.fully_shard`), SparseGrad kept exact.

    sparsegrad.apply(model, bases, density=0.01)     # on every rank, with the same bases
    sparsegrad.shard(model)                          # each transformer block, then the root
    opt = sparsegrad.optimizer(model, lr=1e-4)       # after sharding: it holds this rank's shards
    loss.backward()
    sparsegrad.sparsify_gradients(model)             # meprop: the global top-k (dynamic: the step cuts it too)
    opt.step(); opt.zero_grad()                      # the step's change of S is folded right after (folding.py)

Every process holds 1/N of each weight (rows of W, d_out), frozen or not, and 1/N of S's trained
tensor (fixed: the (k,) values; dynamic: rows of the dense (d_in, d_out) S), of its gradient (FSDP
reduce-scatters it) and of its optimizer state. What keeps the method exact:

- the fold (ShardedFold, the rule `shard` gives each layer; folding.py calls it after the optimizer step,
  any optimizer, on every rank alike): every rank takes the step's change dS of the whole layer and adds
  its own rows of the update, W[lo:hi] += (U^T dS V[:, lo:hi])^T: no rank forms rows of W it does not own;
- the top-k (dynamic, meprop): the k largest entries of the complete, reduced gradient over all
  shards -- each shard's own k largest are the candidates, gathered, and the k largest kept;
- the bases: shared buffers, not sharded, held once per role on every rank (the same on all).

FSDP2 all-gathers a module's parameters in one dtype, and S (float32) would share the group of a
bfloat16 weight: while sharded, S's tensor lives in a child module of its layer (`sharded_trainable`,
an FSDP group of its own). State dicts keep the unsharded names (`<layer>.values`), so checkpoints
and adapters are the same sharded or not; `full_state_dict` gathers one onto every rank's CPU.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from . import support
from .collectives import all_gather_cat, shard_rows
from .folding import Change, FoldRule, rebuild
from .model import defer_topk, sparse_layers
from .sparse_linear import LOW_PRECISION

HOLDER = "sharded_trainable"


class ShardedTrainable(nn.Module):
    """The trained tensor of one SparseGrad layer while the model is sharded: an FSDP group of its own."""

    def __init__(self, name: str, param: nn.Parameter) -> None:
        super().__init__()
        self.name = name
        self.register_parameter(name, param)

    def forward(self) -> torch.Tensor:  # through FSDP's hooks: the all-gathered tensor, its gradient reduce-scattered
        return self._parameters[self.name]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules of the classes transformers names in `_no_split_modules`
    (LlamaDecoderLayer, BertLayer, ...), else the members of its longest nn.ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard(model: nn.Module, *, mesh=None, reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model` in place with FSDP2 over `mesh` (default: every process of the default group):
    each transformer block is one FSDP group, the rest of the model the root's. Call it after
    sparsegrad.apply (or peft's LoRA) and before building the optimizer; return `model`."""
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise RuntimeError("sparsegrad.shard needs torch.distributed: launch with torchrun (or accelerate launch) "
                           "and call torch.distributed.init_process_group first")
    defer_topk(model)  # the top-k of the reduced gradient, never of one rank's
    for layer in sparse_layers(model).values():
        if not layer.trains_weight:  # S's tensor into its own FSDP group (see the module's notes)
            name = "values" if "values" in layer._parameters else "delta"
            holder = ShardedTrainable(name, layer._parameters.pop(name))
            layer.add_module(HOLDER, holder)
            fully_shard(holder, mesh=mesh, reshard_after_forward=reshard_after_forward)
            layer._register_state_dict_hook(_unsharded_names)
            layer._register_load_state_dict_pre_hook(_sharded_names, with_module=True)
        layer.sharded = True
        if hasattr(layer, "fold_rule"):  # SparseGrad's layers (MeProp's weight is what it trains)
            layer.fold_rule = SHARDED
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"found no transformer blocks in {type(model).__name__} to shard: it names no "
                         "_no_split_modules and holds no nn.ModuleList")
    for block in blocks:
        for module in _other_dtype_modules(block):  # e.g. LoRA's float32 factors in a bfloat16 block
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def _other_dtype_modules(block: nn.Module) -> list[nn.Module]:
    """The modules in `block` whose own parameters are of another dtype than most of the block's
    (FSDP2 gathers a group in one dtype): each becomes a group of its own."""
    sizes: dict[torch.dtype, int] = {}
    for p in block.parameters():
        sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    if len(sizes) < 2:
        return []
    common = max(sizes, key=sizes.get)
    return [m for m in block.modules() if m is not block and not isinstance(m, ShardedTrainable)
            and any(p.dtype != common for p in m.parameters(recurse=False))]


def _unsharded_names(module, state_dict, prefix, local_metadata) -> None:
    """A sharded layer's state as the unsharded layer's: S under its own name, and a low-precision
    weight's kept pretrained entries (w0, this rank's rows) gathered into the whole weight's (collective)."""
    holder = module._modules[HOLDER]
    key = f"{prefix}{HOLDER}.{holder.name}"
    if key in state_dict:
        state_dict[prefix + holder.name] = state_dict.pop(key)
    if prefix + "w0_index" in state_dict:  # this rank's kept entries (indices into its rows) -> the whole weight's
        lo, _ = shard_rows(module.weight)
        index, value = all_gather_cat([module.w0_index.long() + lo * module.in_features, module.w0_value],
                                      module.weight.device_mesh.get_group())
        state_dict[prefix + "w0_index"], state_dict[prefix + "w0_value"] = index.to(module.w0_index.dtype), value


def _sharded_names(module, state_dict, prefix, *args) -> None:
    """An unsharded layer's state into a sharded one: S to its holder, and of the whole weight's kept
    pretrained entries this rank's rows' (indices into its rows)."""
    holder = module._modules[HOLDER]
    if prefix + holder.name in state_dict:
        state_dict[f"{prefix}{HOLDER}.{holder.name}"] = state_dict.pop(prefix + holder.name)
    if module.w0_index is not None and prefix + "w0_index" in state_dict:
        lo, hi = shard_rows(module.weight)
        index, value = state_dict[prefix + "w0_index"].long(), state_dict[prefix + "w0_value"]
        mine = (index >= lo * module.in_features) & (index < hi * module.in_features)
        state_dict[prefix + "w0_index"] = (index[mine] - lo * module.in_features).to(module.w0_index.dtype)
        state_dict[prefix + "w0_value"] = value[mine]
        for name in ("w0_index", "w0_value"):  # as many as this rank's rows keep
            setattr(module, name, torch.empty_like(state_dict[prefix + name], device=module.w0_index.device))


# ---------------------------------------------------------------- the fold of a sharded layer
class ShardedFold(FoldRule):
    """Every rank takes the change of the whole S -- the k values (fixed) or the changed entries (dynamic),
    gathered from the ranks that own them -- and adds its own rows lo:hi of the update,
    W[lo:hi] += (U^T dS V[:, lo:hi])^T (V's columns lo:hi are a view); a low-precision weight rebuilds its
    rows. Collective: the layers fold in the same order on every rank."""

    name = "SHARDED"

    def fold(self, layers, check):
        for layer in layers:
            change = _whole_change(layer, check)
            if change is None:
                continue
            lo, hi = shard_rows(layer.weight)
            weight = layer.weight.to_local()
            if weight.dtype in LOW_PRECISION:
                rebuild(layer, *_whole_plans(layer, change), weight=weight, rows=(lo, hi))
            else:
                plan = change.plan
                support.fold([weight], plan, change.diff, *plan.sides(layer.U, layer.V[:, lo:hi]))

    def unfold(self, layer):
        raise NotImplementedError("a sharded layer keeps S folded (peft's adapter switching runs unsharded)")


SHARDED = ShardedFold()


def _whole_change(layer: nn.Module, check: bool) -> Change | None:
    """The change of the whole S since the last fold, the same on every rank (collective), or None."""
    if layer.mode == "fixed":
        return layer.take_change(check, values=layer.values.detach().full_tensor())  # this rank holds k / N
    S = layer.delta.detach()
    flat, diff, before = layer.take_pending(S.to_local())  # flat indices into this rank's rows of S
    moved = diff.ne(0)
    offset = shard_rows(S)[0] * layer.out_features
    flat, diff, before = all_gather_cat([flat[moved] + offset, diff[moved], before[moved]], S.device_mesh.get_group())
    if flat.numel() == 0:
        return None
    return Change(layer._entries_plan(flat), diff, before, flat)


def _whole_plans(layer: nn.Module, change: Change) -> tuple:
    """(folded, trained) (plan, values) of the whole S around `change`, for a low-precision rebuild (collective)."""
    if layer.mode == "fixed":
        return (change.plan, change.before), (change.plan, change.before + change.diff)
    rows, cols, values = layer.trained_entries()  # every rank's non-zero entries of S, gathered
    flat, inverse = torch.unique(torch.cat([rows * layer.out_features + cols, change.flat]), return_inverse=True)
    now = values.new_zeros(flat.numel()).index_copy_(0, inverse[:values.numel()], values)
    before = now.clone().index_copy_(0, inverse[values.numel():], change.before)
    plan = layer._entries_plan(flat)
    return (plan, before), (plan, now)


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every sharded tensor gathered whole, on the CPU of every rank.
    Collective (each tensor is all-gathered in turn): call it on every rank."""
    out = {}
    for key, value in model.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        out[key] = value.detach().cpu()
    return out


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]):
    """Load an unsharded state dict (as full_state_dict gives, or an unsharded model's) into a sharded
    model, not strictly: each rank takes its own rows of each sharded tensor. Returns (missing, unexpected)."""
    current = model.state_dict()
    local = {}
    for key, value in state_dict.items():
        target = current.get(key)
        if isinstance(target, DTensor):
            lo, hi = shard_rows(target)
            value = DTensor.from_local(value[lo:hi].to(target.device, target.dtype), target.device_mesh,
                                       target.placements, shape=target.shape, stride=target.stride())
        local[key] = value
    return model.load_state_dict(local, strict=False)
