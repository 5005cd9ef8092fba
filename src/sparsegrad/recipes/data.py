"""A task's data: its kind's loader, then fixed random subsets for quick runs."""
from __future__ import annotations

import os

import numpy as np

from .config import RunConfig
from .kinds import kind_of
from .tasks import Example, TaskData, get_task

HELDOUT = "heldout"  # the evaluation split carved from the training set


def _subsample(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """A fixed random subset of n examples (all of them if n is None or larger)."""
    if n is None or n >= len(examples):
        return examples
    if n < 1:
        raise ValueError(f"sample size {n} must be positive")
    idx = np.random.default_rng(seed).permutation(len(examples))[:n]
    return [examples[i] for i in sorted(idx)]


def _hold_out(train: list[Example], heldout: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(rest, held out): a fixed random share (< 1) or number (>= 1) of the training examples held out."""
    n = round(heldout * len(train)) if heldout < 1 else int(heldout)
    if not 0 < n < len(train):
        raise ValueError(f"--heldout {heldout:g} holds out {n} of the {len(train)} training examples: give a share in "
                         f"(0, 1) or a count from 1 to {len(train) - 1}")
    # a stream of its own: the held-out examples do not depend on --max-train-samples
    held = set(np.random.default_rng([seed, 1]).permutation(len(train))[:n].tolist())
    return ([e for i, e in enumerate(train) if i not in held], [e for i, e in enumerate(train) if i in held])


def load_task(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    heldout: float | None = None,
    sample_seed: int = 0,
) -> TaskData:
    """Load a task's train and evaluation splits (GLUE, BBC News: glue.py; chat: chat.py).

    heldout: hold out part of the training set (a share < 1, or a count) as the first evaluation
    split, "heldout": the one runs select their best model and stop early on. The task's own
    splits are then only reported, so that choosing a learning rate never looks at them."""
    task = get_task(name)
    train, evals, source = kind_of(task).load(task, data_dir)
    if heldout is not None:
        train, held = _hold_out(train, heldout, sample_seed)
        evals = {HELDOUT: held, **evals}
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
