"""The `sparsegrad` command end to end on real data: every method learns (beats the majority
class), compare and Optuna search write their tables, a killed run resumes to the same result,
and each bad input is one clear line with a non-zero exit code and nothing lost."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparsegrad.recipes.cli import main
from sparsegrad.recipes.results import RunResult, SummaryRow, markdown_table

SLICE = ["--task", "sst2", "--max-train-samples", "320", "--max-eval-samples", "200", "--max-length", "48",
         "--epochs", "2", "--no-progress"]


def _results(out: Path, seed: int = 0) -> dict:
    return json.loads((out / f"seed-{seed}" / "results.json").read_text())


@pytest.mark.parametrize("method", ["ft", "lora", "meprop", "sparsegrad"])
def test_every_method_learns_sst2(glue_dir, tmp_path, method, capsys):
    out = tmp_path / method
    assert main(["finetune", *SLICE, "--data-dir", str(glue_dir), "--method", method, "--output-dir", str(out)]) == 0
    r = _results(out)
    assert r["score"] > r["baseline"]["accuracy"] + 0.1, r["history"]
    assert r["method"]["method"] == method and r["method"]["rest"] == "all"
    assert r["train_steps"] == 40 and r["steps_per_s"] > 0 and r["peak_memory_mb"] > 0
    assert (out / "seed-0" / "best" / "model.safetensors").is_file()
    assert not (out / "seed-0" / "checkpoints").exists()  # removed once results.json is written
    table = capsys.readouterr().out
    assert "| sst2 |" in table and method in table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"][0]["mean"] == pytest.approx(r["score"])
    if method == "lora":
        assert abs(r["method"]["trainable_mlp"] - r["method"]["sparse_budget"]) < 12 * (384 + 1536)
    if method == "sparsegrad":
        assert (out / "bases.safetensors").is_file() and r["bases"]["source"] == "computed"


@pytest.mark.parametrize("method", [None, "ft", "lora", "meprop"])
def test_default_task_bbc_news_learns(tmp_path, method, capsys):
    """The embedded default (MiniLM on BBC News; SparseGrad fixed unless a method is named), cut down;
    it tells its story: what it trains on what, and at the end where the results and the adapter went."""
    out = tmp_path / "bbc"
    argv = ["finetune", "--max-train-samples", "160", "--max-eval-samples", "120", "--max-length", "64",
            "--epochs", "1", "--lr", "3e-4", "--bases-steps", "3", "--no-progress", "--output-dir", str(out)]
    assert main(argv + (["--method", method] if method else [])) == 0
    r = _results(out)
    assert r["task"] == "bbcnews" and r["method"]["method"] == (method or "sparsegrad")
    assert r["method"]["mode"] == (None if method else "fixed")
    assert r["score"] > r["baseline"]["accuracy"] + 0.2
    printed = capsys.readouterr()
    story = printed.err.splitlines()
    assert story[0] == "model   all-MiniLM-L6-v2 (embedded)"
    assert story[1].startswith("data    bbcnews: 160 training / 120 validation examples, 5 classes")
    assert story[2].startswith(f"method  {'sparsegrad-fixed at density 0.01' if method is None else method}")
    assert story[3] == f"output  {out}/"
    trains = f"seed 0: {r['method']['trainable']:,} of {r['method']['total']:,} parameters train"
    assert any(line.startswith(trains) for line in story), story
    row = f"| all | validation accuracy | {100 * r['score']:.1f} | {100 * r['baseline']['accuracy']:.1f} |"
    assert f"| bbcnews | {method or 'sparsegrad-fixed'}" in printed.out and row in printed.out  # one seed: no ±
    assert story[-2].startswith(f"adapter {out}/seed-0/adapter/ (")
    assert story[-1].startswith("reuse   sparsegrad.load_adapter(AutoModelForSequenceClassification.from_pretrained("
                                "sparsegrad.recipes.assets.minilm_path(), num_labels=5), ")
    assert not list(out.rglob("*.lock")) and not (out / ".lock").exists()  # no lock file left behind


def test_regression_task_runs_with_pearson(tmp_path):
    rows = "".join(f"{i}\tg\tf\ty\t{i}\ts\ts\tA man plays {w}.\tA man plays {w if i % 2 else 'chess'}.\t"
                   f"{5.0 if i % 2 else 1.0}\n" for i, w in enumerate(["guitar", "piano", "drums", "flute"] * 8))
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    (tmp_path / "glue" / "STS-B").mkdir(parents=True)
    for split in ("train", "dev"):
        (tmp_path / "glue" / "STS-B" / f"{split}.tsv").write_text(head + rows)
    out = tmp_path / "stsb"
    assert main(["finetune", "--task", "stsb", "--data-dir", str(tmp_path / "glue"), "--method", "meprop",
                 "--epochs", "3", "--lr", "3e-4", "--no-progress", "--output-dir", str(out)]) == 0
    r = _results(out)
    assert r["metric"] == "pearson" and set(r["final"]["dev"]) == {"pearson", "spearman"}
    assert r["score"] > 0.5  # learns which pairs match (a constant predictor scores 0)
    assert r["baseline"]["pearson"] == 0.0 and r["learned"] is True
    # the same run had it ended at the constant predictor's 0: reported as such, not as an ordinary score
    flat = RunResult.from_dict({**r, "score": 0.0, "learned": None})
    assert flat.learned is False
    row = SummaryRow.from_runs([flat])
    assert row.not_learned == [0] and "| dev pearson | 0.0 (not above" in markdown_table([row])  # one seed: no ±
    assert "0.0 (not above baseline: seed 0)" in markdown_table([row])


def test_float16_classification_trains(tmp_path):
    """--dtype float16 on a classification task: the dense head steps on a float32 master copy (SparseAdamW),
    where plain AdamW in float16 gave NaN at step 2 at any lr."""
    out = tmp_path / "fp16"
    assert main(["finetune", "--dtype", "float16", "--max-steps", "3", "--batch-size", "8", "--max-length", "32",
                 "--max-train-samples", "24", "--max-eval-samples", "16", "--no-progress", "--output-dir", str(out)]) == 0
    r = _results(out)  # (float16 matmuls are slow on a CPU: a few short steps)
    assert r["status"] == "finished" and all(math.isfinite(h["loss"]) for h in r["history"])


def test_compare_prints_one_table(glue_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "ft", "sparsegrad-dynamic", "--task", "sst2", "--data-dir", str(glue_dir),
            "--max-train-samples", "64", "--max-eval-samples", "64", "--max-length", "32", "--max-steps", "4",
            "--bases-steps", "2", "--no-progress", "--output-dir", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| sst2 | ft |" in table and "| sst2 | sparsegrad-dynamic |" in table
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["ft", "sparsegrad-dynamic"]
    assert rows[1]["trainable_mlp"] == 12 * round(0.01 * 384 * 1536) < rows[0]["trainable_mlp"]
    assert (out / "summary.md").read_text().count("| sst2 |") == 2


def test_optimize_runs_trials_and_resumes_the_study(glue_dir, tmp_path):
    out = tmp_path / "hpo"
    argv = ["finetune", "--task", "sst2", "--data-dir", str(glue_dir), "--method", "lora", "--max-train-samples",
            "48", "--max-eval-samples", "48", "--max-length", "32", "--max-steps", "2", "--optimize", "2",
            "--no-progress", "--output-dir", str(out)]
    assert main(argv) == 0
    search = json.loads((out / "summary.json").read_text())["search"]
    assert len(search["trials"]) == 2
    for t in search["trials"]:
        assert 1e-6 <= t["params"]["lr"] <= 1e-1 and t["params"]["batch_size"] in (8, 16, 32)
    r = _results(out)
    assert r["config"]["lr"] == search["best_params"]["lr"]
    assert main([*argv, "--resume"]) == 0  # the finished study is reused: no new trials
    assert len(json.loads((out / "summary.json").read_text())["search"]["trials"]) == 2


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "sparsegrad.recipes", "finetune", *args]


def test_resume_after_kill_9_reaches_the_same_result(glue_dir, tmp_path):
    args = ["--task", "sst2", "--data-dir", str(glue_dir), "--max-train-samples", "160", "--max-eval-samples",
            "96", "--max-length", "32", "--epochs", "2", "--eval-steps", "5", "--save-steps", "2",
            "--bases-steps", "2", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_cli([*args, "--output-dir", str(whole)]), env=env, check=True, capture_output=True)

    proc = subprocess.Popen(_cli([*args, "--output-dir", str(killed)]), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = killed / "seed-0" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and int(latest.read_text().split("-")[1]) >= 7:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "seed-0" / "results.json").exists()

    rerun = subprocess.run(_cli([*args, "--output-dir", str(killed), "--resume"]), env=env, capture_output=True,
                           text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    a, b = _results(whole), _results(killed)
    assert b["resumed_at"] and b["resumed_at"][0] >= 6
    assert b["final"] == a["final"] and b["best_step"] == a["best_step"]
    assert [h["dev"] for h in b["history"]] == [h["dev"] for h in a["history"]]
    assert [h["loss"] for h in b["history"]] == [h["loss"] for h in a["history"]]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("sparsegrad: error: ")
    return err[-1]


def test_bad_inputs_are_one_clear_line(glue_dir, tmp_path, capsys):
    glue = ["--data-dir", str(glue_dir)]
    assert "unknown task 'sst3'" in _error(["finetune", "--task", "sst3"], capsys)
    assert "missing data file" in _error(["finetune", "--task", "rte", *glue], capsys)

    bad = tmp_path / "bad"
    (bad / "SST-2").mkdir(parents=True)
    (bad / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\tnegative\n")
    (bad / "SST-2" / "dev.tsv").write_text("sentence\tlabel\ngood\t1\n")
    assert "label 'negative' is not one of the sst2 labels" in _error(
        ["finetune", "--task", "sst2", "--data-dir", str(bad)], capsys)
    (bad / "SST-2" / "train.tsv").write_text("sentence,label\ngood,1\n")
    assert "no column ['sentence', 'label']" in _error(["finetune", "--task", "sst2", "--data-dir", str(bad)], capsys)

    small = ["--task", "sst2", *glue, "--max-train-samples", "32", "--max-eval-samples", "32"]
    (tmp_path / "broken").mkdir()
    assert "holds no config.json" in _error(["finetune", *small, "--model", str(tmp_path / "broken")], capsys)
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "no-such-architecture"}')
    assert "could not load a model" in _error(["finetune", *small, "--model", str(tmp_path / "broken")], capsys)
    assert "match no linear layer" in _error(["finetune", *small, "--targets", "mlp.up_proj"], capsys)
    assert "density=1.5 is out of range" in _error(["finetune", *small, "--density", "1.5"], capsys)
    assert "--n-params" in _error(["finetune", *small, "--n-params", "10000000"], capsys)
    assert "--density or --n-params" in _error(["finetune", *small, "--density", "0.01", "--n-params", "5"], capsys)
    assert "--bases" in _error(["finetune", *small, "--bases", str(tmp_path / "none.safetensors")], capsys)
    assert "--structure block shapes the fixed mode's support" in _error(
        ["finetune", *small, "--mode", "dynamic", "--structure", "block"], capsys)

    # an output folder that holds something else is never touched
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("my notes")
    assert "not empty and holds no sparsegrad run" in _error(
        ["finetune", *small, "--max-steps", "1", "--output-dir", str(other)], capsys)
    assert (other / "notes.txt").read_text() == "my notes" and len(list(other.iterdir())) == 1

    run = tmp_path / "run"
    assert main(["finetune", *small, "--method", "ft", "--max-steps", "2", "--no-progress",
                 "--output-dir", str(run)]) == 0
    before = _digest(run)
    assert "already holds a run: pass --resume" in _error(
        ["finetune", *small, "--method", "ft", "--max-steps", "2", "--output-dir", str(run)], capsys)
    line = _error(["finetune", *small, "--method", "ft", "--max-steps", "2", "--lr", "0.001", "--resume",
                   "--output-dir", str(run)], capsys)
    assert "holds a different run (lr default -> 0.001)" in line
    assert _digest(run) == before


def test_an_output_folder_one_cannot_write_is_one_clear_line(tmp_path, monkeypatch, capsys):
    """A folder claimed by someone else (chmod 000, another user's): exit 2 and one line naming the folder."""
    from sparsegrad.recipes.lock import FolderLock

    denied = tmp_path / "denied"

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self.path))

    monkeypatch.setattr(FolderLock, "acquire", refuse)
    line = _error(["finetune", "--max-steps", "1", "--output-dir", str(denied)], capsys)
    assert f"cannot write {denied}" in line and "another --output-dir" in line


