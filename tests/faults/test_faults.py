"""The fault-injection suite: the `sparsegrad finetune` command killed, torn, starved of disk, its
checkpoints truncated and its folder raced, at every point a census of an uninterrupted run finds.
Each time: nothing finished is lost, and a resume reaches the uninterrupted result exactly, or the
command says exactly why not. Marked `faults` (run apart: `pytest -m faults`); with
SPARSEGRAD_FAULTS=all every call of every hook is tried, otherwise a spread of them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from harness import census, finish, leftovers, run, start

pytestmark = pytest.mark.faults

# The chat recipe on a tiny LLaMA-architecture decoder (conftest): 32 conversations, 8 steps over 2
# epochs, an evaluation every 4 steps and a checkpoint every 2 (two kept), bases from 2 steps
OPTIONS = ["--task", "chat", "--max-train-samples", "32", "--max-length", "64", "--batch-size", "8",
           "--epochs", "2", "--eval-steps", "4", "--save-steps", "2", "--bases-steps", "2", "--no-progress"]
RUN: list[str] = []  # set by the `reference` fixture: ["finetune", *OPTIONS, model and data]
TRIED: dict[str, int] = {}  # fault kind -> points tried, for the report at the end


def _result(out: Path) -> dict:
    return json.loads((out / "seed-0" / "results.json").read_text())


def _same_run(a: dict, b: dict) -> None:
    assert b["final"] == a["final"] and b["best_step"] == a["best_step"]
    assert [h["loss"] for h in b["history"]] == [h["loss"] for h in a["history"]]
    assert [h["validation"] for h in b["history"]] == [h["validation"] for h in a["history"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama_dir, chat_file) -> tuple[dict, dict]:
    """The uninterrupted run's result and how often it calls each hook."""
    RUN[:] = ["finetune", *OPTIONS, "--model", str(tiny_llama_dir), "--data-dir", str(chat_file)]
    out = tmp_path_factory.mktemp("faults") / "whole"
    calls = census([*RUN, "--output-dir", str(out)], out.with_suffix(".calls"))
    print(f"\ncalls of each hook in an uninterrupted run: {calls}")
    return _result(out), calls


def _points(calls: dict[str, int], hooks: tuple[str, ...]) -> list[tuple[str, int]]:
    """Every call of each hook (SPARSEGRAD_FAULTS=all), or the first, the last and three between."""
    points = []
    for hook in hooks:
        n = calls[hook]
        picks = range(1, n + 1) if os.environ.get("SPARSEGRAD_FAULTS") == "all" else \
            sorted({1, 2, n // 3, n // 2, (2 * n) // 3, n - 1, n} - {0})
        points += [(hook, k) for k in picks if 1 <= k <= n]
    return points


@pytest.mark.parametrize("kind", ["kill", "tear", "fill"])
def test_fault_then_resume_reaches_the_uninterrupted_result(reference, tmp_path, kind):
    whole, calls = reference
    hooks = ("save_file", "torch_save", "replace", "step") if kind == "kill" else ("save_file", "torch_save", "replace")
    points = _points(calls, hooks)
    for hook, n in points:
        out = tmp_path / f"{kind}-{hook}-{n}"
        code, err = run([*RUN, "--output-dir", str(out)], fault=(kind, hook, n))
        if kind == "fill":
            assert code == 2, f"{hook} #{n}: {err[-2000:]}"
            assert "no space left on device while writing" in err.strip().splitlines()[-1], f"{hook} #{n}: {err[-2000:]}"
            assert not leftovers(out), f"{hook} #{n}: temporary files left behind: {leftovers(out)}"
        else:
            assert code == -9, f"{kind} {hook} #{n}: the fault did not fire (exit {code}): {err[-2000:]}"
        code, err = run([*RUN, "--output-dir", str(out), "--resume"])
        assert code == 0, f"{kind} {hook} #{n}: the resume failed: {err[-3000:]}"
        _same_run(whole, _result(out))
        assert not leftovers(out)
    TRIED[kind] = len(points)
    print(f"\n{kind}: {len(points)} points, each resumed to the uninterrupted result")


def test_truncated_checkpoints_fall_back_or_say_why(reference, tmp_path):
    """A run killed after its 6th step holds checkpoints 4 and 6; damage them one by one."""
    whole, _ = reference
    tried = 0
    for victim, expect in [("model.safetensors", "fallback"), ("state.pt", "fallback"), ("both", "error")]:
        out = tmp_path / f"truncated-{victim.split('.')[0]}"
        code, _ = run([*RUN, "--output-dir", str(out)], fault=("kill", "step", 7))
        assert code == -9
        root = out / "seed-0" / "checkpoints"
        assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
        for ckpt, name in ([("checkpoint-6", victim)] if victim != "both" else
                           [("checkpoint-6", "model.safetensors"), ("checkpoint-4", "state.pt")]):
            file = root / ckpt / name
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 3])
        code, err = run([*RUN, "--output-dir", str(out), "--resume"])
        tried += 1
        if expect == "fallback":
            assert code == 0, err[-3000:]
            assert f"checkpoint-6/{victim} is damaged" in err and "trying the checkpoint before it" in err
            assert _result(out)["resumed_at"] == [4]
            _same_run(whole, _result(out))
        else:
            assert code == 2
            last = err.strip().splitlines()[-1]
            assert "no checkpoint in" in last and "checkpoint-6/model.safetensors is damaged" in last
            assert "checkpoint-4/state.pt is damaged" in last and "delete" in last
            shutil.rmtree(root)  # what the message says to do
            code, err = run([*RUN, "--output-dir", str(out), "--resume"])
            assert code == 0, err[-3000:]
            _same_run(whole, _result(out))
    TRIED["truncate"] = tried


