"""Sharded data parallelism with FSDP2 (`torch.distributed.fsdp.fully_shard`), SparseGrad kept exact.

    sparsegrad.apply(model, bases, density=0.01)     # on every rank, with the same bases
    sparsegrad.shard(model)                          # each transformer block, then the root
    opt = sparsegrad.optimizer(model, lr=1e-4)       # after sharding: it holds this rank's shards
    loss.backward()
    sparsegrad.sparsify_gradients(model)             # dynamic / meprop: the global top-k
    opt.step(); opt.zero_grad()                      # the step's change of S is folded by the optimizer

Every process holds 1/N of each weight (rows of W, d_out), frozen or not, and 1/N of S's trained
tensor (fixed: the (k,) values; dynamic: rows of the dense (d_in, d_out) S), of its gradient (FSDP
reduce-scatters it) and of its optimizer state. What keeps the method exact:

- the fold: after the optimizer step (`fold`, which `sparsegrad.optimizer` runs) every rank takes
  the step's change dS of the whole layer -- the k values (fixed) or the changed entries (dynamic),
  gathered from the ranks that own them -- and adds its own rows of the update,
  W[lo:hi] += (U^T dS V[:, lo:hi])^T: no rank forms rows of W that it does not own;
- the top-k (dynamic, meprop): the k largest entries of the complete, reduced gradient over all
  shards -- each shard's own k largest are the candidates, gathered, and the k largest kept;
- the bases: shared buffers, not sharded, held once per role on every rank (the same on all).

FSDP2 all-gathers a module's parameters in one dtype, and S (float32) would share the group of a
bfloat16 weight: while sharded, S's tensor lives in a child module of its layer (`sharded_trainable`,
an FSDP group of its own). State dicts keep the unsharded names (`<layer>.values`), so checkpoints
and adapters are the same sharded or not; `full_state_dict` gathers one onto every rank's CPU.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from .model import defer_topk, sparse_layers
from .sparse_linear import SparseLinear

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
    if prefix + "w0_index" in state_dict:
        lo, _ = shard_rows(module.weight)
        index, value = all_gather_cat([module.w0_index.long() + lo * module.in_features, module.w0_value],
                                      module.weight.device_mesh.get_group())
        state_dict[prefix + "w0_index"], state_dict[prefix + "w0_value"] = index.to(module.w0_index.dtype), value


def local_w0(layer: SparseLinear, state_dict: dict, prefix: str) -> None:
    """The whole weight's kept pretrained entries in a state dict -> this rank's rows' (in place)."""
    lo, hi = shard_rows(layer.weight)
    index, value = state_dict[prefix + "w0_index"].long(), state_dict[prefix + "w0_value"]
    mine = (index >= lo * layer.in_features) & (index < hi * layer.in_features)
    state_dict[prefix + "w0_index"] = (index[mine] - lo * layer.in_features).to(layer.w0_index.dtype)
    state_dict[prefix + "w0_value"] = value[mine]


def _sharded_names(module, state_dict, prefix, *args) -> None:
    holder = module._modules[HOLDER]
    if prefix + holder.name in state_dict:
        state_dict[f"{prefix}{HOLDER}.{holder.name}"] = state_dict.pop(prefix + holder.name)


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


@torch.no_grad()
def fold(model: nn.Module) -> None:
    """Fold the last optimizer step's change of S into each rank's own rows of the weights.
    Collective: every rank calls it (sparsegrad.optimizer does, after each step)."""
    for layer in sparse_layers(model).values():
        layer.sync()


# ---------------------------------------------------------------- shards and collectives

def shard_rows(t: DTensor) -> tuple[int, int]:
    """The rows [lo, hi) of a dim-0 sharded tensor that this rank holds (torch.chunk's split)."""
    if tuple(t.placements) != (Shard(0),):
        raise ValueError(f"expected a tensor sharded along dim 0, got placements {t.placements}")
    mesh = t.device_mesh
    chunk = math.ceil(t.shape[0] / mesh.size())
    lo = min(mesh.get_local_rank() * chunk, t.shape[0])
    return lo, lo + t.to_local().shape[0]


def all_gather_cat(tensors: list[torch.Tensor], group=None) -> list[torch.Tensor]:
    """Each 1-d tensor of `tensors` concatenated over the ranks of `group`, in rank order (lengths may differ)."""
    world = dist.get_world_size(group)
    n = torch.tensor([tensors[0].numel()], device=tensors[0].device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    out = []
    for t in tensors:
        padded = t.new_zeros(max(sizes))
        padded[:t.numel()] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        out.append(torch.cat([p[:s] for p, s in zip(parts, sizes)]))
    return out


def global_topk(local: torch.Tensor, k: int, offset: int, group=None) -> torch.Tensor:
    """Flat indices into `local` (this rank's shard, starting at flat index `offset` of the whole
    tensor) of the whole tensor's k largest |entries|. Exact: each of those is among the k largest
    of its own shard, so gathering every shard's k largest and keeping the k largest finds them."""
    flat = local.reshape(-1)
    values, index = torch.topk(flat.abs(), min(k, flat.numel()), sorted=False)
    values, index = all_gather_cat([values, index + offset], group)
    chosen = index[torch.topk(values, min(k, values.numel()), sorted=False).indices]
    return chosen[(chosen >= offset) & (chosen < offset + flat.numel())] - offset


@torch.no_grad()
def keep_global_topk(layer: SparseLinear, grad: DTensor) -> torch.Tensor:
    """Zero all but the global top-k entries of a sharded gradient, in place; return their local flat indices."""
    local = grad.to_local()
    lo, _ = shard_rows(grad)
    keep = global_topk(local, layer.k, lo * local.shape[1], grad.device_mesh.get_group())
    kept = local.reshape(-1)[keep]
    local.zero_()
    local.view(-1)[keep] = kept
    return keep


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