def test_divergence_is_reported_never_scored(tmp_path, capsys):
    """--lr 1000 on BBC News: the loss explodes at the second step; the run stops there, exits 1 with
    the reason, and its results hold a status and no score, as strict JSON."""
    out = tmp_path / "diverged"
    argv = ["finetune", "--max-train-samples", "64", "--max-eval-samples", "32", "--max-length", "32", "--max-steps",
            "8", "--eval-steps", "4", "--lr", "1000", "--no-progress", "--output-dir", str(out)]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "diverged (seeds 0)" in captured.out
    assert "sparsegrad: error: sparsegrad-fixed diverged: seed 0: the training loss reached" in captured.err
    assert "lower it" in captured.err

    def strict(path: Path) -> dict:
        return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path}: {c} is not JSON"))

    result = strict(out / "seed-0" / "results.json")
    assert result["status"] == "diverged" and result["score"] is None and result["final"] == {}
    assert result["train_steps"] < 8 and result["adapter"] is None
    row = strict(out / "summary.json")["rows"][0]
    assert row["status"] == "diverged" and row["mean"] is None and row["scores"] == [None]
    assert main([*argv, "--resume"]) == 1  # the diverged run is a finished result: not run again
    assert strict(out / "seed-0" / "results.json")["resumed_at"] == []


