"""GLUE benchmark with a fair protocol (paper Table 4): every method at its own learning rate,
in the PEFT setting (`rest=head`: the task head and the MLP method train) and the paper's
(`rest=all`: every non-MLP parameter trains too), on the GLUE tasks found in --data-dir.

    sparsegrad bench glue --data-dir ../shared/glue --output-dir docs/results/glue
    sparsegrad bench glue --data-dir ../shared/glue --tasks sst2 --settings head   # one sitting's share

Per setting, task and method:
1. the learning-rate search: seed 0 at each lr of the method's grid (3 values, 4x apart), trained on
   the training subset, with 500 other training examples (at most a fifth of the set) held out as the
   selection split (--heldout);
   when the best lr sits at an edge of the grid, one more lr beyond it;
2. seeds 1 and 2 at the lr with the best held-out score;
3. the score: the dev set's metric of the three seeds' best models (mean ± std) -- dev is never used
   to choose anything.
The levers of SparseGrad (support refresh, bases after a head warm-up) run in the PEFT setting
beside the others.

Every finished run leaves a small JSON record, out/runs/<setting>/<task>/<method>/lr<lr>-seed<s>.json
(scores, lr, cost, when it ran), and nothing else: the run's model is deleted once recorded. A
killed bench resumes from the records (and a killed run from its checkpoint), so the table can be
built over several sittings; commit the records. out/glue.json and out/glue.md are rebuilt from
every record found, each time the bench runs (`--report-only`: without running anything).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from sparsegrad.util import write_json_atomic, write_text_atomic

from ..recipes.config import RunConfig, from_args
from ..recipes.config import add_arguments as add_config_arguments
from ..recipes.process import WorkerError, run_in_process
from ..recipes.tasks import GLUE_FOLDERS, TASKS

SETTINGS = ("head", "all")
# method label -> the run options that make it; its default lr grid (3 values, 4x apart)
METHODS: dict[str, dict] = {
    "ft": {"method": "ft"},
    "lora": {"method": "lora"},                      # rank matched to SparseGrad's trainable count
    "lora-r8": {"method": "lora", "lora_rank": 8},   # the paper's LoRA rank (7-8)
    "meprop": {"method": "meprop"},
    "sparsegrad-fixed": {"method": "sparsegrad", "mode": "fixed"},
    "sparsegrad-dynamic": {"method": "sparsegrad", "mode": "dynamic"},
}
LEVERS: dict[str, dict] = {
    "sparsegrad-refresh": {"method": "sparsegrad", "mode": "fixed", "refresh_steps": 50},
    "sparsegrad-warm": {"method": "sparsegrad", "mode": "fixed", "bases_warmup_steps": 30},
}
GRIDS = {  # the centre is where the method learned on short probes; the search moves past an edge
    "head": {"ft": (1e-4, 4e-4, 1.6e-3), "meprop": (1e-4, 4e-4, 1.6e-3), "default": (5e-4, 2e-3, 8e-3)},
    "all": {"ft": (2.5e-5, 1e-4, 4e-4), "meprop": (2.5e-5, 1e-4, 4e-4), "default": (1e-4, 4e-4, 1.6e-3)},
}
GRID_STEP = 4.0
PROTOCOL = {"max_train_samples": 1000, "epochs": 3, "heldout": 500}
HELDOUT_SHARE = 0.2  # at most this share of a small training set (WNLI: 127 of 635) is held out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", nargs="+", help="default: every GLUE task found in --data-dir")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS,
                   help="head: the PEFT setting (only the task head besides the method); all: the paper's")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS) + list(LEVERS))
    p.add_argument("--levers", nargs="*", default=list(LEVERS), choices=list(LEVERS),
                   help="SparseGrad variants run in the head setting beside the methods (none: skip them)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the first one also searches the lr")
    p.add_argument("--grid", nargs="+", default=[], metavar="METHOD=LR,LR,...",
                   help="a method's lr grid instead of the default (e.g. lora=1e-3,4e-3)")
    p.add_argument("--no-extend", action="store_true", help="no extra lr past an edge of the grid")
    p.add_argument("--output-dir", default="bench-results/glue", help="records, glue.json, glue.md")
    p.add_argument("--work-dir", help="the runs while they train, and the bases (default: OUTPUT_DIR/work)")
    p.add_argument("--report-only", action="store_true", help="rebuild glue.json / glue.md from the records")
    add_config_arguments(p, RunConfig, skip=("task", "method", "mode", "rest", "lr", "lora_rank", "prompts",
                                              "max_prompts", "max_new_tokens"), group="runs", defaults=PROTOCOL)


def available_tasks(data_dir: str | Path) -> list[str]:
    """The GLUE tasks whose folder holds a train.tsv, in the paper's order."""
    return [t for t, folder in GLUE_FOLDERS.items() if (Path(data_dir) / folder / "train.tsv").is_file()]


