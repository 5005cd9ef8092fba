"""GLUE benchmark: the paper's Table 4 (methods x tasks x seeds) and its sparsity ablation
(Tables 11-12), on the GLUE tasks found in --data-dir, with the embedded MiniLM by default.

    sparsegrad bench glue --data-dir ../shared/glue --tasks cola sst2 wnli   # ~1 h on 2 CPU cores
    sparsegrad bench glue --data-dir glue/ --full --optimize 20    # the paper's protocol, for a GPU

Each (task, method) is one `compare` entry: a fresh process running every seed, so runs resume
after an interruption (--resume) and peak memory is per method. The default is cut to finish in
about an hour per three short-sentence tasks on 2 CPU cores (CoLA, SST-2, WNLI: ~55 min with the
ablation; MRPC's sentence pairs cost ~3x per example):
a fixed random --max-train-samples 800 of each training set, 2 epochs, one shared lr (no search),
full dev sets.
`--full` lifts the cut: whole training sets, the task's epochs (20) with early stopping.
It takes every `sparsegrad finetune` option (e.g. --lr, --model, --optimize) for its runs.

Output: out/<task>/... (compare folders), out/ablation-<task>/density-<d>/..., and
out/glue.json + out/glue.md with the table, the per-method average and the ablation.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from sparsegrad.util import write_json_atomic, write_text_atomic

from ..recipes.compare import run_compare
from ..recipes.config import RunConfig, from_args
from ..recipes.config import add_arguments as add_config_arguments
from ..recipes.experiment import claimed_folder
from ..recipes.results import SummaryRow
from ..recipes.tasks import GLUE_FOLDERS, TASKS

METHODS = ("ft", "lora", "meprop", "sparsegrad-fixed", "sparsegrad-dynamic")
DENSITIES = (0.005, 0.01, 0.02, 0.04)
DEFAULT_DENSITY = 0.01
QUICK = {"max_train_samples": 800, "epochs": 2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", nargs="+", help="default: every GLUE task found in --data-dir")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--densities", type=float, nargs="*", default=list(DENSITIES),
                   help="sparsity ablation: SparseGrad fixed at these densities (none: no ablation)")
    p.add_argument("--ablation-task", default="sst2", help="the task of the ablation (default sst2)")
    p.add_argument("--full", action="store_true", help="the paper's protocol: whole training sets, the task's "
                                                       "epochs (20, with early stopping)")
    p.add_argument("--optimize", type=int, default=0, metavar="N",
                   help="per task and method, N Optuna trials over lr and batch size before the seeds")
    p.add_argument("--output-dir", default="bench-results/glue")
    p.add_argument("--resume", action="store_true")
    add_config_arguments(p, RunConfig, skip=("task", "method", "mode", "density", "prompts", "max_prompts",
                                              "max_new_tokens"), group="runs",
                         defaults=QUICK)


def available_tasks(data_dir: str | Path) -> list[str]:
    """The GLUE tasks whose folder holds a train.tsv, in the paper's order."""
    return [t for t, folder in GLUE_FOLDERS.items() if (Path(data_dir) / folder / "train.tsv").is_file()]