def _fake_runs(calls: list, fail_at: int | None = None):
    """A stand-in for finetune in the search: a deterministic score of (lr, batch size); the run at
    index `fail_at` raises (a full disk, Ctrl-C); lr above 0.05 diverges."""
    from types import SimpleNamespace

    def run(cfg, folder, **kwargs):
        calls.append((cfg.lr, cfg.batch_size))
        if len(calls) - 1 == fail_at:
            raise KeyboardInterrupt
        if cfg.lr > 0.05:
            return SimpleNamespace(status="diverged", message="loss nan", score=None, metric="accuracy")
        return SimpleNamespace(status="finished", message=None, score=-abs(math.log10(cfg.lr) + 3) + cfg.batch_size / 100,
                               metric="accuracy")

    return run


def test_a_resumed_search_draws_what_an_uninterrupted_one_draws(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from sparsegrad.recipes import search
    from sparsegrad.recipes.config import RunConfig

    data = SimpleNamespace(task=SimpleNamespace(greater_is_better=True))
    cfg = RunConfig(seed=3)
    whole_calls: list = []
    monkeypatch.setattr(search, "finetune", _fake_runs(whole_calls))
    (tmp_path / "whole").mkdir()
    whole = search.optimize(cfg, tmp_path / "whole", 12, data, tmp_path / "b", progress=False)

    calls: list = []
    monkeypatch.setattr(search, "finetune", _fake_runs(calls, fail_at=5))
    (tmp_path / "cut").mkdir()
    with pytest.raises(KeyboardInterrupt):
        search.optimize(cfg, tmp_path / "cut", 12, data, tmp_path / "b", progress=False)
    monkeypatch.setattr(search, "finetune", _fake_runs(calls))
    resumed = search.optimize(cfg, tmp_path / "cut", 12, data, tmp_path / "b", progress=False)

    assert [t["params"] for t in resumed["trials"]] == [t["params"] for t in whole["trials"]]
    assert calls[6] == calls[5] and calls[:5] + calls[6:] == whole_calls  # the cut trial ran again, nothing else
    assert len(set(calls)) == len(whole_calls) == 12  # no repeated draw
    assert resumed["best_params"] == whole["best_params"]
    diverged = [t for t in whole["trials"] if t["params"]["lr"] > 0.05]
    assert all(t["status"] == "diverged" and t["value"] is None for t in diverged)
    assert all(t["status"] == "finished" and t["value"] is not None for t in whole["trials"] if t not in diverged)


def test_version_and_compare_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and re.fullmatch(r"sparsegrad \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    shown = "".join(capsys.readouterr().out.split())  # argparse wraps lines, at spaces and hyphens
    assert "(defaultftloramepropsparsegrad)" in shown and "(default0.01)" in shown
    assert "(default:sparsegrad-runs/compare-<task>-<time>)" in shown and "(default0)" in shown
