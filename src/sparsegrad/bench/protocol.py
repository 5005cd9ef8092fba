"""The fair protocol of the quality benchmarks (bench glue, bench chat): every method at its own
learning rate, chosen without looking at the set it is scored on.

Per (setting, task, method) -- a "group", run in a fresh process (--workers: several at a time):
1. the search: the first seed at each lr of the method's grid, trained with part of the training set
   held out (RunConfig.heldout) as the split that selects the best model; when the best lr sits at
   an edge of the grid, strictly better than its neighbour, one more lr beyond it (at most twice);
2. the other seeds at the lr with the best held-out score;
3. the score: the task's own evaluation split ("dev"), mean ± std over the seeds at that lr.

Every finished run leaves a small JSON record, <records>/lr<lr>-seed<s>.json (scores, lr, cost, the device,
when it ran) and nothing else: its model is deleted once recorded. A group resumes from its records (and a run
killed midway from its checkpoint), so a table can be built over several sittings.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from sparsegrad.util import write_json_atomic

from ..recipes.config import RunConfig
from ..recipes.experiment import option_changes
from ..recipes.process import WorkerError, run_in_process, threads_per_worker

GRID_STEP = 4.0  # the grids' spacing, and how far past an edge the search steps


# ---------------------------------------------------------------- the groups, each in a fresh process

def add_workers_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=1,
                   help="groups (method x task) run at a time, each in its own process; more than 1 where the "
                        "cores or a GPU have room (runs that share bases wait for the one computing them); the "
                        "runs' steps/s then share the machine")


def run_groups(groups: list[dict], workers: int = 1) -> list[str]:
    """Run each group's spec (search_and_seeds) in a fresh process, `workers` at a time, after checking that no
    group would mix in records made with other options; the names of the groups that failed."""
    threads = threads_per_worker(workers, "groups")
    for spec in groups:
        check_records(Path(spec["records"]), RunConfig(**spec["config"]))

    def run(n: int, spec: dict) -> str | None:
        print(f"== [{n}/{len(groups)}] {spec['name']}", file=sys.stderr, flush=True)
        try:  # its peak memory and its imports are its own; one at a time, its output streams through
            run_in_process("sparsegrad.bench.protocol:search_and_seeds", {**spec, "threads": threads},
                           show_output=workers == 1)
        except WorkerError as err:
            print(f"sparsegrad: {spec['name']} failed: {err}", file=sys.stderr, flush=True)
            return spec["name"]
        if workers > 1:
            print(f"== done: {spec['name']}", file=sys.stderr, flush=True)
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:  # threads only wait: each group is a process
        failed = list(pool.map(lambda item: run(*item), enumerate(groups, 1)))
    return [name for name in failed if name is not None]


def group_spec(name: str, cfg: RunConfig, *, grid: tuple[float, ...], seeds: list[int], extend: bool,
               records: Path, work: Path, bases: Path | None, keys: dict) -> dict:
    """What search_and_seeds takes. keys: what the records say they belong to ({"setting": ..., "method": ...});
    bases: the bases file the group's runs share (None: each run computes its own)."""
    return {"name": name, "config": asdict(cfg), "grid": list(grid), "seeds": seeds, "extend": extend,
            "records": str(records), "work": str(work), "bases": None if bases is None else str(bases), "keys": keys}


def search_and_seeds(spec: dict) -> dict:
    """In the worker: the lr search on the first seed, then the other seeds at the chosen lr."""
    import torch
    import transformers

    from ..recipes.experiment import validate

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    cfg = RunConfig(**spec["config"])
    data = validate(cfg)
    maximize = data.task.greater_is_better
    first = spec["seeds"][0]
    scores = {lr: run_one(cfg, lr, first, spec, data) for lr in sorted(spec["grid"])}
    if spec["extend"]:
        for _ in range(2):  # past the edge the best sits on, at most twice
            lr = beyond_edge(scores, maximize)
            if lr is None:
                break
            scores[lr] = run_one(cfg, lr, first, spec, data)
    lr = choose_lr(scores, maximize)
    for seed in spec["seeds"][1:]:
        run_one(cfg, lr, seed, spec, data)
    shutil.rmtree(spec["work"], ignore_errors=True)
    return {"lr": lr}


