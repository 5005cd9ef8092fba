"""Checkpoints that are verified on load and fall back to the previous good one, writes that name a
full disk and leave nothing behind, the output folder's lock, and the lock shared work waits on."""
from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from torch import nn

from sparsegrad.recipes.checkpoint import (
    CheckpointError,
    checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from sparsegrad.recipes.lock import FolderInUseError, FolderLock, waiting_lock
from sparsegrad.util import DiskFullError, atomic_path, write_json_atomic


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def _save_steps(root, steps, keep=2):
    for step in steps:
        save_checkpoint(root, step, _model(step), {"loop": {"step": step}}, keep=keep)


def test_two_kept_and_a_damaged_one_falls_back(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    _save_steps(root, [2, 4, 6])
    assert [p.name for p in checkpoints(root)] == ["checkpoint-4", "checkpoint-6"]
    assert latest_checkpoint(root).name == "checkpoint-6"

    state = root / "checkpoint-6" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, another content
    state.write_bytes(bytes(data))
    assert latest_checkpoint(root).name == "checkpoint-4"
    assert "checkpoint-6/state.pt is damaged: its content differs" in capsys.readouterr().err

    weights = root / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be read .*checkpoint-6/state.pt .*"
                                              r"checkpoint-4/model.safetensors is damaged: 100 bytes .* delete"):
        latest_checkpoint(root)

    model = _model(0)
    with pytest.raises(CheckpointError, match="model.safetensors is damaged .*SafetensorError"):
        load_checkpoint(root / "checkpoint-4", model)  # what the manifest would have caught, loaded anyway


def test_a_folder_newer_than_latest_is_passed_over(tmp_path):
    """Killed between renaming checkpoint-6 into place and pointing `latest` at it: 4 is resumed."""
    root = tmp_path / "checkpoints"
    _save_steps(root, [2, 4, 6])
    (root / "latest").write_text("checkpoint-4")
    assert latest_checkpoint(root).name == "checkpoint-4"
    saved = load_checkpoint(root / "checkpoint-4", model := _model(1))
    assert saved["loop"]["step"] == 4
    torch.testing.assert_close(model[0].weight, _model(4)[0].weight, rtol=0, atol=0)


def _full_disk_torch_save(obj, f, *args, **kwargs):
    """What torch.save raises when the disk fills: its own RuntimeError, the ENOSPC OSError as context."""
    f.write(b"partial")
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None


def test_a_full_disk_is_named_and_leaves_nothing_behind(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _save_steps(root, [2])
    monkeypatch.setattr(torch, "save", _full_disk_torch_save)
    with pytest.raises(DiskFullError, match=r"no space left on device while writing .*checkpoint-4 \(the partial"):
        save_checkpoint(root, 4, _model(4), {"loop": {}})
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2", "latest"]  # no temporary folder
    assert latest_checkpoint(root).name == "checkpoint-2"

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(DiskFullError, match="results.json"):
        write_json_atomic(tmp_path / "results.json", {"score": 1.0})
    assert not list(tmp_path.glob("*results*"))


def test_strict_json_and_stale_temporaries(tmp_path):
    write_json_atomic(tmp_path / "r.json", {"score": float("nan"), "history": [1.0, float("inf")], "ok": 0.5})
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) == \
        {"score": None, "history": [1.0, None], "ok": 0.5}

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = tmp_path / f".r.json.tmp{dead.pid}", tmp_path / f".r.json.tmp{os.getppid()}"
    stale.write_text("left by a killed writer")
    live.write_text("being written by a live process")
    write_json_atomic(tmp_path / "r.json", {})
    assert not stale.exists() and live.exists()


def test_the_folder_lock(tmp_path):
    folder = tmp_path / "run"
    with FolderLock(folder), pytest.raises(FolderInUseError, match=rf"in use by another sparsegrad run \(pid {os.getpid()} on "):
        FolderLock(folder).acquire()
    with FolderLock(folder):  # released: taken again
        pass
    assert not (folder / ".lock").exists()  # a finished holder leaves no lock file

    # a holder killed with SIGKILL: its lock is taken over
    holder = subprocess.Popen([sys.executable, "-c", ("import sys, time; from sparsegrad.recipes.lock import FolderLock; "
                               f"lock = FolderLock({str(folder)!r}); lock.acquire(); print('held', flush=True); time.sleep(600)")],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(FolderInUseError, match=f"pid {holder.pid} "):
        FolderLock(folder).acquire()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert f'"pid": {holder.pid}' in (folder / ".lock").read_text()  # its record is still there
    with FolderLock(folder):
        assert f'"pid": {os.getpid()}' in (folder / ".lock").read_text()
    assert not (folder / ".lock").exists()


def test_waiting_lock_lets_one_holder_in_at_a_time(tmp_path):
    """Runs that share work (a benchmark's bases) wait for each other: the spans in which four threads hold
    the lock do not overlap, and each found what the one before it left."""
    spans, found = [], []

    def work() -> None:
        with waiting_lock(tmp_path / "shared" / "bases.lock"):
            start = time.monotonic()
            found.append((tmp_path / "done").is_file())
            time.sleep(0.05)  # the work: without the lock, the others would start meanwhile
            (tmp_path / "done").touch()
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans.sort()
    assert len(spans) == 4 and all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert found == [False, True, True, True]
    assert not (tmp_path / "shared" / "bases.lock").exists()  # each holder removed it: none is left


def test_atomic_path_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
