"""Tasks: the GLUE tasks, the embedded BBC News default and `chat` (instruction tuning of a
decoder): what each reads and how it is scored. How a kind of task is encoded, batched, trained
and evaluated is its TaskKind (kinds/); where its data comes from is data.load_task.

A classification example is a dict: {"text": str, "text_pair": str | None, "label": int | float};
a chat example is {"messages": [{"role", "content"}, ...], "group": str, "where": "file:line"}.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

Example = dict


class DataError(ValueError):
    """Missing or malformed task data; the message says which file and what to change."""


def read_text_lines(path: Path) -> io.StringIO:
    """The lines of a UTF-8 text file (a byte-order mark allowed), as `open(path, newline="")` gives
    them. A byte that is not UTF-8 is a DataError naming the file, the line and the column."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}: byte 0x{data[err.start]:02x} at column {err.start - line_start + 1} is not "
                        "UTF-8: save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    return io.StringIO(text, newline="")


@dataclass(frozen=True)
class Task:
    """What a task reads and how it is scored."""

    name: str
    text_columns: tuple[str, ...]           # TSV header names of the one or two texts
    label_column: str
    labels: tuple[str, ...] | None           # label strings as they appear in the files; None: regression
    metric: str                              # the metric selection and early stopping maximise
    eval_splits: tuple[str, ...] = ("dev",)  # the first one is used for selection
    header: bool = True
    columns: tuple[str, ...] = ()            # column names for files without a header
    hub_columns: tuple[str, ...] = ()        # text columns in the hub / datasets version
    hub_splits: tuple[str, ...] = ("validation",)
    default_epochs: int = 20                 # the paper's protocol
    kind: str = "classification"             # a key of kinds.KINDS: "classification" or "causal_lm"
    greater_is_better: bool = True           # False for losses

    @property
    def is_regression(self) -> bool:
        return self.labels is None and self.kind == "classification"

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


_BIN = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
TASKS: dict[str, Task] = {t.name: t for t in [
    Task("cola", ("sentence",), "label", _BIN, "matthews", header=False,
         columns=("source", "label", "original_label", "sentence"), hub_columns=("sentence",)),
    Task("sst2", ("sentence",), "label", _BIN, "accuracy", hub_columns=("sentence",)),
    Task("mrpc", ("#1 String", "#2 String"), "Quality", _BIN, "f1", hub_columns=("sentence1", "sentence2")),
    Task("stsb", ("sentence1", "sentence2"), "score", None, "pearson", hub_columns=("sentence1", "sentence2")),
    Task("qqp", ("question1", "question2"), "is_duplicate", _BIN, "f1", hub_columns=("question1", "question2")),
    Task("mnli", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"), "accuracy",
         eval_splits=("dev_matched", "dev_mismatched"), hub_columns=("premise", "hypothesis"),
         hub_splits=("validation_matched", "validation_mismatched")),
    Task("qnli", ("question", "sentence"), "label", _NLI2, "accuracy", hub_columns=("question", "sentence")),
    Task("rte", ("sentence1", "sentence2"), "label", _NLI2, "accuracy", hub_columns=("sentence1", "sentence2")),
    Task("wnli", ("sentence1", "sentence2"), "label", _BIN, "accuracy", hub_columns=("sentence1", "sentence2")),
    Task("bbcnews", ("text",), "label", ("business", "entertainment", "politics", "sports", "tech"), "accuracy",
         eval_splits=("validation",), default_epochs=2),
    Task("chat", ("messages",), "", None, "loss", eval_splits=("validation",), default_epochs=1, kind="causal_lm",
         greater_is_better=False),
]}
# GLUE folder names as distributed (data_dir/<folder>/train.tsv)
GLUE_FOLDERS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP", "mnli": "MNLI",
                "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}


def get_task(name: str) -> Task:
    key = name.lower().replace("-", "").replace("_", "")
    if key == "mnlim" or key == "mnlimm":
        key = "mnli"
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return TASKS[key]


@dataclass
class TaskData:
    task: Task
    train: list[Example]
    eval: dict[str, list[Example]]   # split name -> examples; the first split is used for selection
    source: str
    # (model, max_length) -> (encoded train, {split: encoded}): encoded once, when the options are checked
    encoded: dict = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        evals = ", ".join(f"{k} {len(v)}" for k, v in self.eval.items())
        return f"TaskData({self.task.name}: train {len(self.train)}, {evals}; from {self.source})"
