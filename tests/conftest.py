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
    from sparsegrad.recipes.assets import minilm_path

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

    from sparsegrad.recipes.assets import bbc_news

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


CHAT_DIR = GLUE_DIR.parent / "chat"
# A chat template of the usual form (each turn closed by an end-of-turn marker), for the tiny decoder.
TINY_TEMPLATE = ("{% for m in messages %}[unused0] {{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}[unused0] assistant : {% endif %}")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, minilm_path):
    """A tiny LLaMA-architecture decoder (4 blocks, 32/64, random weights, seeded) with the real MiniLM
    WordPiece tokenizer and a chat template, saved as a Hugging Face folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(minilm_path)
    tok.chat_template = TINY_TEMPLATE
    tok.eos_token = "[SEP]"
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.cls_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _conversation(i: int) -> dict:
    a, b = i % 7, (3 * i) % 5
    return {"tree_id": f"tree-{i // 2}", "messages": [
        {"role": "user", "content": f"what is {a} plus {b} ?"},
        {"role": "assistant", "content": f"{a} plus {b} is {a + b} ."},
        {"role": "user", "content": "and twice that ?"},
        {"role": "assistant", "content": f"twice {a + b} is {2 * (a + b)} ."}]}


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory):
    """80 small two-turn arithmetic conversations (two per tree) as JSONL: learnable by a tiny decoder."""
    import json

    path = tmp_path_factory.mktemp("chat") / "arithmetic.jsonl"
    path.write_text("".join(json.dumps(_conversation(i)) + "\n" for i in range(80)))
    return path


@pytest.fixture(scope="session")
def oasst_file():
    """Real oasst1 conversations in ../shared/chat (present in CI; a user's clone has none)."""
    path = CHAT_DIR / "oasst1_en_validation_top1_conversations.jsonl"
    if not path.is_file():
        pytest.skip(f"real conversation data not found at {path} (it ships in ../shared/chat beside the repository)")
    return path


@pytest.fixture(scope="session")
def chat_batches(tiny_llama_dir, chat_file):
    """Six batches of 8 encoded conversations for the tiny decoder."""
    from transformers import AutoTokenizer

    from sparsegrad.recipes.chat import Collator, encode, read_jsonl

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    encoded = encode(tok, read_jsonl(chat_file), 128)
    collate = Collator(tok)
    return [collate(encoded[i:i + 8]) for i in range(0, 48, 8)]