def _grids(args: argparse.Namespace) -> dict[str, dict[str, tuple[float, ...]]]:
    """setting -> method -> lr grid, with --grid's overrides (for every setting)."""
    overrides = {}
    for item in args.grid:
        label, _, values = item.partition("=")
        if label not in METHODS and label not in LEVERS:
            raise ValueError(f"--grid {item}: {label!r} is not a method; choose from {', '.join([*METHODS, *LEVERS])}")
        try:
            overrides[label] = tuple(sorted(float(v) for v in values.split(",")))
        except ValueError:
            raise ValueError(f"--grid {item}: give METHOD=LR,LR,... (e.g. lora=1e-3,4e-3)") from None
        if not overrides[label] or min(overrides[label]) <= 0:
            raise ValueError(f"--grid {item}: learning rates are positive numbers")
    labels = [*METHODS, *LEVERS]
    return {s: {m: overrides.get(m, GRIDS[s].get(m, GRIDS[s]["default"])) for m in labels} for s in SETTINGS}


def plan(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(setting, task, method) in the order they run: the PEFT setting first, task by task."""
    out = []
    for setting in args.settings:
        for task in args.tasks:
            labels = list(args.methods) + ([m for m in args.levers if m not in args.methods] if setting == "head" else [])
            out += [(setting, task, m) for m in labels]
    return out


def run(args: argparse.Namespace) -> dict:
    out = Path(args.output_dir)
    grids = _grids(args)
    failed: list[str] = []
    if not args.report_only:
        if not args.data_dir:
            raise ValueError("bench glue needs --data-dir: a GLUE folder with DIR/<TASK>/{train,dev}.tsv")
        args.tasks = args.tasks or available_tasks(args.data_dir)
        if not args.tasks:
            raise ValueError(f"--data-dir {args.data_dir}: no GLUE task folder with a train.tsv "
                             f"(expected e.g. {Path(args.data_dir) / 'SST-2' / 'train.tsv'})")
        unknown = [t for t in args.tasks if t not in TASKS or t not in GLUE_FOLDERS]
        if unknown:
            raise ValueError(f"--tasks {' '.join(unknown)}: not GLUE tasks; choose from {', '.join(GLUE_FOLDERS)}")
        base = from_args(RunConfig, args, task=args.tasks[0])
        heldout = {task: heldout_count(task, args.data_dir, args.heldout) for task in args.tasks}
        work = Path(args.work_dir or out / "work")
        todo = [(s, t, m, replace(base, task=t, rest=s, heldout=heldout[t], **_options(m))) for s, t, m in plan(args)]
        for setting, task, label, cfg in todo:
            check_records(out / "runs" / setting / task / label, cfg)
        for n, (setting, task, label, cfg) in enumerate(todo, 1):
            print(f"== [{n}/{len(todo)}] {setting} {task} {label}", file=sys.stderr, flush=True)
            spec = {"config": asdict(cfg), "label": label,
                    "setting": setting, "grid": grids[setting][label], "seeds": args.seeds,
                    "extend": not args.no_extend, "records": str(out / "runs" / setting / task / label),
                    "work": str(work / setting / task / label), "bases_dir": str(work / task)}
            try:  # a fresh process per method: its peak memory and its imports are its own
                run_in_process("sparsegrad.bench.glue:search_and_seeds", spec, show_output=True)
            except WorkerError as err:
                print(f"sparsegrad: {setting} {task} {label} failed: {err}", file=sys.stderr)
                failed.append(f"{setting} {task} {label}")
    result = {**summarize(read_records(out / "runs")), "failed": failed}
    write_json_atomic(out / "glue.json", result)
    write_text_atomic(out / "glue.md", markdown(result) + "\n")
    return result


def heldout_count(task: str, data_dir: str, heldout: float | None) -> int | None:
    """The held-out examples of a task: --heldout (a count, or a share), at most HELDOUT_SHARE of its training set."""
    if heldout is None:
        return None
    from ..recipes.data import load_task

    n = len(load_task(task, data_dir).train)
    return min(round(heldout * n) if heldout < 1 else int(heldout), round(HELDOUT_SHARE * n))


def _options(label: str) -> dict:
    return {**METHODS, **LEVERS}[label]


# ---------------------------------------------------------------- one method: the search, then the seeds

def search_and_seeds(spec: dict) -> dict:
    """In the worker: the lr search on the first seed, then the other seeds at the chosen lr."""
    import transformers

    from ..recipes.experiment import validate

    transformers.logging.set_verbosity_error()
    cfg = RunConfig(**spec["config"])
    records, work = Path(spec["records"]), Path(spec["work"])
    data = validate(cfg)
    grid, first = sorted(spec["grid"]), spec["seeds"][0]
    scores = {lr: _run(cfg, lr, first, spec, data) for lr in grid}
    if spec["extend"]:
        for _ in range(2):  # past the edge the best sits on, at most twice
            lr = beyond_edge(scores)
            if lr is None:
                break
            scores[lr] = _run(cfg, lr, first, spec, data)
    lr = choose_lr(scores)
    for seed in spec["seeds"][1:]:
        _run(cfg, lr, seed, spec, data)
    shutil.rmtree(work, ignore_errors=True)
    return {"lr": lr, "records": str(records)}


def choose_lr(scores: dict[float, float | None]) -> float:
    """The lr of the best held-out score (a diverged run has none); ties go to the smaller lr."""
    finite = {lr: s for lr, s in scores.items() if s is not None and math.isfinite(s)}
    if not finite:
        return min(scores)
    return max(sorted(finite), key=lambda lr: finite[lr])


def beyond_edge(scores: dict[float, float | None]) -> float | None:
    """The next lr past the grid's edge when the best score sits there, strictly above its neighbour's."""
    lrs = sorted(scores)
    best = choose_lr(scores)
    if len(lrs) < 2 or best not in (lrs[0], lrs[-1]):
        return None
    inner = lrs[1] if best == lrs[0] else lrs[-2]
    if scores[inner] is not None and not scores[best] > scores[inner]:
        return None
    return best / GRID_STEP if best == lrs[0] else best * GRID_STEP


def record_name(lr: float, seed: int) -> str:
    return f"lr{lr:.3g}-seed{seed}.json"


def _run(cfg: RunConfig, lr: float, seed: int, spec: dict, data) -> float | None:
    """One run (or its record, when it finished before); returns its held-out score."""
    from ..recipes.finetune import finetune

    path = Path(spec["records"]) / record_name(lr, seed)
    run_cfg = replace(cfg, lr=lr, seed=seed)
    if path.is_file():
        record = json.loads(path.read_text())
        return record["heldout_score"]
    # the bases are the task's, shared by every run that takes them from the pretrained model; after a
    # head warm-up they are the run's own (they depend on its lr and seed)
    bases = None if run_cfg.bases_warmup_steps else Path(spec["bases_dir"]) / "bases.safetensors"
    run_dir = Path(spec["work"]) / path.stem
    start = time.time()
    result = finetune(run_cfg, run_dir, bases_file=bases, resume=True, data=data, progress=False)
    record = make_record(spec["setting"], spec["label"], run_cfg, result, data, time.time() - start)
    write_json_atomic(path, record)
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"{spec['setting']} {cfg.task} {spec['label']} lr {lr:g} seed {seed}: held-out "
          f"{_fmt(record['heldout_score'])}, dev {_fmt(record['dev_score'])}", file=sys.stderr, flush=True)
    return record["heldout_score"]


def _fmt(x: float | None) -> str:
    return "diverged" if x is None else f"{100 * x:.1f}"


def make_record(setting: str, label: str, cfg: RunConfig, result, data, seconds: float) -> dict:
    """What a table needs of one run: its scores, its lr, its cost, and when it ran."""
    from ..recipes.data import HELDOUT
    from ..recipes.glue import majority_baseline

    held, dev = HELDOUT, next(s for s in data.eval if s != HELDOUT)
    metric = data.task.metric
    return {"setting": setting, "task": cfg.task, "method": label, "lr": cfg.lr, "seed": cfg.seed,
            "metric": metric, "status": result.status,
            "heldout_score": result.final.get(held, {}).get(metric), "dev_score": result.final.get(dev, {}).get(metric),
            "dev": result.final.get(dev, {}), "dev_majority": majority_baseline(data.task, data.train, data.eval[dev])[metric],
            "best_step": result.best_step, "train_steps": result.train_steps,
            "trainable": result.method["trainable"], "trainable_mlp": result.method["trainable_mlp"],
            "lora_rank": result.method.get("lora_rank"), "train_examples": len(data.train),
            "heldout_examples": len(data.eval[held]), "dev_examples": len(data.eval[dev]),
            "steps_per_s": result.steps_per_s, "seconds": seconds,
            "nonzero_row_share": result.nonzero_row_share,  # per step, the sparse layers' (paper Fig. 3)
            "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "config": record_config(cfg)}


def record_config(cfg: RunConfig) -> dict:
    """The options that differ from the defaults, less where the data lives (a path of the machine) and
    the lr and seed (the record's own fields): what every run of a method in one table shares."""
    return {k: v for k, v in cfg.changed().items() if k not in ("data_dir", "lr", "seed")}


def check_records(folder: Path, cfg: RunConfig) -> None:
    """Refuse to mix in records that runs with other options left in `folder`."""
    for path in sorted(folder.glob("*.json")):
        saved = json.loads(path.read_text())["config"]
        if saved != record_config(cfg):
            diff = "; ".join(f"{k} {saved.get(k)!r} -> {record_config(cfg).get(k)!r}"
                             for k in sorted(set(saved) | set(record_config(cfg))) if saved.get(k) != record_config(cfg).get(k))
            raise ValueError(f"{path} was made with other options ({diff}): use another --output-dir, or the "
                             "options it was made with")


# ---------------------------------------------------------------- the tables, from the records

def read_records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/*/*/*.json"))]


def summarize(records: list[dict]) -> dict:
    """Per (setting, task, method): the chosen lr (best held-out score of the first seed), the dev
    scores of the seeds at that lr, the search's scores; the compute the records took."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["setting"], r["task"], r["method"]), []).append(r)
    rows = []
    for (setting, task, method), rs in groups.items():
        first = min(r["seed"] for r in rs)
        search = {r["lr"]: r["heldout_score"] for r in rs if r["seed"] == first}
        lr = choose_lr(search)
        at_lr = sorted((r for r in rs if r["lr"] == lr), key=lambda r: r["seed"])
        dev = [r["dev_score"] for r in at_lr]
        done = all(d is not None for d in dev)
        rows.append({"setting": setting, "task": task, "method": method, "metric": rs[0]["metric"], "lr": lr,
                     "seeds": [r["seed"] for r in at_lr], "dev_scores": dev,
                     "mean": float(np.mean(dev)) if done else None, "std": float(np.std(dev)) if done else None,
                     "search": {f"{k:g}": v for k, v in sorted(search.items())},
                     "dev_majority": rs[0]["dev_majority"], "trainable": rs[0]["trainable"],
                     "trainable_mlp": rs[0]["trainable_mlp"], "lora_rank": rs[0]["lora_rank"],
                     "train_examples": rs[0]["train_examples"], "heldout_examples": rs[0]["heldout_examples"],
                     "epochs": rs[0]["config"].get("epochs"), "runs": len(rs),
                     "seconds": sum(r["seconds"] for r in rs)})
    dates = sorted(r["finished_at"] for r in records)
    return {"rows": rows, "runs": len(records), "compute_seconds": sum(r["seconds"] for r in records),
            "first_run": dates[0] if dates else None, "last_run": dates[-1] if dates else None}


ORDER = [*METHODS, *LEVERS]
LEVER_TABLE = ("lora", "sparsegrad-fixed", "sparsegrad-refresh", "sparsegrad-warm", "sparsegrad-dynamic")


def markdown(result: dict) -> str:
    """Per setting: methods x tasks, dev metric mean ± std over seeds (x100) and the lr it used."""
    lines = []
    for setting in SETTINGS:
        rows = [r for r in result["rows"] if r["setting"] == setting]
        if not rows:
            continue
        tasks = list(dict.fromkeys(r["task"] for r in rows))
        methods = sorted(dict.fromkeys(r["method"] for r in rows), key=ORDER.index)
        title = "PEFT setting (rest=head)" if setting == "head" else "paper setting (rest=all)"
        lines += [f"**{title}**", "",
                  "| method | MLP trainable | " + " | ".join(f"{t} ({_metric(rows, t)})" for t in tasks) + " |",
                  "|---|---:|" + "---:|" * len(tasks)]
        for m in methods:
            cells, first = [], None
            for t in tasks:
                row = next((r for r in rows if r["task"] == t and r["method"] == m), None)
                first = first or row
                cells.append(_cell(row))
            name = m + (f" (r={first['lora_rank']})" if first and first["lora_rank"] else "")
            lines.append(f"| {name} | {first['trainable_mlp']:,} | " + " | ".join(cells) + " |")
        majority = [next(r for r in rows if r["task"] == t)["dev_majority"] for t in tasks]
        lines += ["| majority class | 0 | " + " | ".join(f"{100 * v:.1f}" for v in majority) + " |", ""]
    return "\n".join(lines)


def lever_table(result: dict) -> str:
    """The PEFT setting's SparseGrad variants against LoRA and fixed: the dev score per task, and each
    variant's difference from fixed with the larger of the two seed spreads (x100)."""
    rows = [r for r in result["rows"] if r["setting"] == "head" and r["method"] in LEVER_TABLE]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    if not any(r["method"] in LEVERS for r in rows):
        return ""
    get = {(r["task"], r["method"]): r for r in rows}
    lines = ["| variant | " + " | ".join(f"{t}: score | vs fixed" for t in tasks) + " |",
             "|---|" + "---:|---:|" * len(tasks)]
    for m in LEVER_TABLE:
        cells = []
        for t in tasks:
            row, fixed = get.get((t, m)), get.get((t, "sparsegrad-fixed"))
            cells.append(_cell(row))
            if row and fixed and row["mean"] is not None and fixed["mean"] is not None and m != "sparsegrad-fixed":
                diff, spread = row["mean"] - fixed["mean"], max(row["std"], fixed["std"])
                cells.append(f"{100 * diff:+.1f} (spread {100 * spread:.1f})")
            else:
                cells.append("")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def beats(result: dict, method: str, other: str, setting: str = "head") -> list[str]:
    """The tasks on which `method` beats `other` by more than the larger seed spread (std) of the two."""
    get = {(r["task"], r["method"]): r for r in result["rows"] if r["setting"] == setting}
    out = []
    for (task, m), row in get.items():
        base = get.get((task, other))
        if m == method and base and row["mean"] is not None and base["mean"] is not None \
                and row["mean"] - base["mean"] > max(row["std"], base["std"]):
            out.append(task)
    return sorted(out)


def _metric(rows: list[dict], task: str) -> str:
    return next(r["metric"] for r in rows if r["task"] == task)


def _cell(row: dict | None) -> str:
    if row is None:
        return ""
    if row["mean"] is None:
        return f"diverged (lr {row['lr']:.2g})"
    n = len(row["seeds"])
    return f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f} (lr {row['lr']:.2g}{'' if n >= 3 else f', {n} seed'})"


def main(args: argparse.Namespace) -> int:
    result = run(args)
    print(markdown(result))
    print(f"\n{result['runs']} runs, {result['compute_seconds'] / 3600:.2f} h; results: "
          f"{Path(args.output_dir) / 'glue.json'}, {Path(args.output_dir) / 'glue.md'}")
    if result["failed"]:
        print(f"failed: {'; '.join(result['failed'])} (their output above; --resume is implicit: run again)",
              file=sys.stderr)
    return 1 if result["failed"] else 0
