"""Typed results: one run's (results.json) and one comparison row (summary.json), and the table."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sparsegrad.util import write_json_atomic

from .methods import method_label


class _Record:
    """JSON round trip of a results dataclass; unknown keys (from newer files) are ignored."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class RunResult(_Record):
    """One run: its configuration, final metrics of the best model on validation, and what it cost."""

    config: dict                      # RunConfig.identity()
    task: str
    metric: str
    greater_is_better: bool
    score: float | None               # the selection split's metric of the best model (None: diverged)
    final: dict                       # split -> metrics of the best model
    best_step: int | None
    baseline: dict                    # metrics of the majority class, or of the untrained model
    baseline_kind: str
    method: dict                      # methods.MethodInfo
    targets: list
    bases: dict | None
    history: list                     # per evaluation: step, epoch, loss, metrics
    nonzero_row_share: list           # per step: share of non-zero rows of dy in the sparse layers (Fig. 3)
    stopped_early: bool
    resumed_at: list
    train_steps: int
    train_seconds: float
    steps_per_s: float | None
    peak_memory_mb: float
    memory_kind: str
    device: str
    processes: int
    examples_per_step: int
    adapter: dict | None
    generations: str | None
    data: dict
    versions: dict
    command: list = field(default_factory=list)
    status: str = "finished"          # or "diverged": then score is None and `message` says why
    message: str | None = None
    warnings: list = field(default_factory=list)
    sharded: bool = False             # FSDP2 over the processes (else DDP, or one process)
    learned: bool | None = None       # did the score beat the baseline? (None: diverged)
    split: str = ""                   # the evaluation split `score` is measured on ("validation", "dev", "heldout")

    def __post_init__(self) -> None:
        if self.learned is None and self.score is not None:
            base = self.baseline.get(self.metric, float("nan"))
            self.learned = bool(self.score > base if self.greater_is_better else self.score < base)

    @property
    def label(self) -> str:
        m = self.method
        return method_label(m["method"], m.get("mode"), m.get("structure") or "scattered")


@dataclass
class SummaryRow(_Record):
    """One row of a table: one method on one task, over seeds."""

    task: str
    method: str                       # a method label: "lora", "sparsegrad-fixed", ...
    rest: str
    metric: str
    mean: float | None                # None when a seed diverged (status "diverged")
    std: float | None
    seeds: list
    scores: list
    baseline: float
    trainable: int
    trainable_mlp: int
    total: int
    lora_rank: int | None
    steps_per_s: float
    peak_memory_mb: float
    lr: float
    batch_size: int
    memory_kind: str = ""
    greater_is_better: bool = True
    adapter_bytes: int | None = None
    model_bytes: int | None = None
    splits: dict = field(default_factory=dict)   # "split/metric" -> mean over seeds
    status: str = "finished"
    message: str | None = None
    not_learned: list = field(default_factory=list)  # seeds whose score did not beat the baseline
    split: str = ""                   # the split the score is measured on

    @classmethod
    def from_runs(cls, runs: list[RunResult]) -> SummaryRow:
        """The row of a method's seeds; if any seed diverged, the row has no score (mean and std None)
        and its status and message say which."""
        first = runs[0]
        diverged = [r for r in runs if r.status != "finished"]
        scores = np.array([r.score for r in runs], dtype=float) if not diverged else None
        splits = {} if diverged else {f"{split}/{name}": float(np.mean([r.final[split][name] for r in runs]))
                                      for split, metrics in first.final.items() for name in metrics}
        return cls(
            task=first.task, method=first.label, rest=first.method["rest"], metric=first.metric,
            mean=None if diverged else float(scores.mean()), std=None if diverged else float(scores.std()),
            seeds=[r.config["seed"] for r in runs], scores=[r.score for r in runs],
            status="diverged" if diverged else "finished",
            message="; ".join(f"seed {r.config['seed']}: {r.message}" for r in diverged) or None,
            baseline=first.baseline[first.metric], greater_is_better=first.greater_is_better,
            trainable=first.method["trainable"], trainable_mlp=first.method["trainable_mlp"],
            total=first.method["total"], lora_rank=first.method["lora_rank"],
            steps_per_s=float(np.mean([r.steps_per_s or 0.0 for r in runs])),
            peak_memory_mb=float(max(r.peak_memory_mb for r in runs)), memory_kind=first.memory_kind,
            lr=first.config["lr"], batch_size=first.config["batch_size"],
            adapter_bytes=(first.adapter or {}).get("bytes"), model_bytes=(first.adapter or {}).get("model_bytes"),
            splits=splits, not_learned=[r.config["seed"] for r in runs if r.learned is False], split=first.split,
        )

    @classmethod
    def from_dict(cls, d: dict) -> SummaryRow:
        # files written before `splits` existed hold "split/metric" keys at the top level
        d = {**d, "splits": d.get("splits") or {k: v for k, v in d.items() if "/" in k}}
        return super().from_dict(d)


@dataclass
class Summary(_Record):
    """What a command wrote: its rows, the result files of its runs, a search, the methods that failed."""

    rows: list[SummaryRow]
    runs: list = field(default_factory=list)
    search: dict | None = None
    failed: list = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> Summary:
        return cls(rows=[SummaryRow.from_dict(r) for r in d.get("rows", [])], runs=d.get("runs", []),
                   search=d.get("search"), failed=d.get("failed", []))


def markdown_table(rows: list[SummaryRow]) -> str:
    """The summary table: the metric on its split (scores x100, losses as they are; mean ± std over
    several seeds), the baseline (majority class, or the untrained model for chat), trainable counts,
    speed, memory and adapter size."""
    head = ("| task | method | rest | metric | score | baseline | trainable | MLP trainable | steps/s "
            "| peak MB | adapter MB | lr | batch |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        method = r.method + (f" (r={r.lora_rank})" if r.lora_rank else "")
        scale, digits = (100, 1) if r.greater_is_better else (1, 3)
        adapter = f"{r.adapter_bytes / 2**20:,.2f}" if r.adapter_bytes else ""
        spread = f" ± {scale * r.std:.{digits}f}" if len(r.seeds) > 1 else ""
        score = (f"{scale * r.mean:.{digits}f}{spread}" if r.status == "finished"
                 else f"{r.status} (seeds {', '.join(str(s) for s, v in zip(r.seeds, r.scores) if v is None)})")
        if r.not_learned:  # an ordinary-looking score that is no better than the baseline
            score += f" (not above baseline: seed{'s' if len(r.not_learned) > 1 else ''} " \
                     f"{', '.join(map(str, r.not_learned))})"
        metric = f"{r.split} {r.metric}".strip()  # "validation accuracy": what the score is
        lines.append(f"| {r.task} | {method} | {r.rest} | {metric} | {score} | {scale * r.baseline:.{digits}f} | {r.trainable:,} "
                     f"| {r.trainable_mlp:,} | {r.steps_per_s:.2f} | {r.peak_memory_mb:,.0f} | {adapter} "
                     f"| {r.lr:.2e} | {r.batch_size} |")
    return "\n".join(lines)
