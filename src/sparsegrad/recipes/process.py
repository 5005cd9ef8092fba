"""Work in a fresh process: a function called with a JSON spec in a new Python, its JSON result back.

Comparisons and benchmarks run each method this way, so that its peak memory and its imports are
its own. The function is named "package.module:function"; it takes the spec dict and returns a
JSON-serialisable dict, which the child prints as its last stdout line.

    python -m sparsegrad.recipes.process package.module:function '{"spec": ...}'
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

from sparsegrad.util import strict_json


class WorkerError(RuntimeError):
    """A worker process failed; the message ends with its last output."""


def threads_per_worker(workers: int, what: str) -> int:
    """The CPU threads each of `workers` processes run at a time gets: the cores shared out, at least one."""
    if workers < 1:
        raise ValueError(f"--workers {workers}: give 1 or more {what} at a time")
    return max(1, (os.cpu_count() or 1) // workers)


def run_in_process(target: str, spec: dict, *, show_output: bool = False, processes: int | None = None) -> dict:
    """Call `target` (package.module:function) with `spec` in a fresh process and return its result.
    show_output: let the worker's stderr (progress, messages) through to ours; else keep it for errors.
    processes: run it in that many processes under torchrun (rank 0's result comes back; the others return None)."""
    launcher = [] if processes is None else ["-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
    cmd = [sys.executable, *launcher, "-m", "sparsegrad.recipes.process", target, json.dumps(spec)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if show_output else subprocess.PIPE, text=True,
                          check=False)
    if proc.returncode != 0:
        tail = "" if show_output else f":\n{(proc.stderr or '')[-3000:]}"
        raise WorkerError(f"{target} failed (exit {proc.returncode}){tail}")
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise WorkerError(f"{target} printed no result")
    return json.loads(lines[-1])


def _main(argv: list[str]) -> int:
    module, _, function = argv[0].partition(":")
    result = getattr(importlib.import_module(module), function)(json.loads(argv[1]))
    if result is not None:  # under torchrun: rank 0's
        sys.stdout.write("\n" + json.dumps(strict_json(result), default=str, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