def test_a_killed_search_resumes_to_the_same_trials(reference, tmp_path):
    """--optimize 3 (2 steps a trial) killed during the second trial's run, then resumed: the same three
    trials as an uninterrupted search, the cut one run again."""
    search = [*RUN, "--optimize", "3", "--max-steps", "2"]
    trials = {}
    for name, fault in [("whole", None), ("killed", ("kill", "step", 3))]:
        out = tmp_path / name
        code, err = run([*search, "--output-dir", str(out)], fault=fault)
        if fault:
            assert code == -9
            code, err = run([*search, "--output-dir", str(out), "--resume"])
        assert code == 0, err[-3000:]
        trials[name] = json.loads((out / "summary.json").read_text())["search"]["trials"]
    params = [t["params"] for t in trials["whole"]]
    assert len({json.dumps(p, sort_keys=True) for p in params}) == 3  # three distinct draws
    assert [t["params"] for t in trials["killed"]] == params
    assert [t["value"] for t in trials["killed"]] == [t["value"] for t in trials["whole"]]
    TRIED["search kill"] = 1


def test_a_second_run_on_the_same_folder_is_refused_at_once(reference, tmp_path):
    """While a run works in a folder (held at its 4th step), a second run there, fresh or --resume, is
    refused at once naming the first; the first, let go, reaches the uninterrupted result."""
    whole, _ = reference
    out = tmp_path / "raced"
    first = start([*RUN, "--output-dir", str(out)], fault=("stall", "step", 4))
    stalled = tmp_path / "raced.stalled"
    deadline = time.time() + 300
    while not stalled.exists() and first.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    assert stalled.exists(), "the first run never reached its 4th step"
    tried = 0
    for extra in ([], ["--resume"]):  # a fresh run, and a resume of the live one
        code, err = run([*RUN, *extra, "--output-dir", str(out)])
        tried += 1
        assert code == 2, err[-2000:]
        last = err.strip().splitlines()[-1]
        assert f"is in use by another sparsegrad run (pid {first.pid}" in last, last
    (tmp_path / "raced.go").touch()
    code, err = finish(first)
    assert code == 0, err[-3000:]
    _same_run(whole, _result(out))
    TRIED["race"] = tried


def test_a_full_file_system(reference, tmp_path):
    """A real full disk: the output on a 6 MB file system (needs root to mount one; skipped otherwise)."""
    whole, _ = reference
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True,
                          check=False)
    if made.returncode != 0:
        pytest.skip("cannot mount a small file system here (needs root)")
    try:
        out = mount / "run"
        code, err = run([*RUN, "--output-dir", str(out)])
        assert code == 2, err[-2000:]
        assert "no space left on device while writing" in err.strip().splitlines()[-1]
        assert not leftovers(out), leftovers(out)
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)  # the user frees space
        code, err = run([*RUN, "--output-dir", str(out), "--resume"])
        assert code == 0, err[-3000:]
        _same_run(whole, _result(out))
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
    TRIED["full disk"] = 1


def test_report(reference):
    """The count of points tried, for the log (runs last in this file)."""
    print("\nfault points tried:", json.dumps(TRIED), "total", sum(TRIED.values()))
