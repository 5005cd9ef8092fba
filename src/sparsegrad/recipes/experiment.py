"""A command's worth of runs: validate, optionally search hyper-parameters, run every seed, and
summarise (summary.json + summary.md).

Output folder of `finetune`:
    command.json          the options (a resumed command must match them)
    .lock                 held while a command runs there (lock.py)
    bases.safetensors     the preliminary phase's bases, shared by seeds and trials
    optuna.db, trials/    with --optimize N (resumable SQLite study; search.py)
    seed-<s>/             one run per seed: results.json, best/model.safetensors, adapter/, checkpoints/
    summary.json, summary.md
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from sparsegrad.model import DEFAULT_DENSITY
from sparsegrad.targets import find_targets
from sparsegrad.util import write_json_atomic, write_text_atomic

from .config import RunConfig
from .data import encode_task, load_task
from .finetune import finetune
from .kinds import kind_of
from .lock import LOCK_FILE, FolderLock
from .methods import head_parameters, sparse_budget
from .models import load_model
from .results import Summary, SummaryRow, markdown_table
from .tasks import TaskData


class RunFolderError(ValueError):
    """The output folder holds something this command must not overwrite."""


# ---------------------------------------------------------------- validation, before anything is written

def validate(cfg: RunConfig, bases: str | None = None) -> TaskData:
    """Load the data and the model once and check every option against them; raise a clear
    ValueError otherwise. Returns the data (so it is read once)."""
    if cfg.density is not None and cfg.n_params is not None:
        raise ValueError("pass --density or --n-params, not both")
    for name in ("epochs", "max_steps", "batch_size", "grad_accum", "max_length", "bases_steps", "eval_steps",
                 "save_steps", "max_prompts", "max_new_tokens", "refresh_steps"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise ValueError(f"--lr must be positive, got {cfg.lr}")
    if bases is not None and not Path(bases).is_file():
        raise ValueError(f"--bases {bases}: no such file; pass a file saved by Bases.save (e.g. a run's "
                         "bases.safetensors) or leave --bases out to compute them")
    data = load_task(cfg.task, cfg.data_dir, max_train_samples=cfg.max_train_samples, heldout=cfg.heldout,
                     max_eval_samples=cfg.max_eval_samples)
    if cfg.prompts:
        if not kind_of(data.task).answers_prompts:
            raise ValueError("--prompts answers prompts with a decoder: it belongs to --task chat")
        from .chat import read_prompts

        read_prompts(cfg.prompts)
    tokenizer, model = load_model(cfg.model, data.task, cfg.dtype)
    encode_task(data, tokenizer, cfg)  # data errors the tokenizer finds (a chat template's) come out here
    if cfg.gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"--gradient-checkpointing: {type(model).__name__} does not support it; leave the flag out")
    layers = find_targets(model, cfg.targets, blocks=cfg.blocks)
    try:
        sparse_budget(layers, cfg.density, cfg.n_params)
    except ValueError as err:
        raise ValueError(f"{'--n-params' if cfg.n_params is not None else '--density'}: {err}") from None
    if cfg.rest == "head" or cfg.bases_warmup_steps:
        head_parameters(model)
    if cfg.bases_warmup_steps < 0:
        raise ValueError(f"--bases-warmup-steps must be 0 or more, got {cfg.bases_warmup_steps}")
    if cfg.bases_warmup_steps and cfg.method != "sparsegrad":
        raise ValueError("--bases-warmup-steps warms the head up before SparseGrad's preliminary phase: it belongs "
                         "to --method sparsegrad")
    if cfg.bases_warmup_steps and bases is not None:
        raise ValueError("--bases-warmup-steps computes the bases after the warm-up: leave --bases out")
    if cfg.structure != "scattered" and (cfg.method, cfg.mode) != ("sparsegrad", "fixed"):
        raise ValueError(f"--structure {cfg.structure} shapes the fixed mode's support: it belongs to --method "
                         "sparsegrad --mode fixed")
    if cfg.refresh_steps is not None and (cfg.method, cfg.mode) != ("sparsegrad", "fixed"):
        raise ValueError("--refresh-steps re-chooses the fixed support: it belongs to --method sparsegrad --mode fixed")
    if cfg.refresh_steps is not None and (cfg.dtype != "float32" or cfg.fsdp):
        raise ValueError("--refresh-steps runs on float32 weights without --fsdp: leave --dtype and --fsdp out")
    return data


@contextlib.contextmanager
def claimed_folder(out: Path, command: dict, resume: bool) -> Iterator[None]:
    """Hold `out` for the command's duration (an exclusive lock: lock.py); it must be empty, or hold
    this very command (with --resume). Writes command.json."""
    out = Path(out)
    if out.is_dir() and not (out / "command.json").is_file():
        _refuse_foreign(out)  # before the lock file is made: a folder of the user's is never touched
    with FolderLock(out):
        _check_folder(out, command, resume)
        yield


def _check_folder(out: Path, command: dict, resume: bool) -> None:
    saved_file = out / "command.json"
    if saved_file.is_file():
        saved = json.loads(saved_file.read_text())
        if not resume:
            raise RunFolderError(f"--output-dir {out} already holds a run: pass --resume to continue it, "
                                 "or choose another --output-dir")
        diff = option_changes(_flat(saved), _flat(command))
        if diff:
            raise RunFolderError(f"--output-dir {out} holds a different run ({diff}): resume it with "
                                 "its own options, or choose another --output-dir")
        return
    _refuse_foreign(out)
    write_json_atomic(saved_file, command)


def option_changes(old: dict, new: dict) -> str:
    """The options that differ, as "name old -> new; ..." (empty when none do)."""
    return "; ".join(f"{k} {_shown(old.get(k))} -> {_shown(new.get(k))}" for k in sorted(set(old) | set(new))
                     if old.get(k) != new.get(k))


def _shown(value) -> str:
    return "default" if value is None else repr(value)  # an option left out is None: its default


def _refuse_foreign(out: Path) -> None:
    """A folder holding anything but the lock, or a command.json whose writer was killed before it was
    renamed into place, is someone else's."""
    if any(p.name != LOCK_FILE and not p.name.startswith(".command.json.tmp") for p in out.iterdir()):
        raise RunFolderError(f"--output-dir {out} is not empty and holds no sparsegrad run: choose another "
                             "--output-dir")


