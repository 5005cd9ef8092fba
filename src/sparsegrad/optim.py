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
from .readbacks import to_host


class SparseAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) with optional lazy groups.

    Sparse COO gradients are accepted in lazy groups too. A float16 parameter of a dense group is stepped on a
    float32 master copy with float32 moments and rounded once per step, as SparseGrad's own values are kept in
    float32: in float16 the second moment underflows and eps (1e-8) is zero, and plain AdamW gives NaN within
    two steps. (bfloat16 has float32's range and steps in place.)
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
        self._make_room()
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
                    state["step"] = 0  # a host-side count: the bias corrections never read the device
                    if group["lazy"]:
                        state.update(_empty_store(p))
                    else:
                        if p.dtype == torch.float16:  # see the class's notes
                            state["master"] = p.detach().float()
                        kept = state.get("master", p)
                        state["exp_avg"] = torch.zeros_like(kept, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(kept, memory_format=torch.preserve_format)
                state["step"] = step = int(state["step"]) + 1
                bias1, bias2 = 1 - beta1**step, 1 - beta2**step
                if group["lazy"]:
                    self._lazy_update(p, grad, state, lr, beta1, beta2, eps, wd, bias1, bias2)
                else:
                    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                    master = state.get("master")  # float16: the step on a float32 copy, then rounded once
                    target, grad = (p, grad) if master is None else (master, grad.float())
                    target.mul_(1 - lr * wd)
                    exp_avg.lerp_(grad, 1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(eps)
                    target.addcdiv_(exp_avg, denom, value=-lr / bias1)
                    if master is not None:
                        p.copy_(master)
        return loss

    def _make_room(self) -> None:
        """Grow the lazy stores that this step's entries could overflow; their counts in use are read
        back together, once (see _grow): no read-back at all on most steps."""
        short = []
        for group in self.param_groups:
            for param in group["params"] if group["lazy"] else ():
                state, grad = self.state[param], param.grad
                if grad is None or not state:
                    continue
                grad = _local(grad)
                if not grad.is_sparse:
                    continue  # a dense gradient's entries are counted when its support is read back
                entries = grad._nnz()
                if state["bound"] + entries > state["index"].numel():
                    short.append((state, entries, _local(param).numel()))
        if short:
            used = to_host(torch.stack([_in_use(s, n).sum() for s, _, n in short]))
            for (state, entries, numel), count in zip(short, used):
                _grow(state, count, entries, numel)

    @staticmethod
    def _lazy_update(p, grad, state, lr, beta1, beta2, eps, wd, bias1, bias2) -> None:
        flat_idx, g = _flat_gradient(p, grad)  # (e,): entries may repeat (an uncoalesced sparse gradient)
        if flat_idx.numel() == 0:
            return
        pos = _store_positions(state, flat_idx, p.numel())
        # a repeated entry's gradient is the sum of its parts; every occurrence then computes the same
        # new values, so the writes below agree whichever lands last
        g = torch.zeros_like(state["exp_avg"]).index_add_(0, pos, g)[pos]
        m = state["exp_avg"][pos].lerp_(g, 1 - beta1)
        v = state["exp_avg_sq"][pos].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        state["exp_avg"].index_put_((pos,), m)
        state["exp_avg_sq"].index_put_((pos,), v)
        p_flat = p.view(-1)
        w = p_flat[flat_idx].mul_(1 - lr * wd)
        w.addcdiv_(m, (v.sqrt() / math.sqrt(bias2)).add_(eps), value=-lr / bias1)
        p_flat.index_put_((flat_idx,), w)

    def reserve(self, param: torch.Tensor, entries: int) -> None:
        """Make room in `param`'s lazy store for `entries` more entries (reads its count back once): the
        steps that fill it then read nothing back at all."""
        state = self.state[param]
        if not state:
            state.update(_empty_store(_local(param)), step=0)
        numel = _local(param).numel()
        _grow(state, to_host(_in_use(state, numel).sum()), entries, numel)

    def lazy_entries(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(flat indices, exp_avg, exp_avg_sq) of the entries a lazy group holds moments for (reads the device)."""
        state = self.state[param]
        used = _in_use(state, _local(param).numel())
        return state["index"][used], state["exp_avg"][used], state["exp_avg_sq"][used]

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating-point state to the parameter's dtype: keep the lazy moments' index integral,
        # and a float16 parameter's master copy and moments float32
        _check_groups(state_dict["param_groups"], self.param_groups)
        state_dict = {**state_dict, "state": {k: dict(v) for k, v in state_dict["state"].items()}}
        indices = {k: s.pop("index") for k, s in state_dict["state"].items() if "index" in s}
        kept = {k: {name: s.pop(name) for name in ("master", "exp_avg", "exp_avg_sq")}
                for k, s in state_dict["state"].items() if "master" in s}
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for k, index in indices.items():
            state = self.state[params[k]]
            state["index"] = index.to(params[k].device, torch.long)
            state.setdefault("bound", index.numel())
        for k, tensors in kept.items():
            self.state[params[k]].update({name: t.to(params[k].device, torch.float32) for name, t in tensors.items()})
        for state in self.state.values():  # saved by a version that kept the count on the device
            if torch.is_tensor(state.get("step")):
                state["step"] = int(state["step"])


def _check_groups(saved: list[dict], groups: list[dict]) -> None:
    """A checkpoint's groups must be this optimizer's: a lazy group appears or goes when the mode changes."""
    names = [[g.get("name", i) for i, g in enumerate(gs)] for gs in (saved, groups)]
    lazy = [any(g.get("lazy") for g in gs) for gs in (saved, groups)]
    if lazy[0] != lazy[1]:
        was, now = ("dynamic or meprop", "fixed") if lazy[0] else ("fixed", "dynamic or meprop")
        raise ValueError(f"the optimizer state was saved from a {was} model and this one is {now}: resume with "
                         "the mode the checkpoint was trained with (or start a new run)")
    if len(saved) != len(groups):
        raise ValueError(f"the optimizer state holds groups {names[0]} and this optimizer {names[1]}: resume with "
                         "the options the checkpoint was trained with (which parameters train: --rest, targets)")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a tensor sharded by FSDP2 (a DTensor), else the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _sparse_flat(grad: torch.Tensor) -> torch.Tensor:
    """(nnz,) flat indices of a sparse COO tensor's stored entries, coalesced or not."""
    idx = grad._indices()
    flat = torch.zeros(idx.shape[1], dtype=torch.long, device=idx.device)
    for dim, size in enumerate(grad.shape):
        flat = flat * size + idx[dim]
    return flat


def _flat_gradient(p: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices, values) of a gradient's entries: a sparse COO gradient's as they are (uncoalesced
    ones may repeat an index: coalescing would read the device back), a dense one's non-zero entries."""
    if grad.is_sparse:
        return _sparse_flat(grad), grad._values().reshape(-1)
    flat_idx = grad.reshape(-1).nonzero().squeeze(1)  # a dense gradient in a lazy group: its support is read back
    return flat_idx, grad.reshape(-1)[flat_idx]


# The lazy moments live in a store of fixed capacity: `index` (C,) holds the flat indices of the entries
# with moments, sorted, then `numel` (the sentinel) in the unused slots; exp_avg / exp_avg_sq (C,) beside
# it. New entries are merged in by a sort of static shape. `bound` (a host-side int) bounds the slots in
# use; only when it could pass the capacity is the true count read back and the store grown (_grow):
# an amortised read-back, not one per step.

def _empty_store(p: torch.Tensor) -> dict:
    return {"index": torch.zeros(0, dtype=torch.long, device=p.device), "exp_avg": p.new_zeros(0),
            "exp_avg_sq": p.new_zeros(0), "bound": 0}


def _in_use(state: dict, numel: int) -> torch.Tensor:
    """(C,) bool: the store's slots that hold an entry (the others hold the sentinel `numel`)."""
    return state["index"] < numel


def _grow(state: dict, used: int, needed: int, numel: int) -> None:
    """`used` slots hold entries (read back): make room for `needed` more. A store that grows takes room
    for four more steps' entries and a quarter more of those in use: the next read-back is several steps
    away, and the unused room stays a fraction of the state."""
    index = state["index"]
    state["bound"] = used
    if used + needed <= index.numel():
        return
    capacity = max(used + 4 * needed + used // 4, 16)
    extra = capacity - index.numel()
    state["index"] = torch.cat((index, index.new_full((extra,), numel)))
    for key in ("exp_avg", "exp_avg_sq"):
        state[key] = torch.cat((state[key], state[key].new_zeros(extra)))


def _store_positions(state: dict, flat_idx: torch.Tensor, numel: int) -> torch.Tensor:
    """Positions of `flat_idx` in the lazy store, adding zero moments for entries seen the first time."""
    if state["bound"] + flat_idx.numel() > state["index"].numel():  # a new store, or a dense gradient's
        used = to_host(_in_use(state, numel).sum()) if state["index"].numel() else 0
        _grow(state, used, flat_idx.numel(), numel)
    index = state["index"]
    capacity = index.numel()
    pos = torch.searchsorted(index, flat_idx).clamp_(max=capacity - 1)
    new = torch.where(index[pos] == flat_idx, numel, flat_idx).sort().values  # (e,) new entries, then sentinels
    new[1:].masked_fill_(new[1:] == new[:-1], numel)  # an entry repeated in the gradient is added once
    merged, order = torch.cat((index, new)).sort(stable=True)
    keep = order[:capacity]  # the sentinels sort last, and the bound guarantees the entries fit
    state["index"] = merged[:capacity]
    for key in ("exp_avg", "exp_avg_sq"):
        state[key] = torch.cat((state[key], state[key].new_zeros(new.numel())))[keep]
    state["bound"] += flat_idx.numel()
    return torch.searchsorted(state["index"], flat_idx)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (2-norm) for gradients that may be sparse (the `dynamic`
    mode's top-k); returns the total norm before clipping. Reads nothing back from the device."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    grads = [_local(p.grad) for p in params]
    squares = [_squared_norm(g) for g in grads]
    device = squares[0].device
    sharded = [sq for p, sq in zip(params, squares) if isinstance(p.grad, DTensor)]  # decided on the host
    total_sq = sum((sq.to(device) for p, sq in zip(params, squares) if not isinstance(p.grad, DTensor)),
                   torch.zeros((), device=device))
    if sharded:  # sharded gradients: the squares of every rank's shards, summed over the ranks
        shard_sq = torch.stack([sq.to(device) for sq in sharded]).sum()
        dist.all_reduce(shard_sq, group=next(p.grad for p in params if isinstance(p.grad, DTensor)).device_mesh.get_group())
        total_sq = total_sq + shard_sq
    total = total_sq.sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        (g._values() if g.is_sparse else g).mul_(scale.to(g.device, g.dtype))
    return total


def _squared_norm(grad: torch.Tensor) -> torch.Tensor:
    """|grad|^2 in at least float32. An uncoalesced sparse gradient (summed over backward passes) may hold
    an entry more than once: its parts are summed first, by a sort of static shape (coalesce() would
    read the device back)."""
    dtype = torch.promote_types(grad.dtype, torch.float32)
    if not grad.is_sparse:
        return torch.linalg.vector_norm(grad, dtype=dtype).square()
    values = grad._values().to(dtype)
    if not grad.is_coalesced() and grad._nnz() > 1:
        flat, order = _sparse_flat(grad).sort()
        group = torch.cat((flat.new_zeros(1), (flat[1:] != flat[:-1]).long().cumsum(0)))  # (nnz,) entry number
        values = torch.zeros_like(values).index_add_(0, group, values[order])
    return values.square().sum()


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
    return SparseAdamW(param_groups, lr=lr, weight_decay=weight_decay, **adam_kwargs)
