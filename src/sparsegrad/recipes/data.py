"""A task's data: its kind's loader, then fixed random subsets for quick runs."""
from __future__ import annotations

import os

import numpy as np

from .config import RunConfig
from .kinds import kind_of
from .tasks import Example, TaskData, get_task


def _subsample(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """A fixed random subset of n examples (all of them if n is None or larger)."""
    if n is None or n >= len(examples):
        return examples
    if n < 1:
        raise ValueError(f"sample size {n} must be positive")
    idx = np.random.default_rng(seed).permutation(len(examples))[:n]
    return [examples[i] for i in sorted(idx)]


def load_task(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    sample_seed: int = 0,
) -> TaskData:
    """Load a task's train and evaluation splits (GLUE, BBC News: glue.py; chat: chat.py)."""
    task = get_task(name)
    train, evals, source = kind_of(task).load(task, data_dir)
    train = _subsample(train, max_train_samples, sample_seed)
    evals = {k: _subsample(v, max_eval_samples, sample_seed) for k, v in evals.items()}
    kind_of(task).check_train(task, train)
    return TaskData(task, train, evals, source)


def encode_task(data: TaskData, tokenizer, cfg: RunConfig) -> tuple[list[dict], dict[str, list[dict]]]:
    """(encoded train, {split: encoded}) for the run's model and --max-length, encoded once per TaskData."""
    key = (cfg.model, cfg.max_length)
    if key not in data.encoded:
        encode = kind_of(data.task).encode
        data.encoded[key] = (encode(tokenizer, data.train, cfg.max_length),
                             {name: encode(tokenizer, split, cfg.max_length) for name, split in data.eval.items()})
    return data.encoded[key]
