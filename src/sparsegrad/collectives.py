"""The collectives behind sharded layers (sharding.py): which rows a rank holds, gathers of
different lengths, and the exact top-k of a tensor sharded over the ranks."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard


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
def keep_global_topk(grad: DTensor, k: int) -> torch.Tensor:
    """Zero all but the global top-k entries of a sharded gradient, in place; return their local flat indices."""
    local = grad.to_local()
    lo, _ = shard_rows(grad)
    keep = global_topk(local, k, lo * local.shape[1], grad.device_mesh.get_group())
    kept = local.reshape(-1)[keep]
    local.zero_()
    local.view(-1)[keep] = kept
    return keep
