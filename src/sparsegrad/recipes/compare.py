"""`compare`: several methods on the same task, seeds and options, each in a fresh process (so that
its peak memory is its own), into out/<method>/, and one table in out/summary.{json,md}."""
from __future__ import annotations

import sys
from dataclasses import asdict, replace
from pathlib import Path

from sparsegrad.util import write_text_atomic

from .config import RunConfig
from .experiment import claimed_folder, run_finetune
from .methods import split_label
from .process import WorkerError, run_in_process
from .results import Summary, markdown_table


def run_compare(methods: list[str], cfg: RunConfig, out: str | Path, *, seeds: list[int], optimize_trials: int = 0,
                bases: str | None = None, resume: bool = False, progress: bool = False) -> Summary:
    """One `finetune` command per method label ("lora", "sparsegrad-dynamic", ...); the SparseGrad
    entries share the bases the first of them computed (or `bases`)."""
    out = Path(out)
    for label in methods:
        split_label(label)  # unknown labels fail before anything runs
    command = {"compare": methods, "config": {k: v for k, v in cfg.identity().items() if k not in ("method", "mode")},
               "seeds": seeds, "optimize": optimize_trials, "bases": bases}
    with claimed_folder(out, command, resume):
        return _run_methods(methods, cfg, out, seeds, optimize_trials, bases, resume, progress)


def _run_methods(methods: list[str], cfg: RunConfig, out: Path, seeds: list[int], optimize_trials: int,
                 bases: str | None, resume: bool, progress: bool) -> Summary:
    rows, failed = [], []
    shared_bases = bases
    for label in methods:
        run_cfg = replace(cfg, **split_label(label))
        method = run_cfg.method
        spec = {"config": asdict(run_cfg), "out": str(out / label), "seeds": seeds, "optimize": optimize_trials,
                "bases": shared_bases if method == "sparsegrad" else None, "resume": resume, "progress": progress}
        print(f"== {label}", file=sys.stderr, flush=True)
        try:
            summary = Summary.from_dict(run_in_process("sparsegrad.recipes.compare:finetune_worker", spec,
                                                       show_output=True))
        except WorkerError as err:
            print(f"sparsegrad: {label} failed: {err}", file=sys.stderr)
            failed.append(label)
            continue
        rows += summary.rows
        if method == "sparsegrad" and shared_bases is None and (out / label / "bases.safetensors").is_file():
            shared_bases = str(out / label / "bases.safetensors")
    summary = Summary(rows=rows, failed=failed)
    summary.save(out / "summary.json")
    write_text_atomic(out / "summary.md", markdown_table(rows) + "\n")
    return summary


def finetune_worker(spec: dict) -> dict:
    """In the worker process: the `finetune` command of one method; its summary as a dict."""
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = RunConfig(**spec["config"])
    return run_finetune(cfg, spec["out"], seeds=spec["seeds"], optimize_trials=spec["optimize"],
                        bases=spec["bases"], resume=spec["resume"], progress=spec["progress"]).to_dict()
