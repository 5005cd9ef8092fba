"""sparsegrad.shard (FSDP2, gloo on CPU): 2 sharded processes train the same model as 1 process at the same
global batch to float64 rounding; in bfloat16 each rank rebuilds its rows of the weight as the unsharded
layer rebuilds them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "sharded_worker.py"


def _launch(processes: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                           str(WORKER), *args], check=False, env=env, capture_output=True, text=True, timeout=600)


def _train(processes: int, mode: str, dtype: str, out: Path) -> dict:
    done = _launch(processes, mode, dtype, str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("mode", ["fixed", "block", "dynamic"])
def test_sharded_training_equals_one_process(tmp_path, mode):
    one, two = (_train(n, mode, "float64", tmp_path / f"{n}.pt")["state"] for n in (1, 2))
    assert one.keys() == two.keys()
    trained = [k for k in one if k.endswith((".values", ".delta"))]
    assert trained and all(one[k].abs().sum() > 0 for k in trained)  # it trained
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-12


@pytest.mark.parametrize("mode", ["dynamic", "meprop"])
def test_a_sharded_step_cuts_its_top_k_without_being_asked(tmp_path, mode):
    """A loop without sparsegrad.sparsify_gradients: the optimizer step takes the global top-k itself, so 2
    sharded processes train k entries per step as with the call (not every entry)."""
    asked = _train(2, mode, "float64", tmp_path / "asked.pt")["state"]
    done = _launch(2, mode, "float64", str(tmp_path / "not.pt"), "no-sparsify")
    assert done.returncode == 0, done.stderr[-3000:]
    not_asked = torch.load(tmp_path / "not.pt")["state"]
    assert max((asked[k] - not_asked[k]).abs().max().item() for k in asked) < 1e-12


@pytest.mark.parametrize("mode", ["fixed", "block", "dynamic"])
def test_sharded_bfloat16_fold_equals_the_unsharded_fold(tmp_path, mode):
    # bfloat16 runs on 1 and 2 processes differ already in their gradients (activations summed over other
    # batches); what sharding must not change is the weight each rank rebuilds from the trained S
    run = _train(2, mode, "bfloat16", tmp_path / "two.pt")
    state, rebuilt = run["state"], run["rebuilt"]
    assert rebuilt and all(state[k].dtype == torch.bfloat16 for k in rebuilt)
    for name, weight in rebuilt.items():
        differ = (state[name] != weight).float().mean().item()
        assert differ < 0.002, f"{name}: {differ:.2%} of the entries differ from the unsharded fold"
        index = state[name.replace(".weight", ".w0_index")]
        assert index.numel() == 0 or int(index.max()) < weight.numel()  # whole-weight indices


def test_any_optimizer_folds_the_sharded_weights(tmp_path, mode="fixed"):
    """torch.optim.AdamW knows nothing of SparseGrad: the step hook folds each rank's rows all the same,
    to what one unsharded layer folds from the trained S, and 2 processes train as 1. (The fixed mode:
    the dynamic one's sparse gradients need a lazy optimizer, such as sparsegrad.optimizer.)"""
    runs = []
    for n in (1, 2):
        done = _launch(n, mode, "float64", str(tmp_path / f"{n}.pt"), "torch-adamw")
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(torch.load(tmp_path / f"{n}.pt"))
    (one, _), (two, rebuilt) = ((r["state"], r["rebuilt"]) for r in runs)
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-12
    for name, weight in rebuilt.items():
        torch.testing.assert_close(two[name], weight, rtol=0, atol=1e-12)
