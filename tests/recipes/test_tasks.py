"""Tasks: reading the GLUE layouts (real files where present, small files in the official layouts
otherwise), label checks, the BBC News split, and the official metrics."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from sparsegrad.recipes.data import load_task
from sparsegrad.recipes.glue import compute_metrics, majority_baseline
from sparsegrad.recipes.tasks import DataError, get_task


@pytest.mark.parametrize("task, folder, train, dev", [
    ("cola", "CoLA", 8551, 1043), ("sst2", "SST-2", 67349, 872), ("mrpc", "MRPC", 3668, 408),
    ("wnli", "WNLI", 635, 71)])
def test_real_glue_files(glue_dir, task, folder, train, dev):
    data = load_task(task, glue_dir)
    assert len(data.train) == train and len(data.eval["dev"]) == dev
    labels = {e["label"] for e in data.train}
    assert labels == {0, 1}
    assert all(isinstance(e["text"], str) and e["text"] for e in data.train[:100])
    assert (data.train[0]["text_pair"] is None) == (task in ("cola", "sst2"))


def test_subsample_is_fixed_and_smaller(glue_dir):
    a = load_task("sst2", glue_dir, max_train_samples=100, max_eval_samples=50)
    b = load_task("sst2", glue_dir, max_train_samples=100, max_eval_samples=50)
    assert len(a.train) == 100 and len(a.eval["dev"]) == 50
    assert [e["text"] for e in a.train] == [e["text"] for e in b.train]


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


LAYOUTS = {
    "STS-B": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n",
              "{i}\tmain-captions\tMSRvid\t2012test\t{i}\tnone\tnone\tA man plays {i}.\tA man is playing {i}.\t{score}\n"),
    "RTE": ("index\tsentence1\tsentence2\tlabel\n", "{i}\tIt rains {i}.\tIt is wet.\t{nli}\n"),
    "QNLI": ("index\tquestion\tsentence\tlabel\n", "{i}\tWhat is {i}?\t{i} is a number.\t{nli}\n"),
    "QQP": ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n", "{i}\t1\t2\tHow is {i}?\tWhat is {i}?\t{b}\n"),
    "MNLI": (("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
             "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"),
             "{i}\t1\t1g\tfiction\t( x )\t( y )\t(x)\t(y)\tA cat {i}.\tAn animal {i}.\t{mnli}\t{mnli}\n"),
}


def _layout_files(root, folder, splits=("train", "dev"), n=6):
    header, row = LAYOUTS[folder]
    mnli = ("entailment", "neutral", "contradiction")
    for split in splits:
        body = "".join(row.format(i=i, score=i % 6 * 0.8, nli=("entailment", "not_entailment")[i % 2], b=i % 2,
                                  mnli=mnli[i % 3]) for i in range(n))
        _write(root / folder / f"{split}.tsv", header + body)


@pytest.mark.parametrize("task, folder", [("stsb", "STS-B"), ("rte", "RTE"), ("qnli", "QNLI"), ("qqp", "QQP")])
def test_other_glue_layouts(tmp_path, task, folder):
    _layout_files(tmp_path, folder)
    data = load_task(task, tmp_path)
    assert len(data.train) == 6 and data.train[1]["text_pair"]
    if task == "stsb":
        assert data.task.is_regression and data.train[1]["label"] == pytest.approx(0.8)
    else:
        assert {e["label"] for e in data.train} == {0, 1}


def test_mnli_matched_and_mismatched(tmp_path):
    _layout_files(tmp_path, "MNLI", splits=("train", "dev_matched", "dev_mismatched"))
    data = load_task("mnli", tmp_path)
    assert list(data.eval) == ["dev_matched", "dev_mismatched"]
    assert [e["label"] for e in data.train[:3]] == [0, 1, 2]


def test_datasets_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"sentence": ["good film", "bad film", "great", "awful"], "label": [1, 0, 1, 0], "idx": [0, 1, 2, 3]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "validation": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "sst2"))
    data = load_task("sst2", tmp_path)
    assert [e["label"] for e in data.train] == [1, 0, 1, 0] and data.eval["dev"][2]["text"] == "great"


def test_bad_data_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'sst3'"):
        get_task("sst3")
    with pytest.raises(DataError, match=r"missing data file .*SST-2.*train.tsv"):
        load_task("sst2", tmp_path)
    _write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\ngood\t1\nbad\t7\n")
    _write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\ngood\t1\n")
    with pytest.raises(DataError, match=r"train.tsv:3: label '7' is not one of the sst2 labels"):
        load_task("sst2", tmp_path)
    _write(tmp_path / "SST-2" / "train.tsv", "text\tlabel\ngood\t1\n")
    with pytest.raises(DataError, match=r"no column \['sentence'\]"):
        load_task("sst2", tmp_path)
    _write(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\tonly two\n1\ta\tb\tentailment\n")
    _write(tmp_path / "RTE" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(DataError, match=r"train.tsv:2: expected 4 tab-separated columns"):
        load_task("rte", tmp_path)
    _layout_files(tmp_path, "STS-B")
    _write(tmp_path / "STS-B" / "dev.tsv", LAYOUTS["STS-B"][0] + "0\tg\tf\ty\t0\ts\ts\ta\tb\thigh\n")
    with pytest.raises(DataError, match="score 'high' is not a number"):
        load_task("stsb", tmp_path)


def test_data_errors_name_file_and_line(tmp_path):
    dev = "sentence\tlabel\ngood\t1\n"
    _write(tmp_path / "SST-2" / "dev.tsv", dev)
    train = tmp_path / "SST-2" / "train.tsv"
    train.write_bytes(b"sentence\tlabel\ngood\t1\nfine\t1\ncaf\xe9 au lait\t0\n")  # Latin-1, not UTF-8
    with pytest.raises(DataError, match=r"train.tsv:4: byte 0xe9 at column 4 is not UTF-8: save the file as UTF-8"):
        load_task("sst2", tmp_path)
    long_text = "word " * 40_000  # 200,000 characters: the tokenizer truncates it, the reader takes it
    _write(train, f"sentence\tlabel\n{long_text}\t1\nshort\t0\n")
    data = load_task("sst2", tmp_path)
    assert [len(e["text"]) for e in data.train] == [200_000, 5]
    import csv

    assert csv.field_size_limit() == 131072  # the reader's raised limit does not leak


def test_bbc_news_split():
    data = load_task("bbcnews")
    assert len(data.train) + len(data.eval["validation"]) == 2225 - 98  # exact duplicates dropped
    counts = np.bincount([e["label"] for e in data.eval["validation"]])
    assert counts.tolist() == [100, 73, 80, 101, 69]  # a fifth of each class after deduplication
    train_texts = {e["text"] for e in data.train}
    assert not any(e["text"] in train_texts for e in data.eval["validation"])


def test_official_metrics():
    rng = np.random.default_rng(0)
    refs, preds = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    m = compute_metrics(get_task("cola"), preds, refs)
    assert m["matthews"] == pytest.approx(matthews_corrcoef(refs, preds))
    m = compute_metrics(get_task("mrpc"), preds, refs)
    assert m["f1"] == pytest.approx(f1_score(refs, preds)) and m["accuracy"] == pytest.approx((refs == preds).mean())
    scores, gold = rng.normal(size=50), rng.normal(size=50)
    m = compute_metrics(get_task("stsb"), scores, gold)
    assert m["pearson"] == pytest.approx(pearsonr(scores, gold)[0])
    assert m["spearman"] == pytest.approx(spearmanr(scores, gold)[0])
    assert compute_metrics(get_task("stsb"), np.zeros(50), gold) == {"pearson": 0.0, "spearman": 0.0}


def test_majority_baseline():
    task = get_task("sst2")
    train = [{"label": 1}] * 3 + [{"label": 0}]
    evaluation = [{"label": 1}, {"label": 0}, {"label": 0}, {"label": 1}]
    assert majority_baseline(task, train, evaluation)["accuracy"] == 0.5
