"""A command's worth of runs: validate, optionally search hyper-parameters with Optuna, run every
seed, and summarise (summary.json + summary.md). Also `compare`: several methods, one table.

Output folder of `finetune`:
    command.json          the options (a resumed command must match them)
    bases.safetensors     the preliminary phase's bases, shared by seeds and trials
    optuna.db, trials/    with --optimize N (resumable SQLite study)
    seed-<s>/             one run per seed: results.json, best/model.safetensors, checkpoints/
    summary.json, summary.md
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from .checkpoint import write_json_atomic, write_text_atomic
from .methods import head_parameters, sparse_budget
from .targets import find_targets
from .tasks import TaskData, load_task
from .train import RunConfig, finetune, load_model


class RunFolderError(ValueError):
    """The output folder holds something this command must not overwrite."""


# ---------------------------------------------------------------- validation, before anything is written

def validate(cfg: RunConfig, bases: str | None = None) -> TaskData:
    """Load the data and the model once and check every option against them; raise a clear
    ValueError otherwise. Returns the data (so it is read once)."""
    if cfg.density is not None and cfg.n_params is not None:
        raise ValueError("pass --density or --n-params, not both")
    for name in ("epochs", "max_steps", "batch_size", "grad_accum", "max_length", "bases_steps", "eval_steps",
                 "save_steps", "max_prompts", "max_new_tokens"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if not cfg.lr > 0:
        raise ValueError(f"--lr must be positive, got {cfg.lr}")
    if bases is not None and not Path(bases).is_file():
        raise ValueError(f"--bases {bases}: no such file; pass a file saved by Bases.save (e.g. a run's "
                         "bases.safetensors) or leave --bases out to compute them")
    data = load_task(cfg.task, cfg.data_dir, max_train_samples=cfg.max_train_samples,
                     max_eval_samples=cfg.max_eval_samples)
    if cfg.prompts:
        if not data.task.is_causal_lm:
            raise ValueError("--prompts answers prompts with a decoder: it belongs to --task chat")
        from .chat import read_prompts

        read_prompts(cfg.prompts)
    _, model = load_model(cfg.model, data.task)
    layers = find_targets(model, cfg.targets, blocks=cfg.blocks)
    try:
        sparse_budget(layers, cfg.density, cfg.n_params)
    except ValueError as err:
        raise ValueError(f"{'--n-params' if cfg.n_params is not None else '--density'}: {err}") from None
    if cfg.rest == "head":
        head_parameters(model)
    return data


def claim_folder(out: Path, command: dict, resume: bool) -> None:
    """Make sure `out` is empty, or holds this very command (with --resume); write command.json."""
    saved_file = out / "command.json"
    if saved_file.is_file():
        saved = json.loads(saved_file.read_text())
        if not resume:
            raise RunFolderError(f"--output-dir {out} already holds a run: pass --resume to continue it, "
                                 "or choose another --output-dir")
        old, new = _flat(saved), _flat(command)
        diff = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if diff:
            raise RunFolderError(f"--output-dir {out} holds a different run ({'; '.join(diff)}): resume it with "
                                 "its own options, or choose another --output-dir")
        return
    if out.exists() and any(out.iterdir()):
        raise RunFolderError(f"--output-dir {out} is not empty and holds no sparsegrad run: choose another "
                             "--output-dir")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved_file, command)


def _flat(command: dict) -> dict:
    """command.json with its config inlined: {"lr": ..., "seeds": ...}."""
    return {**{k: v for k, v in command.items() if k != "config"}, **command.get("config", {})}


# ---------------------------------------------------------------- hyper-parameter search

def optimize(cfg: RunConfig, out: Path, n_trials: int, data: TaskData, bases_file: Path,
             progress: bool) -> dict:
    """Optuna over lr (log-uniform in [1e-6, 1e-1]) and batch size {8, 16, 32}, optimising the
    validation metric of cfg.seed (maximising scores, minimising the chat loss). The study lives in out/optuna.db: a killed search resumes,
    and a trial killed midway is retried with its parameters (its run resumes from its checkpoint)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    maximize = data.task.greater_is_better
    study = optuna.create_study(study_name="finetune", storage=f"sqlite:///{out / 'optuna.db'}",
                                direction="maximize" if maximize else "minimize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(stale.params)

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-6, 1e-1, log=True)
        batch_size = trial.suggest_categorical("batch_size", [8, 16, 32])
        run = out / "trials" / f"lr{lr:.4e}-bs{batch_size}"
        result = finetune(replace(cfg, lr=lr, batch_size=batch_size), run, bases_file=bases_file, resume=True,
                          data=data, progress=progress)
        print(f"trial {trial.number}: lr {lr:.3e} batch {batch_size} -> {result['metric']} {result['score']:.4f}",
              file=sys.stderr)
        if math.isfinite(result["score"]):
            return result["score"]
        return float("-inf") if maximize else float("inf")

    done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    if done < n_trials:
        study.optimize(objective, n_trials=n_trials - done)
    trials = [{"number": t.number, "params": t.params, "value": t.value}
              for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
    return {"best_params": study.best_params, "best_value": study.best_value, "trials": trials}


# ---------------------------------------------------------------- the command

def run_finetune(cfg: RunConfig, out: str | Path, *, seeds: list[int], optimize_trials: int = 0,
                 bases: str | None = None, resume: bool = False, progress: bool = True) -> dict:
    """The `sparsegrad finetune` command: returns the summary (also written to out/).
    Under torchrun / accelerate launch every process runs it; rank 0 owns the folder."""
    out = Path(out)
    rank = int(os.environ.get("RANK", "0"))
    if optimize_trials and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--optimize runs in one process: search first, then launch the seeds with torchrun")
    data = validate(cfg, bases)
    command = {"config": {k: v for k, v in cfg.identity().items() if k != "seed"}, "seeds": seeds,
               "optimize": optimize_trials, "bases": bases}
    if rank == 0:
        claim_folder(out, command, resume)
    bases_file = Path(bases) if bases else out / "bases.safetensors"

    search = None
    if optimize_trials:
        search = optimize(replace(cfg, seed=seeds[0]), out, optimize_trials, data, bases_file, progress)
        cfg = replace(cfg, **search["best_params"])
        print(f"best of {optimize_trials} trials: {search['best_params']} ({search['best_value']:.4f})",
              file=sys.stderr)
    runs = [finetune(replace(cfg, seed=s), out / f"seed-{s}", bases_file=bases_file, resume=resume,
                     data=data, progress=progress) for s in seeds]
    summary = {"rows": [summary_row(runs)], "runs": [str(out / f"seed-{s}" / "results.json") for s in seeds],
               "search": search}
    if rank == 0:
        write_json_atomic(out / "summary.json", summary)
        write_text_atomic(out / "summary.md", markdown_table(summary["rows"]) + "\n")
    return summary


def method_label(method: dict) -> str:
    return method["method"] + (f"-{method['mode']}" if method.get("mode") else "")


def summary_row(runs: list[dict]) -> dict:
    """One table row from the runs of several seeds of one method."""
    first = runs[0]
    scores = np.array([r["score"] for r in runs], dtype=float)
    row = {
        "task": first["task"], "method": method_label(first["method"]), "rest": first["method"]["rest"],
        "metric": first["metric"], "mean": float(scores.mean()), "std": float(scores.std()),
        "seeds": [r["config"]["seed"] for r in runs], "scores": scores.tolist(),
        "baseline": first["baseline"][first["metric"]], "greater_is_better": first.get("greater_is_better", True),
        "trainable": first["method"]["trainable"], "trainable_mlp": first["method"]["trainable_mlp"],
        "total": first["method"]["total"], "lora_rank": first["method"]["lora_rank"],
        "steps_per_s": float(np.mean([r["steps_per_s"] for r in runs])),
        "peak_memory_mb": float(max(r["peak_memory_mb"] for r in runs)), "memory_kind": first["memory_kind"],
        "lr": first["config"]["lr"], "batch_size": first["config"]["batch_size"],
        "adapter_bytes": (first.get("adapter") or {}).get("bytes"),
        "model_bytes": (first.get("adapter") or {}).get("model_bytes"),
    }
    for split, metrics in first["final"].items():
        for name in metrics:
            row[f"{split}/{name}"] = float(np.mean([r["final"][split][name] for r in runs]))
    return row


def markdown_table(rows: list[dict]) -> str:
    """The summary table: metric mean ± std (scores x100, losses as they are), the baseline (majority
    class, or the untrained model for chat), trainable counts, speed, memory and adapter size."""
    head = ("| task | method | rest | metric | score | baseline | trainable | MLP trainable | steps/s "
            "| peak MB | adapter MB | lr | batch |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        method = r["method"] + (f" (r={r['lora_rank']})" if r.get("lora_rank") else "")
        scale, digits = (100, 1) if r.get("greater_is_better", True) else (1, 3)
        adapter = f"{r['adapter_bytes'] / 2**20:,.2f}" if r.get("adapter_bytes") else ""
        lines.append(f"| {r['task']} | {method} | {r['rest']} | {r['metric']} | {scale * r['mean']:.{digits}f} ± "
                     f"{scale * r['std']:.{digits}f} | {scale * r['baseline']:.{digits}f} | {r['trainable']:,} "
                     f"| {r['trainable_mlp']:,} | {r['steps_per_s']:.2f} | {r['peak_memory_mb']:,.0f} | {adapter} "
                     f"| {r['lr']:.2e} | {r['batch_size']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- compare

def run_compare(methods: list[str], finetune_argv: list[str], out: str | Path, *, resume: bool = False) -> dict:
    """Run `sparsegrad finetune` once per method, each in a fresh process (so peak memory is the
    method's own), into out/<method>/, and write one table to out/summary.{json,md}."""
    out = Path(out)
    claim_folder(out, {"compare": methods, "argv": finetune_argv}, resume)
    rows, failed = [], []
    shared_bases = None
    for label in methods:
        method, _, mode = label.partition("-")
        argv = [sys.executable, "-m", "sparsegrad", "finetune", *finetune_argv, "--method", method,
                "--output-dir", str(out / label)]
        if mode:
            argv += ["--mode", mode]
        if method == "sparsegrad" and shared_bases is not None and "--bases" not in finetune_argv:
            argv += ["--bases", str(shared_bases)]
        if resume:
            argv.append("--resume")
        print(f"== {label}: {' '.join(argv[3:])}", file=sys.stderr, flush=True)
        if subprocess.run(argv, stdout=2, check=False).returncode != 0:  # child stdout -> our fd 2: one table
            failed.append(label)
            continue
        rows += json.loads((out / label / "summary.json").read_text())["rows"]
        if method == "sparsegrad" and (out / label / "bases.safetensors").is_file():
            shared_bases = out / label / "bases.safetensors"
    summary = {"rows": rows, "failed": failed}
    write_json_atomic(out / "summary.json", summary)
    write_text_atomic(out / "summary.md", markdown_table(rows) + "\n")
    return summary
