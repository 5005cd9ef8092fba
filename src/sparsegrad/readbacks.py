"""Count the operators whose result the host must read back from the device.

On a GPU, each of these stalls the Python thread until the device's queue drains: the size of
`nonzero`'s output, a `.item()`, a boolean mask's selection. A training step of small kernels
that does this a few dozen times runs at the speed of its round-trips, however few FLOPs it has.
On the CPU nothing waits, so the cost is invisible there -- which is why it is counted by
operator, on any device:

    with ReadBackCounter() as counter:
        train_step()
    print(counter.total, counter.counts)   # e.g. 2, {'aten._local_scalar_dense': 2}

The same check on a GPU, for real: ``torch.cuda.set_sync_debug_mode("error")``.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operators whose output size or value the host needs before it can go on.
_ALWAYS = {
    aten.nonzero.default, aten.nonzero.out,
    aten._local_scalar_dense.default,  # .item(), bool(t), int(t), float(t)
    aten.is_nonzero.default,
    aten.equal.default,  # torch.equal
    aten.masked_select.default,
    aten._unique.default, aten._unique2.default, aten.unique_dim.default,
    aten.unique_consecutive.default, aten.unique_dim_consecutive.default,
    aten._coalesce.default,
}


def _is_bool_index(indices) -> bool:
    return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices)


def is_read_back(func, args, kwargs) -> bool:
    """Does this aten call make the host wait for the device?"""
    if func in _ALWAYS:
        return True
    packet = func.overloadpacket
    if packet in (aten.index, aten._unsafe_index):  # t[mask]: the size of the result is the mask's count
        return _is_bool_index(args[1])
    if packet in (aten.index_put, aten.index_put_, aten._index_put_impl_):  # t[mask] = v
        return _is_bool_index(args[1])
    if packet is aten._to_copy:  # a copy from the device to the host
        src, device = args[0], kwargs.get("device")
        return device is not None and torch.device(device).type == "cpu" and src.device.type != "cpu"
    if packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None  # the output's length is the repeats' sum
    return False


_ACTIVE: list[ReadBackCounter] = []


def to_host(t: torch.Tensor) -> list:
    """t.tolist(), counted as one read-back by the active counters (a copy to the host dispatches no
    operator on the CPU, so the counter could not see it there)."""
    for counter in _ACTIVE:
        counter.counts["to_host"] += 1
    return t.tolist()


class ReadBackCounter(TorchDispatchMode):
    """A dispatch mode that counts read-backs (see `is_read_back`) by operator name while active, and every
    operator dispatched (`operators`: on a GPU, a kernel launch or more each)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.operators = 0

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.operators += 1
        if is_read_back(func, args, kwargs):
            self.counts[str(func.overloadpacket)] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