def choose_lr(scores: dict[float, float | None], maximize: bool = True) -> float:
    """The lr of the best held-out score (a diverged run has none); ties go to the smaller lr."""
    finite = {lr: s if maximize else -s for lr, s in scores.items() if s is not None and math.isfinite(s)}
    if not finite:
        return min(scores)
    return max(sorted(finite), key=lambda lr: finite[lr])


def beyond_edge(scores: dict[float, float | None], maximize: bool = True) -> float | None:
    """The next lr past the grid's edge when the best score sits there, strictly better than its neighbour's."""
    lrs = sorted(scores)
    best = choose_lr(scores, maximize)
    if len(lrs) < 2 or best not in (lrs[0], lrs[-1]):
        return None
    inner = scores[lrs[1] if best == lrs[0] else lrs[-2]]
    if inner is not None and not (scores[best] > inner if maximize else scores[best] < inner):
        return None
    return best / GRID_STEP if best == lrs[0] else best * GRID_STEP


def record_name(lr: float, seed: int) -> str:
    return f"lr{lr:.3g}-seed{seed}.json"


def run_one(cfg: RunConfig, lr: float, seed: int, spec: dict, data) -> float | None:
    """One run (or its record, when it finished before); returns its held-out score."""
    from ..recipes.finetune import finetune

    path = Path(spec["records"]) / record_name(lr, seed)
    if path.is_file():
        return json.loads(path.read_text())["heldout_score"]
    run_cfg = replace(cfg, lr=lr, seed=seed)
    run_dir = Path(spec["work"]) / path.stem
    start = time.time()
    result = finetune(run_cfg, run_dir, bases_file=spec["bases"], resume=True, data=data, progress=False)
    record = {**spec["keys"], **make_record(run_cfg, result, data, time.time() - start)}
    write_json_atomic(path, record)
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"{spec['name']} lr {lr:g} seed {seed}: held-out {_fmt(record['heldout_score'])}, "
          f"dev {_fmt(record['dev_score'])}", file=sys.stderr, flush=True)
    return record["heldout_score"]


def _fmt(x: float | None) -> str:
    return "diverged" if x is None else f"{x:.4g}"


def make_record(cfg: RunConfig, result, data, seconds: float) -> dict:
    """What a table needs of one run: its scores, its lr, its cost, and when it ran."""
    from ..recipes.data import HELDOUT
    from ..recipes.glue import majority_baseline

    held, dev = HELDOUT, next(s for s in data.eval if s != HELDOUT)
    metric = data.task.metric
    # the score to beat on dev: the majority class, or (a decoder) the untrained model on the held-out split
    baseline = (majority_baseline(data.task, data.train, data.eval[dev]) if result.baseline_kind == "majority class"
                else result.baseline)[metric]
    return {"task": cfg.task, "lr": cfg.lr, "seed": cfg.seed, "metric": metric,
            "greater_is_better": data.task.greater_is_better, "status": result.status,
            "heldout_score": result.final.get(held, {}).get(metric), "dev_score": result.final.get(dev, {}).get(metric),
            "dev": result.final.get(dev, {}), "dev_baseline": baseline,
            "baseline_kind": result.baseline_kind, "best_step": result.best_step, "train_steps": result.train_steps,
            "trainable": result.method["trainable"], "trainable_mlp": result.method["trainable_mlp"],
            "lora_rank": result.method.get("lora_rank"), "train_examples": len(data.train),
            "heldout_examples": len(data.eval[held]), "dev_examples": len(data.eval[dev]),
            "steps_per_s": result.steps_per_s, "seconds": seconds,
            "nonzero_row_share": result.nonzero_row_share,  # per step, the sparse layers' (paper Fig. 3)
            "device": device_name(result.device),
            "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "config": record_config(cfg)}


def device_name(device: str) -> str:
    """What trained a run: 'CPU (<threads> threads)', or the GPU's name."""
    from ..recipes.machine import machine

    info = machine(device)
    n = info["threads"]
    return info.get("gpu") or f"CPU ({n} thread{'s' * (n != 1)})"


def record_config(cfg: RunConfig) -> dict:
    """The options that differ from the defaults, less where the data lives (a path of the machine) and
    the lr and seed (the record's own fields): what every run of a method in one table shares."""
    return {k: v for k, v in cfg.changed().items() if k not in ("data_dir", "lr", "seed")}


def check_records(folder: Path, cfg: RunConfig) -> None:
    """Refuse to mix in records that runs with other options left in `folder`."""
    want = record_config(cfg)
    for path in sorted(folder.glob("*.json")):
        saved = json.loads(path.read_text())["config"]
        if saved != want:
            raise ValueError(f"{path} was made with other options ({option_changes(saved, want)}): use another "
                             "--output-dir, or the options it was made with")


# ---------------------------------------------------------------- the tables, from the records

def read_records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("lr*-seed*.json"))]


