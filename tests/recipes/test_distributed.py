"""Data parallelism and gradient accumulation: 2 processes x batch b (torchrun, gloo on CPU) and
1 process x batch b x 2 accumulation steps train the same model as 1 process x batch 2b, for
SparseGrad fixed and dynamic; the bases are computed once and are identical on every rank."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsegrad.recipes.cli import main


def _args(model: Path, data: Path, out: Path, mode: str, *extra: str) -> list[str]:
    # Density 0.15: at every step of this run the k-th and (k+1)-th largest |U G V^T| of each layer differ by
    # more than 7e-5 relative (measured), far above float32 summation noise (~1e-7), so the dynamic top-k
    # cannot flip between batch layouts. At 0.25 two entries of one layer differ by 9e-8, and which of them
    # is kept depends on the CPU's summation order.
    return ["finetune", "--task", "chat", "--model", str(model), "--data-dir", str(data), "--mode", mode,
            "--max-steps", "4", "--eval-steps", "4", "--lr", "1e-2", "--density", "0.15", "--bases-steps", "3",
            "--cpu", "--no-progress", "--output-dir", str(out), *extra]


def _launch(launcher: list[str], argv: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, "-m", "sparsegrad.recipes", *argv], check=False, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _compare(a: Path, b: Path) -> float:
    """Largest |difference| over every tensor of the two runs' trained models; the bases must be equal."""
    ta, tb = load_file(str(a / "seed-0" / "best" / "model.safetensors")), load_file(str(b / "seed-0" / "best" /
                                                                                       "model.safetensors"))
    assert ta.keys() == tb.keys()
    ba, bb = load_file(str(a / "bases.safetensors")), load_file(str(b / "bases.safetensors"))
    assert ba.keys() == bb.keys() and all(torch.equal(ba[k], bb[k]) for k in ba)
    return max((ta[k].double() - tb[k].double()).abs().max().item() for k in ta)


@pytest.mark.parametrize("mode", ["fixed", "dynamic"])
def test_two_processes_and_accumulation_equal_one_process(tiny_llama_dir, chat_file, tmp_path, mode):
    single, accum, ddp = tmp_path / "single", tmp_path / "accum", tmp_path / "ddp"
    assert main(_args(tiny_llama_dir, chat_file, single, mode, "--batch-size", "8")) == 0
    assert main(_args(tiny_llama_dir, chat_file, accum, mode, "--batch-size", "4", "--grad-accum", "2")) == 0
    _launch([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"],
            _args(tiny_llama_dir, chat_file, ddp, mode, "--batch-size", "4"))

    r1, ra, r2 = (json.loads((d / "seed-0" / "results.json").read_text()) for d in (single, accum, ddp))
    assert (r1["processes"], ra["processes"], r2["processes"]) == (1, 1, 2)
    assert r1["examples_per_step"] == ra["examples_per_step"] == r2["examples_per_step"] == 8
    assert r2["bases"]["source"] == "computed"  # rank 0 computed them once, the other rank received them
    for other in (ra, r2):
        assert other["score"] == pytest.approx(r1["score"], abs=1e-5)
        assert [h["loss"] for h in other["history"]] == pytest.approx([h["loss"] for h in r1["history"]], abs=1e-5)
    assert _compare(single, accum) < 1e-5
    assert _compare(single, ddp) < 1e-5
    assert r1["score"] < r1["baseline"]["loss"]  # and it trained


def test_accelerate_launch_equals_one_process(tiny_llama_dir, chat_file, tmp_path):
    pytest.importorskip("accelerate")
    single, launched = tmp_path / "single", tmp_path / "launched"
    assert main(_args(tiny_llama_dir, chat_file, single, "fixed", "--batch-size", "8")) == 0
    # `--multi_gpu` picks accelerate's torchrun launcher; `--cpu` (ours) keeps the processes on gloo
    _launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
            _args(tiny_llama_dir, chat_file, launched, "fixed", "--batch-size", "4"))
    assert json.loads((launched / "seed-0" / "results.json").read_text())["processes"] == 2
    assert _compare(single, launched) < 1e-5


def test_several_processes_need_an_output_dir(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["finetune", "--task", "chat", "--data-dir", "x.jsonl"]) == 2
    assert "--output-dir" in capsys.readouterr().err
