"""Shared fixtures: the real MiniLM encoder and real BBC News batches (both pip-installed, offline)."""
from __future__ import annotations

import copy
import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def minilm_path():
    from sparsegrad.assets import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def _minilm_classifier(minilm_path):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=5)


@pytest.fixture
def minilm(_minilm_classifier):
    """A fresh copy of all-MiniLM-L6-v2 with a 5-class head (seeded), in train mode."""
    model = copy.deepcopy(_minilm_classifier)
    model.train()
    return model


@pytest.fixture(scope="session")
def bbc_batches(minilm_path):
    """Real BBC News batches: 12 batches of 16 articles (balanced, shuffled), 64 tokens each."""
    from transformers import AutoTokenizer

    from sparsegrad.assets import bbc_news

    texts, labels, _ = bbc_news()
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    tok = AutoTokenizer.from_pretrained(minilm_path)
    batches = []
    for start in range(0, 12 * 16, 16):
        idx = order[start : start + 16]
        enc = tok([texts[i] for i in idx], truncation=True, max_length=64, padding=True, return_tensors="pt")
        enc["labels"] = torch.tensor([labels[i] for i in idx])
        batches.append(dict(enc))
    return batches


GLUE_DIR = __import__("pathlib").Path(__file__).resolve().parents[1].parent / "shared" / "glue"


@pytest.fixture(scope="session")
def glue_dir():
    """The real GLUE files in ../shared/glue (present in CI; a user's clone has none)."""
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"real GLUE files not found at {GLUE_DIR} (they ship in ../shared/glue beside the repository)")
    return GLUE_DIR
