"""One optimizer for a SparseGrad model: AdamW for dense parameters, lazy AdamW for sparse ones.

Groups marked ``lazy`` (the `dynamic` delta, the `meprop` weight) update only the
entries whose gradient is non-zero this step -- moments, weight decay and all --
as torch.optim.SparseAdam does, and hold moments only for the entries that ever had a
gradient (a sorted index beside them): a top-k method's optimizer state grows with
what it trained, not with the weight. The `fixed` mode's values are a dense vector
and use the ordinary update, so their state is O(k).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .layer import FixedSparseGradLinear
from .model import sparse_layers


class SparseAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) with optional lazy groups.

    Sparse COO gradients are accepted in lazy groups too.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        lazy: bool = False,
    ) -> None:
        if not lr >= 0:
            raise ValueError(f"lr={lr} must be >= 0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas={betas} must lie in [0, 1)")
        if not eps >= 0 or not weight_decay >= 0:
            raise ValueError(f"eps={eps} and weight_decay={weight_decay} must be >= 0")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "lazy": lazy})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                p, grad = _local(param), _local(param.grad)  # sharded (FSDP2): this rank's shard, its own state
                if grad.is_sparse and not group["lazy"]:
                    raise RuntimeError("a sparse gradient reached a dense group of SparseAdamW; put it in a lazy group")
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    if group["lazy"]:  # moments of the entries in `index` (sorted flat indices) only
                        state["index"] = torch.zeros(0, dtype=torch.long, device=p.device)
                        state["exp_avg"] = p.new_zeros(0)
                        state["exp_avg_sq"] = p.new_zeros(0)
                    else:
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = float(state["step"])
                bias1, bias2 = 1 - beta1**step, 1 - beta2**step
                if group["lazy"]:
                    self._lazy_update(p, grad, state, lr, beta1, beta2, eps, wd, bias1, bias2)
                else:
                    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                    p.mul_(1 - lr * wd)
                    exp_avg.lerp_(grad, 1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(eps)
                    p.addcdiv_(exp_avg, denom, value=-lr / bias1)
        return loss

    @staticmethod
    def _lazy_update(p, grad, state, lr, beta1, beta2, eps, wd, bias1, bias2) -> None:
        flat_idx, g = _flat_gradient(p, grad)
        if flat_idx.numel() == 0:
            return
        pos = _moment_positions(state, flat_idx)
        m = state["exp_avg"][pos].lerp_(g, 1 - beta1)
        v = state["exp_avg_sq"][pos].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        state["exp_avg"][pos], state["exp_avg_sq"][pos] = m, v
        p_flat = p.view(-1)
        w = p_flat[flat_idx].mul_(1 - lr * wd)
        w.addcdiv_(m, (v.sqrt() / math.sqrt(bias2)).add_(eps), value=-lr / bias1)
        p_flat[flat_idx] = w

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating-point state to the parameter's dtype: keep the lazy moments' index integral
        state_dict = {**state_dict, "state": {k: dict(v) for k, v in state_dict["state"].items()}}
        indices = {k: s.pop("index") for k, s in state_dict["state"].items() if "index" in s}
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for k, index in indices.items():
            self.state[params[k]]["index"] = index.to(params[k].device, torch.long)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a tensor sharded by FSDP2 (a DTensor), else the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _flat_gradient(p: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices, values) of a gradient's non-zero entries, dense or sparse COO."""
    if grad.is_sparse:
        grad = grad.coalesce()
        idx = grad.indices()
        flat_idx = torch.zeros(idx.shape[1], dtype=torch.long, device=idx.device)
        for dim, size in enumerate(p.shape):
            flat_idx = flat_idx * size + idx[dim]
        return flat_idx, grad.values().reshape(-1)
    flat_idx = grad.reshape(-1).nonzero().squeeze(1)
    return flat_idx, grad.reshape(-1)[flat_idx]


def _moment_positions(state: dict, flat_idx: torch.Tensor) -> torch.Tensor:
    """Positions of `flat_idx` in the lazy moments, adding zero moments for entries seen the first time."""
    index = state["index"]
    pos = torch.searchsorted(index, flat_idx)
    known = pos < index.numel()
    known[known.clone()] = index[pos[known]] == flat_idx[known]
    if not bool(known.all()):
        index, order = torch.cat((index, flat_idx[~known])).sort()
        for key in ("exp_avg", "exp_avg_sq"):
            grown = torch.cat((state[key], state[key].new_zeros(int((~known).sum()))))
            state[key] = grown[order]
        state["index"] = index
        pos = torch.searchsorted(index, flat_idx)
    return pos


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (2-norm) for gradients that may be sparse (the `dynamic`
    mode's top-k); returns the total norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()  # scaled through its values below
    grads = [_local(p.grad) for p in params]
    entries = [g.values() if g.is_sparse else g for g in grads]
    norms = [torch.linalg.vector_norm(e, dtype=torch.promote_types(e.dtype, torch.float32)) for e in entries]
    squares = torch.stack([n.to(norms[0].device) for n in norms]) ** 2
    sharded = torch.tensor([isinstance(p.grad, DTensor) for p in params], device=squares.device)
    total_sq = squares[~sharded].sum()
    if bool(sharded.any()):  # sharded gradients: the squares of every rank's shards, summed over the ranks
        shard_sq = squares[sharded].sum()
        dist.all_reduce(shard_sq, group=next(p.grad for p in params if isinstance(p.grad, DTensor)).device_mesh.get_group())
        total_sq = total_sq + shard_sq
    total = total_sq.sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        (g.values() if g.is_sparse else g).mul_(scale.to(g.device, g.dtype))
    return total


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or name.endswith("bias") or "norm" in name.lower()


def optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0, **adam_kwargs) -> SparseAdamW:
    """The optimizer for a model converted by sparsegrad.apply (or any model).

    AdamW for ordinary trainable parameters (no weight decay on biases and norms),
    lazy AdamW for the `dynamic` and `meprop` sparse gradients, plain AdamW on
    the `fixed` values (decay pulls them to 0: towards the pretrained weight).
    `adam_kwargs`: betas, eps.
    """
    unknown = set(adam_kwargs) - {"betas", "eps"}
    if unknown:
        raise TypeError(f"unsupported optimizer arguments {sorted(unknown)}; sparsegrad.optimizer takes betas and eps")
    layers = sparse_layers(model).values()
    values = {id(m.trainable) for m in layers if isinstance(m, FixedSparseGradLinear)}
    lazy = {id(m.trainable) for m in layers} - values
    groups = {"sparse_lazy": [], "decay": [], "no_decay": []}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in lazy:
            groups["sparse_lazy"].append(p)
        elif id(p) in values or not _no_decay(name, p):
            groups["decay"].append(p)
        else:
            groups["no_decay"].append(p)
    if not seen:
        raise ValueError("the model has no trainable parameters: unfreeze some, or call sparsegrad.apply first")
    param_groups = [
        {"params": ps, "name": name, "lazy": name == "sparse_lazy", "weight_decay": 0.0 if name == "no_decay" else weight_decay}
        for name, ps in groups.items()
        if ps
    ]
    opt = SparseAdamW(param_groups, lr=lr, weight_decay=weight_decay, **adam_kwargs)
    if any(layer.sharded for layer in layers):  # FSDP2: each step's change of S is folded into the shards at once
        from .sharding import fold

        opt.register_step_post_hook(lambda *_: fold(model))
    return opt
