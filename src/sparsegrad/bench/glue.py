"""GLUE benchmark with a fair protocol (paper Table 4): every method at its own learning rate,
in the PEFT setting (`rest=head`: the task head and the MLP method train) and the paper's
(`rest=all`: every non-MLP parameter trains too), on the GLUE tasks found in --data-dir.

    sparsegrad bench glue --data-dir ../shared/glue --output-dir docs/results/glue
    sparsegrad bench glue --data-dir ../shared/glue --tasks sst2 --settings head   # one sitting's share

Per setting, task and method, protocol.py's search: seed 0 at each lr of the method's grid (3 values,
4x apart; one more past a winning edge), trained on the training subset with 500 other training
examples (at most a fifth of the set) held out to select on (--heldout); then seeds 1 and 2 at the
chosen lr; the score is the dev set's metric, mean ± std over the seeds -- dev chooses nothing.
The levers of SparseGrad (support refresh, bases after a head warm-up) run in the PEFT setting
beside the others.

Each run's record is out/runs/<setting>/<task>/<method>/lr<lr>-seed<s>.json; the bench resumes from
them, so the table can be built over several sittings: commit them. out/glue.json and out/glue.md
are rebuilt from every record found, each time the bench runs (`--report-only`: without running).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from sparsegrad.util import write_json_atomic, write_text_atomic

from ..recipes.config import RunConfig, from_args
from ..recipes.config import add_arguments as add_config_arguments
from ..recipes.tasks import GLUE_FOLDERS, TASKS
from .protocol import (
    add_workers_argument,
    cell,
    choose_lr,
    finished,
    group_spec,
    margin,
    read_records,
    run_groups,
    summarize,
)

SETTINGS = ("head", "all")
# method label -> the run options that make it (its lr grid: GRIDS)
METHODS: dict[str, dict] = {
    "ft": {"method": "ft"},
    "lora": {"method": "lora"},                      # rank matched to SparseGrad's trainable count
    "lora-r8": {"method": "lora", "lora_rank": 8},   # the paper's LoRA rank (7-8)
    "meprop": {"method": "meprop"},
    "sparsegrad-fixed": {"method": "sparsegrad", "mode": "fixed"},
    "sparsegrad-dynamic": {"method": "sparsegrad", "mode": "dynamic"},
    "sparsegrad-block": {"method": "sparsegrad", "mode": "fixed", "structure": "block"},
}
LEVERS: dict[str, dict] = {
    "sparsegrad-refresh": {"method": "sparsegrad", "mode": "fixed", "refresh_steps": 50},
    "sparsegrad-warm": {"method": "sparsegrad", "mode": "fixed", "bases_warmup_steps": 30},
}
GRIDS = {  # the centre is where the method learned on short probes; the search moves past an edge
    "head": {"ft": (1e-4, 4e-4, 1.6e-3), "meprop": (1e-4, 4e-4, 1.6e-3), "default": (5e-4, 2e-3, 8e-3)},
    "all": {"ft": (2.5e-5, 1e-4, 4e-4), "meprop": (2.5e-5, 1e-4, 4e-4), "default": (1e-4, 4e-4, 1.6e-3)},
}
PROTOCOL = {"epochs": 3, "heldout": 500}
# the training subset per task: large enough that full fine-tuning beats the majority class. CoLA at 1000
# leaves full FT near it (Matthews 0 to 0.05 over 3 lrs and 3 seeds); at 4000 it reaches 0.12 ± 0.02.
# MRPC at 1000 gives F1 81.2, the majority's (lr 1e-4, seed 0); at 2000 84.6 (accuracy 76.2 against 68.4),
# at 3000 83.5 in 1.5x the time.
TRAIN_SAMPLES = {"default": 1000, "cola": 4000, "mrpc": 2000}
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
    p.add_argument("--max-train-samples", type=int,
                   help=f"the training subset of every task (default: {TRAIN_SAMPLES['default']}; "
                        + ", ".join(f"{t} {n}" for t, n in TRAIN_SAMPLES.items() if t != "default") + ")")
    add_workers_argument(p)
    add_config_arguments(p, RunConfig, skip=("task", "method", "mode", "structure", "rest", "lr", "lora_rank", "prompts",
                                              "max_prompts", "max_new_tokens", "max_train_samples"),
                         group="runs", defaults=PROTOCOL)


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
        groups = []
        for setting, task, label in plan(args):
            cfg = replace(base, task=task, rest=setting, heldout=heldout[task], **_options(label),
                          max_train_samples=train_subset(task, args.max_train_samples))
            # the bases are the task's, shared by every run that takes them from the pretrained model;
            # after a head warm-up they are each run's own (they depend on its lr and seed)
            bases = None if cfg.bases_warmup_steps else work / task / "bases.safetensors"
            groups.append(group_spec(f"{setting} {task} {label}", cfg, grid=grids[setting][label], seeds=args.seeds,
                                     extend=not args.no_extend, records=out / "runs" / setting / task / label,
                                     work=work / setting / task / label, bases=bases,
                                     keys={"setting": setting, "method": label}))
        failed = run_groups(groups, args.workers)
    result = {**summarize(read_records(out / "runs"), KEYS), "failed": failed}
    write_json_atomic(out / "glue.json", result)
    write_text_atomic(out / "glue.md", markdown(result) + "\n")
    return result


def train_subset(task: str, requested: int | None) -> int:
    """The training examples a task's runs take: --max-train-samples, else the task's TRAIN_SAMPLES."""
    return requested or TRAIN_SAMPLES.get(task, TRAIN_SAMPLES["default"])


def heldout_count(task: str, data_dir: str, heldout: float | None) -> int | None:
    """The held-out examples of a task: --heldout (a count, or a share), at most HELDOUT_SHARE of its training set."""
    if heldout is None:
        return None
    from ..recipes.data import load_task

    n = len(load_task(task, data_dir).train)
    return min(round(heldout * n) if heldout < 1 else int(heldout), round(HELDOUT_SHARE * n))


def _options(label: str) -> dict:
    return {**METHODS, **LEVERS}[label]


KEYS = ("setting", "task", "method")  # a row of the tables
_SETTING_NAMES = {"head": "PEFT setting (rest=head)", "all": "paper setting (rest=all)"}
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
        title = _SETTING_NAMES[setting]
        lines += [f"**{title}**", "",
                  "| method | MLP trainable | " + " | ".join(f"{t} ({_metric(rows, t)})" for t in tasks) + " |",
                  "|---|---:|" + "---:|" * len(tasks)]
        for m in methods:
            cells, first = [], None
            for t in tasks:
                row = next((r for r in rows if r["task"] == t and r["method"] == m), None)
                first = first or row
                cells.append(cell(row))
            name = m + (f" (r={first['lora_rank']})" if first and first["lora_rank"] else "")
            lines.append(f"| {name} | {first['trainable_mlp']:,} | " + " | ".join(cells) + " |")
        majority = [next(r for r in rows if r["task"] == t)["dev_baseline"] for t in tasks]
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
    done = {(r["task"], r["method"]) for r in finished(result, "head")}
    lines = ["| variant | " + " | ".join(f"{t}: score | vs fixed" for t in tasks) + " |",
             "|---|" + "---:|---:|" * len(tasks)]
    for m in (m for m in LEVER_TABLE if any(r["method"] == m for r in rows)):
        cells = []
        for t in tasks:
            row, fixed = get.get((t, m)), get.get((t, "sparsegrad-fixed"))
            cells.append(cell(row))
            gap = margin(row, fixed) if m != "sparsegrad-fixed" and {(t, m), (t, "sparsegrad-fixed")} <= done else None
            if gap is not None:
                cells.append(f"{100 * gap[0]:+.1f} (spread {100 * gap[1]:.1f})")
            else:
                cells.append("")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_lrs(result: dict, setting: str) -> dict[str, dict]:
    """The lr each method of `setting` should default to: the one with the best mean held-out score (seed 0,
    x100) over the tasks that measure something -- those where full fine-tuning's finished row beats the
    majority class on dev -- counting the tasks where the method is finished and the lrs it tried on each.
    Per method: {"lr", "tasks", "means": {lr: mean held-out score}}; methods with no such task are left out."""
    rows = finished(result, setting)
    measured = [r["task"] for r in rows if r["method"] == "ft" and r["mean"] > r["dev_baseline"]]
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        counted = [r for r in rows if r["method"] == method and r["task"] in measured]
        if not counted:
            continue
        searches = [r["search"] for r in counted]
        lrs = set.intersection(*(set(s) for s in searches))  # lrs as the summary's keys ("0.0001")
        means = {float(lr): 100 * sum(s[lr] or 0.0 for s in searches) / len(searches) for lr in lrs}
        out[method] = {"lr": choose_lr(means), "tasks": sorted(r["task"] for r in counted),
                       "means": dict(sorted(means.items()))}
    return out


def default_lr_table(result: dict) -> str:
    """Per method and setting: the mean held-out score (x100) of each lr over the tasks that measure something,
    the chosen lr in bold -- the evidence for the recipes' default lrs."""
    choices = {setting: default_lrs(result, setting) for setting in SETTINGS}
    methods = sorted({m for c in choices.values() for m in c}, key=ORDER.index)
    if not methods:
        return ""
    lines = ["| method | " + " | ".join(f"{_SETTING_NAMES[s]}: mean held-out score per lr" for s in SETTINGS) + " |",
             "|---|" + "---|" * len(SETTINGS)]
    for m in methods:
        cells = []
        for setting in SETTINGS:
            c = choices[setting].get(m)
            cells.append("" if c is None else ", ".join((f"**{lr:g}: {v:.1f}**" if lr == c["lr"] else f"{lr:g}: {v:.1f}")
                                                        for lr, v in c["means"].items()) + f" ({', '.join(c['tasks'])})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(result: dict, method: str, other: str, setting: str = "head") -> dict[str, list[str]]:
    """The tasks on which `method` beats `other` ("wins"), loses to it ("loses"), by more than the larger seed
    spread (std) of the two, or is within that spread ("within"); tasks where either is unfinished are left out."""
    get = {(r["task"], r["method"]): r for r in finished(result, setting)}
    out = {"wins": [], "loses": [], "within": []}
    for task in sorted({t for t, _ in get}):
        gap = margin(get.get((task, method)), get.get((task, other)))
        if gap is not None:
            out["wins" if gap[0] > gap[1] else "loses" if -gap[0] > gap[1] else "within"].append(task)
    return out


def _metric(rows: list[dict], task: str) -> str:
    return next(r["metric"] for r in rows if r["task"] == task)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    print(markdown(result))
    print(f"\n{result['runs']} runs, {result['compute_seconds'] / 3600:.2f} h; results: "
          f"{Path(args.output_dir) / 'glue.json'}, {Path(args.output_dir) / 'glue.md'}")
    if result["failed"]:
        print(f"failed: {'; '.join(result['failed'])} (their output above; --resume is implicit: run again)",
              file=sys.stderr)
    return 1 if result["failed"] else 0
