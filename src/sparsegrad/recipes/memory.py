"""Peak memory of a stretch of work: the CUDA allocator's peak, or the process's peak RSS on CPU."""
from __future__ import annotations

import os
import resource

import torch


def reset_peak_rss() -> None:
    """Restart the kernel's high-water mark of this process's RSS (Linux; elsewhere a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Peak RSS in bytes since the last reset_peak_rss (VmHWM), else since the process began."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    """This process's resident memory now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_memory(device: torch.device | str) -> None:
    """Measure the peak from here on (e.g. the training loop's, not model loading's)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_memory(device: torch.device | str) -> tuple[int, str]:
    """(bytes, what it is): the CUDA allocator's peak, or the process's peak RSS, since reset_peak_memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return peak_rss(), "cpu_peak_rss"


def tensor_bytes(tensors) -> int:
    """Bytes the tensors hold; a sparse COO tensor counts its indices and values, not its dense size."""
    total = 0
    for t in tensors:
        if not torch.is_tensor(t):
            continue
        if t.is_sparse:
            total += t._indices().numel() * t._indices().element_size() + t._values().numel() * t._values().element_size()
        else:
            total += t.numel() * t.element_size()
    return total