def run(args: argparse.Namespace) -> dict:
    """Every task's compare, then the ablation; writes out/glue.json and out/glue.md."""
    out = Path(args.output_dir)
    if not args.data_dir:
        raise ValueError("bench glue needs --data-dir: a GLUE folder with DIR/<TASK>/{train,dev}.tsv")
    tasks = args.tasks or available_tasks(args.data_dir)
    if not tasks:
        raise ValueError(f"--data-dir {args.data_dir}: no GLUE task folder with a train.tsv "
                         f"(expected e.g. {Path(args.data_dir) / 'SST-2' / 'train.tsv'})")
    unknown = [t for t in tasks if t not in TASKS or t not in GLUE_FOLDERS]
    if unknown:
        raise ValueError(f"--tasks {' '.join(unknown)}: not GLUE tasks; choose from {', '.join(GLUE_FOLDERS)}")
    for d in args.densities:
        if not 0 < d <= 1:
            raise ValueError(f"--densities {d}: a density is a share of each layer's entries, in (0, 1]")
    base = from_args(RunConfig, args)
    if args.full:
        base = replace(base, max_train_samples=None, epochs=None)
    command = {"bench": "glue", "tasks": tasks, "methods": args.methods, "densities": args.densities,
               "ablation_task": args.ablation_task, "seeds": args.seeds, "optimize": args.optimize,
               "config": base.identity()}
    with claimed_folder(out, command, args.resume):
        start = time.time()

        def compare(methods: list[str], cfg: RunConfig, folder: Path, bases: str | None = None) -> list[SummaryRow]:
            # resume=True continues a compare this benchmark began, and starts one it has not
            return run_compare(methods, cfg, folder, seeds=args.seeds, optimize_trials=args.optimize, bases=bases,
                               resume=True).rows

        tables = {task: compare(args.methods, replace(base, task=task), out / task) for task in tasks}

        ablation = []
        if args.densities:
            task = args.ablation_task
            bases = out / task / "sparsegrad-fixed" / "bases.safetensors"
            for d in args.densities:
                rows = [r for r in tables.get(task, []) if r.method == "sparsegrad-fixed"]
                if d != DEFAULT_DENSITY or not rows:
                    rows = compare(["sparsegrad-fixed"], replace(base, task=task, density=d),
                                   out / f"ablation-{task}" / f"density-{d:g}", str(bases) if bases.is_file() else None)
                ablation += [{**r.to_dict(), "density": d} for r in rows]

        result = {"meta": {"tasks": tasks, "methods": args.methods, "seeds": args.seeds, "full": args.full,
                           "max_train_samples": base.max_train_samples, "epochs": base.epochs,
                           "options": base.changed(), "wall_seconds": time.time() - start},
                  "tables": {t: [r.to_dict() for r in rows] for t, rows in tables.items()},
                  "average": averages(tables), "ablation": ablation}
        write_json_atomic(out / "glue.json", result)
        write_text_atomic(out / "glue.md", markdown(result) + "\n")
        return result


def averages(tables: dict[str, list[SummaryRow]]) -> dict[str, dict]:
    """Per method: the mean over tasks of the per-task mean score, and its std over seeds
    (the per-seed average over tasks)."""
    by_method: dict[str, list[SummaryRow]] = {}
    for rows in tables.values():
        for r in rows:
            by_method.setdefault(r.method, []).append(r)
    out = {}
    for method, rows in by_method.items():
        if len(rows) != len(tables) or any(r.mean is None for r in rows):
            continue  # a method missing (or diverged) on some task has no average
        per_seed = np.mean([r.scores for r in rows], axis=0)
        out[method] = {"mean": float(per_seed.mean()), "std": float(per_seed.std()), "tasks": len(rows),
                       "trainable": rows[0].trainable, "trainable_mlp": rows[0].trainable_mlp}
    return out


def markdown(result: dict) -> str:
    """Table 4-like: one row per method, one column per task (metric mean ± std over seeds, x100)."""
    tables = {t: [SummaryRow.from_dict(r) for r in rows] for t, rows in result["tables"].items()}
    avg = result["average"]
    tasks = list(tables)
    methods = list(dict.fromkeys(r.method for rows in tables.values() for r in rows))
    metric = {t: rows[0].metric for t, rows in tables.items() if rows}
    head = "| method | trainable | MLP trainable | " + " | ".join(f"{t} ({metric.get(t, '')})" for t in tasks) + " | average |"
    lines = [head, "|---|---:|---:|" + "---:|" * (len(tasks) + 1)]
    for m in methods:
        cells, first = [], None
        for t in tasks:
            row = next((r for r in tables[t] if r.method == m), None)
            first = first or row
            cells.append("failed" if row is None else row.status if row.mean is None
                         else f"{100 * row.mean:.1f} ± {100 * row.std:.1f}")
        a = avg.get(m)
        name = m + (f" (r={first.lora_rank})" if first and first.lora_rank else "")
        lines.append(f"| {name} | {first.trainable:,} | {first.trainable_mlp:,} | " + " | ".join(cells)
                     + (f" | {100 * a['mean']:.1f} ± {100 * a['std']:.1f} |" if a else " | |"))
    majority = " | ".join(f"{100 * tables[t][0].baseline:.1f}" if tables[t] else "" for t in tasks)
    lines.append(f"| majority class | 0 | 0 | {majority} | |")
    if result["ablation"]:
        lines += ["", f"Sparsity ablation (SparseGrad fixed, {result['ablation'][0]['task']}):", "",
                  "| density | MLP trainable | score | steps/s |", "|---:|---:|---:|---:|"]
        for r in result["ablation"]:
            score = r.get("status", "diverged") if r["mean"] is None else f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}"
            lines.append(f"| {100 * r['density']:g}% | {r['trainable_mlp']:,} | {score} | {r['steps_per_s']:.2f} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    print(markdown(result))
    print(f"\nresults: {Path(args.output_dir) / 'glue.json'}, {Path(args.output_dir) / 'glue.md'}")
    return 0
