"""Sharded training (FSDP2, `--fsdp`) under torchrun with gloo on CPU: 2 processes train the same model
as 1 process at the same global batch -- SparseGrad fixed and dynamic, with gradient accumulation,
LoRA, MeProp and full fine-tuning; a sharded run killed with SIGKILL resumes to the same result; its
adapter loads onto a fresh unsharded model."""
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

HERE = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]


def _args(model: Path, data: Path, out: Path, method: str, *extra: str) -> list[str]:
    # density 0.15: the dynamic top-k cannot flip between batch layouts (see test_distributed.py)
    return ["finetune", "--task", "chat", "--model", str(model), "--data-dir", str(data), "--method", method,
            "--max-steps", "4", "--eval-steps", "4", "--lr", "1e-2", "--density", "0.15", "--bases-steps", "3",
            "--cpu", "--no-progress", "--output-dir", str(out), *extra]


def _torchrun(argv: list[str], script: list[str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*TORCHRUN, *(script or ["-m", "sparsegrad.recipes"]), *argv], check=False, env=env,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _result(run: Path) -> dict:
    return json.loads((run / "seed-0" / "results.json").read_text())


def _max_diff(a: Path, b: Path) -> float:
    """Largest |difference| over every tensor the two runs' best models hold."""
    ta, tb = (load_file(str(d / "seed-0" / "best" / "model.safetensors")) for d in (a, b))
    common = ta.keys() & tb.keys()
    assert len(common) >= len(ta) - 1  # a sharded model's state names a tied weight twice
    return max((ta[k].double() - tb[k].double()).abs().max().item() for k in common)


def _assert_same_run(single: Path, sharded: Path) -> None:
    r1, r2 = _result(single), _result(sharded)
    assert (r1["processes"], r2["processes"]) == (1, 2)
    assert r1["examples_per_step"] == r2["examples_per_step"] == 8
    assert r2["sharded"] and not r1["sharded"]
    assert r2["score"] == pytest.approx(r1["score"], abs=1e-5)
    assert [h["loss"] for h in r2["history"]] == pytest.approx([h["loss"] for h in r1["history"]], abs=1e-5)
    assert _max_diff(single, sharded) < 1e-5
    assert r1["score"] < r1["baseline"]["loss"]  # and it trained


@pytest.mark.parametrize("mode", ["fixed", "dynamic"])
def test_sharded_equals_one_process(tiny_llama_dir, chat_file, tmp_path, mode):
    single, sharded, accum = tmp_path / "single", tmp_path / "sharded", tmp_path / "accum"
    assert main(_args(tiny_llama_dir, chat_file, single, "sparsegrad", "--mode", mode, "--batch-size", "8")) == 0
    _torchrun(_args(tiny_llama_dir, chat_file, sharded, "sparsegrad", "--mode", mode, "--batch-size", "4", "--fsdp"))
    _torchrun(_args(tiny_llama_dir, chat_file, accum, "sparsegrad", "--mode", mode, "--batch-size", "2",
                    "--grad-accum", "2", "--fsdp"))
    _assert_same_run(single, sharded)
    _assert_same_run(single, accum)
    # the bases were computed once (rank 0) and equal the unsharded run's
    ba, bb = (load_file(str(d / "bases.safetensors")) for d in (single, sharded))
    assert ba.keys() == bb.keys() and all(torch.equal(ba[k], bb[k]) for k in ba)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tries torchrun on a machine without a GPU")
def test_torchrun_without_a_gpu_runs_sharded_on_the_cpu_and_fsdp_alone_is_refused(tiny_llama_dir, chat_file,
                                                                                  tmp_path, capsys):
    """Without --cpu, 2 processes on a machine without a GPU are 2 ranks of one sharded run (not two copies
    of the whole run in one folder); --fsdp in one process says how to launch several."""
    sharded = tmp_path / "sharded"
    argv = [a for a in _args(tiny_llama_dir, chat_file, sharded, "lora", "--batch-size", "4", "--fsdp") if a != "--cpu"]
    _torchrun(argv)
    result = _result(sharded)
    assert result["processes"] == 2 and result["sharded"]
    assert main(_args(tiny_llama_dir, chat_file, tmp_path / "one", "lora", "--fsdp")) == 2
    assert "launch it with torchrun --nproc-per-node N" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lora", "meprop", "ft"])
def test_other_methods_shard(tiny_llama_dir, chat_file, tmp_path, method):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert main(_args(tiny_llama_dir, chat_file, single, method, "--batch-size", "8")) == 0
    _torchrun(_args(tiny_llama_dir, chat_file, sharded, method, "--batch-size", "4", "--fsdp"))
    _assert_same_run(single, sharded)


def test_killed_sharded_run_resumes_and_its_adapter_loads_unsharded(tiny_llama_dir, chat_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from sparsegrad import load_adapter

    single, sharded = tmp_path / "single", tmp_path / "sharded"
    argv = ["--mode", "dynamic", "--max-steps", "6", "--eval-steps", "3", "--save-steps", "2"]
    assert main([*_args(tiny_llama_dir, chat_file, single, "sparsegrad", "--batch-size", "8"), *argv]) == 0
    sharded_args = [*_args(tiny_llama_dir, chat_file, sharded, "sparsegrad", "--batch-size", "4", "--fsdp"), *argv]
    killed = _torchrun(sharded_args, script=[str(HERE / "kill_at_step.py"), "5"], check=False)
    assert killed.returncode != 0
    assert (sharded / "seed-0" / "checkpoints" / "checkpoint-4").is_dir()
    assert not (sharded / "seed-0" / "results.json").exists()
    _torchrun([*sharded_args, "--resume"])
    assert _result(sharded)["resumed_at"] == [4]
    _assert_same_run(single, sharded)

    # the adapter a sharded run wrote, onto a fresh unsharded model: the trained weights
    model = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), sharded / "seed-0" / "adapter")
    trained = load_file(str(sharded / "seed-0" / "best" / "model.safetensors"))
    state = model.state_dict()
    assert max((state[k] - trained[k]).abs().max().item() for k in state if k in trained) < 1e-5
    assert any(not torch.equal(state[k], v) for k, v in
               AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict().items())


def test_accelerate_launch_with_an_fsdp_config_shards(tiny_llama_dir, chat_file, tmp_path):
    pytest.importorskip("accelerate")
    single, launched = tmp_path / "single", tmp_path / "launched"
    assert main(_args(tiny_llama_dir, chat_file, single, "sparsegrad", "--batch-size", "8")) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
                           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                           "--dynamo_backend", "no", "-m", "sparsegrad.recipes",
                           *_args(tiny_llama_dir, chat_file, launched, "sparsegrad", "--batch-size", "4")],
                          check=False, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_run(single, launched)  # sharded by the launch configuration alone, no --fsdp
