"""Fault injection for the `sparsegrad` command: run it in a forked child with one fault armed.

A fault is (kind, hook, n): at the n-th call of `hook` in the child,
    kill      the child kills itself with SIGKILL (before the call: nothing of it is written)
    tear      the call writes half of its file, then the child kills itself (a write cut short)
    fill      the call fails as a full disk makes it fail (ENOSPC, in each writer's own form)
    stall     (step only) the run waits, holding its folder, until the file <output-dir>.go exists
Hooks: `save_file` (safetensors: checkpoints, best weights, bases, adapters), `torch_save` (checkpoint
state), `replace` (os.replace: every atomic file's commit), `step` (after an optimizer step).

Children are forked from a forkserver that imported torch, transformers and sparsegrad once, so
each run costs its own work only; the forkserver never ran a parallel region, so forking is safe.
"""
from __future__ import annotations

import errno
import io
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

HOOKS = ("save_file", "torch_save", "replace", "step")


def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "safetensors.torch", "sparsegrad.recipes.cli",
                                "sparsegrad.recipes.finetune", "sparsegrad.recipes.experiment", "optuna", __name__])
    return ctx


def start(argv: list[str], fault: tuple[str, str, int] | None = None, count_file: Path | None = None):
    """Start `sparsegrad <argv>` in a child with `fault` armed; the child process (its stderr goes to
    the file `child.log`)."""
    _started[0] += 1
    log = Path(argv[argv.index("--output-dir") + 1]).with_suffix(f".{_started[0]}.stderr")
    child = _context().Process(target=_child, args=(argv, fault, str(count_file) if count_file else None, str(log)))
    child.start()
    child.log = log
    return child


_started = [0]


def run(argv: list[str], fault: tuple[str, str, int] | None = None, count_file: Path | None = None,
        timeout: float = 600) -> tuple[int, str]:
    """Run `sparsegrad <argv>` in a child with `fault` armed; (exit code, stderr). -9: killed.
    count_file: where the child writes how often each hook was called (for a census run)."""
    return finish(start(argv, fault, count_file), timeout)


def finish(child, timeout: float = 600) -> tuple[int, str]:
    """Wait for a started child; (exit code, stderr)."""
    child.join(timeout)
    if child.is_alive():
        child.kill()
        child.join()
        raise TimeoutError(f"a sparsegrad child did not end in {timeout} s (its output: {child.log})")
    return child.exitcode, child.log.read_text() if child.log.is_file() else ""


def _child(argv, fault, count_file, stderr_file) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    err = open(stderr_file, "w")  # noqa: SIM115 (kept open until the child ends, however it ends)
    os.dup2(err.fileno(), 2)
    sys.stderr = err
    import torch

    torch.set_num_threads(2)
    calls = Counter()
    _arm(fault, calls)
    from sparsegrad.recipes.cli import main

    try:
        code = main(argv)
    finally:
        if count_file:
            Path(count_file).write_text(",".join(f"{k}={calls[k]}" for k in HOOKS))
        sys.stderr.flush()
    os._exit(code)


def _die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(fault, calls: Counter) -> None:
    """Wrap every hook to count its calls, and fire `fault` at its call."""
    import safetensors.torch
    import torch

    from sparsegrad.recipes.finetune import FineTuneRecipe

    kind, hook, n = fault if fault else (None, None, 0)

    def due(name: str) -> str | None:
        calls[name] += 1
        return kind if name == hook and calls[name] == n else None

    real_save_file = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        what = due("save_file")
        if what == "kill":
            _die()
        if what == "fill":
            from safetensors import SafetensorError

            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        if what == "tear":
            real_save_file(tensors, filename, metadata)
            _truncate_half(filename)
            _die()
        return real_save_file(tensors, filename, metadata)

    for module in list(sys.modules.values()):  # those that imported it by name too
        if getattr(module, "save_file", None) is real_save_file:
            module.save_file = save_file

    real_torch_save = torch.save

    def torch_save(obj, f, *args, **kwargs):
        what = due("torch_save")
        if what == "kill":
            _die()
        if what in ("fill", "tear"):
            buffer = io.BytesIO()
            real_torch_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()[: buffer.tell() // 2]
            if hasattr(f, "write"):
                f.write(data)
                f.flush()
            else:
                Path(f).write_bytes(data)
            if what == "tear":
                _die()
            try:  # what torch.save raises on a full disk: its own error, the OSError as context
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
        return real_torch_save(obj, f, *args, **kwargs)

    torch.save = torch_save

    real_replace = os.replace

    def replace(src, dst):
        what = due("replace")
        if what == "kill":
            _die()
        if what == "fill":
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        if what == "tear":  # a rename is atomic: half of it is the rename not done
            _die()
        return real_replace(src, dst)

    os.replace = replace

    real_step = FineTuneRecipe.train_step

    def train_step(self):
        loss = real_step(self)
        what = due("step")
        if what == "kill":
            _die()
        if what == "stall":  # hold the run (and its folder) until the test creates <output-dir>.go
            go = self.run_dir.parent.with_suffix(".go")
            (go.parent / f"{go.stem}.stalled").touch()
            while not go.exists():
                time.sleep(0.05)
        return loss

    FineTuneRecipe.train_step = train_step


def _truncate_half(filename) -> None:
    path = Path(filename)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def census(argv: list[str], count_file: Path) -> dict[str, int]:
    """How often each hook is called by an uninterrupted run of `argv`."""
    code, err = run(argv, count_file=count_file)
    assert code == 0, err[-3000:]
    return {k: int(v) for k, v in (item.split("=") for item in count_file.read_text().split(","))}


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders left under `folder`."""
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name]