def _flat(command: dict) -> dict:
    """command.json with its config inlined: {"lr": ..., "seeds": ...}."""
    return {**{k: v for k, v in command.items() if k != "config"}, **command.get("config", {})}


# ---------------------------------------------------------------- the command

def run_finetune(cfg: RunConfig, out: str | Path, *, seeds: list[int], optimize_trials: int = 0,
                 bases: str | None = None, resume: bool = False, progress: bool = True) -> Summary:
    """The `sparsegrad finetune` command: returns the summary (also written to out/).
    Under torchrun / accelerate launch every process runs it; rank 0 owns the folder."""
    out = Path(out)
    rank = int(os.environ.get("RANK", "0"))
    if optimize_trials and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--optimize runs in one process: search first, then launch the seeds with torchrun")
    data = validate(cfg, bases)
    command = {"config": {k: v for k, v in cfg.identity().items() if k != "seed"}, "seeds": seeds,
               "optimize": optimize_trials, "bases": bases}
    with claimed_folder(out, command, resume) if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            print(run_story(cfg, data, out, seeds), file=sys.stderr)
        return _run_seeds(cfg, out, seeds, optimize_trials, bases, resume, progress, data, rank)


def run_story(cfg: RunConfig, data: TaskData, out: Path, seeds: list[int]) -> str:
    """The command's first lines: the model, the data and its splits, the method and setting, the folder."""
    from .methods import method_label

    kind = kind_of(data.task)
    model = cfg.model or f"{kind.default_model_name} (embedded)"
    splits = ", ".join(f"{len(examples):,} {name}" for name, examples in data.eval.items())
    classes = f", {data.task.num_labels} classes" if data.task.labels else ""
    method = method_label(cfg.method, cfg.mode, cfg.structure)
    density = DEFAULT_DENSITY if cfg.density is None else cfg.density
    size = (f"{cfg.n_params:,} entries" if cfg.n_params is not None else f"density {density:g}") \
        if cfg.method in ("sparsegrad", "meprop") else ""
    rest = cfg.rest  # resolved by RunConfig: the kind's default where none was given
    rest_says = {"all": "every other parameter trains too", "head": "and the task head",
                 "none": "the MLP part alone"}[rest]
    cfg = cfg.with_default_lr()
    return "\n".join([
        f"model   {model}",
        f"data    {data.task.name}: {len(data.train):,} training / {splits} examples{classes}; from {data.source}",
        (f"method  {method}{f' at {size}' if size else ''} of the MLP linears; --rest {rest} ({rest_says}); "
         f"lr {cfg.lr:g}, batch {cfg.batch_size}, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"),
        f"output  {out}/",
    ])


def _run_seeds(cfg: RunConfig, out: Path, seeds: list[int], optimize_trials: int, bases: str | None, resume: bool,
               progress: bool, data: TaskData, rank: int) -> Summary:
    bases_file = Path(bases) if bases else out / "bases.safetensors"

    search = None
    if optimize_trials:
        from .search import optimize

        search = optimize(replace(cfg, seed=seeds[0]), out, optimize_trials, data, bases_file, progress)
        cfg = replace(cfg, **search["best_params"])
        print(f"best of {optimize_trials} trials: {search['best_params']} ({search['best_value']:.4f})",
              file=sys.stderr)
    runs = [finetune(replace(cfg, seed=s), out / f"seed-{s}", bases_file=bases_file, resume=resume,
                     data=data, progress=progress) for s in seeds]
    summary = Summary(rows=[SummaryRow.from_runs(runs)], runs=[str(out / f"seed-{s}" / "results.json") for s in seeds],
                      search=search)
    if rank == 0:
        summary.save(out / "summary.json")
        write_text_atomic(out / "summary.md", markdown_table(summary.rows) + "\n")
    return summary