def summarize(records: list[dict], keys: tuple[str, ...]) -> dict:
    """Per group (the records' `keys`, e.g. setting, task, method): the chosen lr (best held-out score
    of the first seed), the dev scores of the seeds at that lr, the search; the compute it all took."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    rows = []
    for key, rs in groups.items():
        first = min(r["seed"] for r in rs)
        search = {r["lr"]: r["heldout_score"] for r in rs if r["seed"] == first}
        lr = choose_lr(search, rs[0]["greater_is_better"])
        at_lr = sorted((r for r in rs if r["lr"] == lr), key=lambda r: r["seed"])
        dev = [r["dev_score"] for r in at_lr]
        done = all(d is not None for d in dev)
        r0 = rs[0]
        rows.append({**dict(zip(keys, key)), "metric": r0["metric"], "greater_is_better": r0["greater_is_better"],
                     "lr": lr, "seeds": [r["seed"] for r in at_lr], "dev_scores": dev,
                     "mean": float(np.mean(dev)) if done else None, "std": float(np.std(dev)) if done else None,
                     "search": {f"{k:g}": v for k, v in sorted(search.items())},
                     "dev_baseline": r0["dev_baseline"], "baseline_kind": r0["baseline_kind"],
                     "trainable": r0["trainable"], "trainable_mlp": r0["trainable_mlp"], "lora_rank": r0["lora_rank"],
                     "train_examples": r0["train_examples"], "heldout_examples": r0["heldout_examples"],
                     "epochs": r0["config"].get("epochs"), "steps_per_s": float(np.mean([r["steps_per_s"] for r in at_lr])),
                     "runs": len(rs), "seconds": sum(r["seconds"] for r in rs)})
    dates = sorted(r["finished_at"] for r in records)
    devices: dict[str, dict] = {}
    for r in records:
        d = devices.setdefault(r.get("device", "a device not recorded"), {"runs": 0, "seconds": 0.0})
        d["runs"] += 1
        d["seconds"] += r["seconds"]
    return {"rows": rows, "runs": len(records), "compute_seconds": sum(r["seconds"] for r in records),
            "devices": devices, "first_run": dates[0] if dates else None, "last_run": dates[-1] if dates else None}


def finished(result: dict, setting: str) -> list[dict]:
    """The setting's rows scored on as many seeds as the most any row of it has: the others are still being
    built (a search, or seeds, to come) and are left out of the comparisons."""
    rows = [r for r in result["rows"] if r["setting"] == setting and r["mean"] is not None]
    full = max((len(r["seeds"]) for r in rows), default=0)
    return [r for r in rows if len(r["seeds"]) == full]


def margin(row: dict | None, base: dict | None) -> tuple[float, float] | None:
    """(row's mean - base's mean, the larger of their seed spreads), or None where either has no score."""
    if not row or not base or row["mean"] is None or base["mean"] is None:
        return None
    return row["mean"] - base["mean"], max(row["std"], base["std"])


def cell(row: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    """'mean ± std (lr ...)' of a summary row; scores x100 for metrics, x1 for losses."""
    if row is None:
        return ""
    if row["mean"] is None:
        return f"diverged (lr {row['lr']:.2g})"
    n = len(row["seeds"])
    return (f"{scale * row['mean']:.{digits}f} ± {scale * row['std']:.{digits}f} "
            f"(lr {row['lr']:.2g}{'' if n >= 3 else f', {n} seed' + ('s' if n > 1 else '')})")
