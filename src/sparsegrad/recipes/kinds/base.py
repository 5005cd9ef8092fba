"""TaskKind: what the training loop needs to know about a kind of task, behind one small interface."""
from __future__ import annotations

import os
from collections.abc import Callable

from ..tasks import Example, Task, TaskData


class TaskKind:
    """How one kind of task is loaded, encoded, batched, trained and evaluated.

    A new kind is one subclass in its own file plus an entry in kinds.KINDS; a Task names its kind.
    """

    name: str = ""
    baseline_kind: str = ""       # what `baseline` measures, for the tables
    default_rest: str = "all"     # which non-MLP parameters train by default (methods.RESTS)
    answers_prompts: bool = False  # whether --prompts applies

    # ---- data
    def load(self, task: Task, data_dir: str | os.PathLike | None) -> tuple[list[Example], dict, str]:
        """(train, {split: examples}, source description)."""
        raise NotImplementedError

    def check_train(self, task: Task, train: list[Example]) -> None:
        """Refuse training data the task cannot learn from (a clear DataError)."""

    # ---- model
    default_model_name = ""  # what the embedded default model is called, for the command's first lines
    default_model_call = ""  # the Python expression that gives its folder, for the command's last lines

    def default_model(self) -> str:
        raise NotImplementedError

    def auto_model(self):
        """The transformers Auto class the model loads with."""
        raise NotImplementedError

    def model_kwargs(self, task: Task) -> dict:
        return {}

    def check_tokenizer(self, tokenizer, name: str) -> None:
        """Refuse a tokenizer the kind cannot use (a clear ValueError)."""

    # ---- batches
    def encode(self, tokenizer, examples: list[Example], max_length: int) -> list[dict]:
        """Tokenized examples without padding (padding happens per batch), labels under "labels"."""
        raise NotImplementedError

    def collator(self, tokenizer) -> Callable[[list[dict]], dict]:
        """Dynamic padding to the longest example of a batch."""
        raise NotImplementedError

    def loss_items(self, batch: dict) -> int:
        """What the model's loss averages over (examples, or tokens): steps weight micro-batches by it."""
        raise NotImplementedError

    # ---- scores
    def evaluate(self, task: Task, model, tokenizer, encoded: list[dict], device, *, eval_batch_size: int,
                 train_batch_size: int) -> dict[str, float]:
        """The task's validation metrics on `encoded`."""
        raise NotImplementedError

    def baseline(self, task: Task, data: TaskData, evaluate_untrained: Callable[[], dict]) -> dict[str, float]:
        """The score to beat, measured before training (see `baseline_kind`)."""
        raise NotImplementedError
