"""Instruction tuning: conversations rendered with the tokenizer's chat template, loss on the
assistant's tokens only, validation loss / perplexity, and answers generated for a prompt file.

A conversation is {"messages": [{"role": "user" | "assistant" | "system", "content": str}, ...]}
(OpenAssistant / chat-template style), one per JSONL line. Data comes from
- a JSONL file: split into train / validation by conversation *group* (`tree_id`, else
  `conversation_id`, else the line), so that threads sharing opening turns never straddle the split;
- a folder holding `train.jsonl` and `validation.jsonl` (or `valid.jsonl`, `dev.jsonl`, `test.jsonl`);
- a folder saved by `datasets` (`save_to_disk`) with a `messages` column and train / validation splits.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from jinja2 import TemplateError

from sparsegrad.util import to_device

from .tasks import DataError, read_text_lines

IGNORE = -100  # label of tokens that carry no loss (everything but the assistant's turns)
ROLES = ("system", "user", "assistant")
EVAL_NAMES = ("validation", "valid", "dev", "test")


# ---------------------------------------------------------------- reading

def check_conversation(messages, where: str) -> list[dict]:
    """The messages of one conversation, checked: roles known, contents strings, one assistant turn at least."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} is {str(m)[:80]!r}; each message needs a role in {ROLES} "
                              "and a string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing to learn from")
    roles = [m["role"] for m in messages]
    first = 1 if roles[0] == "system" else 0
    for i in range(first, len(roles)):
        expected = ("user", "assistant")[(i - first) % 2]
        if roles[i] != expected:
            raise DataError(f"{where}: message {i} is a {roles[i]!r} turn where a {expected!r} turn belongs; a "
                            "conversation is an optional system message, then user and assistant turns in turn "
                            f"(roles here: {', '.join(roles)})")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _json_lines(path: Path, missing: str):
    """(line number, parsed JSON) for each non-empty line of `path`; `missing` is the error when it is absent."""
    if not path.is_file():
        raise DataError(missing)
    for n, line in enumerate(read_text_lines(path), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{n}: not JSON ({err.msg})") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """Conversations of a JSONL file: [{"messages": [...], "group": str}]."""
    path = Path(path)
    out = []
    for n, row in _json_lines(path, f"missing data file {path}: pass a JSONL file of {{\"messages\": [...]}} "
                                    "conversations"):
        if not isinstance(row, dict) or "messages" not in row:
            raise DataError(f"{path}:{n}: expected an object with a 'messages' list "
                              "(OpenAssistant / chat-template style)")
        group = row.get("tree_id") or row.get("conversation_id") or f"line-{n}"
        out.append({"messages": check_conversation(row["messages"], f"{path}:{n}"), "group": str(group),
                    "where": f"{path}:{n}"})
    if not out:
        raise DataError(f"{path} holds no conversations")
    return out


def split_by_group(conversations: list[dict], validation_share: float = 0.2, seed: int = 0
                   ) -> tuple[list[dict], list[dict]]:
    """Train / validation by group: a fixed random share of the groups goes to validation."""
    groups = sorted({c["group"] for c in conversations})
    if len(groups) < 2:
        raise DataError("the conversations form a single group (tree_id / conversation_id): "
                          "pass separate train.jsonl and validation.jsonl files instead")
    n_val = max(1, round(validation_share * len(groups)))
    held_out = set(np.random.default_rng(seed).permutation(groups)[:n_val].tolist())
    train = [c for c in conversations if c["group"] not in held_out]
    val = [c for c in conversations if c["group"] in held_out]
    return train, val


def _read_saved(folder: Path) -> tuple[list[dict], list[dict]]:
    import datasets

    dd = datasets.load_from_disk(str(folder))
    if not isinstance(dd, datasets.DatasetDict) or "train" not in dd:
        raise DataError(f"{folder}: save a DatasetDict with a 'train' split and a validation split")
    eval_name = next((n for n in EVAL_NAMES if n in dd), None)
    if eval_name is None:
        raise DataError(f"{folder} has splits {list(dd)}; add one of {EVAL_NAMES}")

    def convert(split: str) -> list[dict]:
        if "messages" not in dd[split].column_names:
            raise DataError(f"{folder}[{split}] has columns {dd[split].column_names}; a 'messages' column is needed")
        return [{"messages": check_conversation(row["messages"], f"{folder}[{split}] row {i}"), "group": f"{split}-{i}",
                 "where": f"{folder}[{split}] row {i}"} for i, row in enumerate(dd[split])]

    return convert("train"), convert(eval_name)


def load_conversations(data_dir: str | Path | None) -> tuple[list[dict], list[dict], str]:
    """(train, validation, source) from a JSONL file, a folder of JSONL files or a `datasets` folder."""
    if data_dir is None:
        raise DataError("the chat task needs --data-dir: a JSONL file of {\"messages\": [...]} conversations "
                          "(e.g. ../shared/chat/oasst1_en_validation_top1_conversations.jsonl), a folder with "
                          "train.jsonl and validation.jsonl, or a datasets folder")
    path = Path(data_dir)
    if path.is_file():
        train, val = split_by_group(read_jsonl(path))
        return train, val, f"{path} (split by group, 20% validation)"
    if not path.is_dir():
        raise DataError(f"--data-dir {path}: no such file or folder")
    if (path / "dataset_dict.json").is_file():
        train, val = _read_saved(path)
        return train, val, str(path)
    eval_file = next((path / f"{n}.jsonl" for n in EVAL_NAMES if (path / f"{n}.jsonl").is_file()), None)
    if not (path / "train.jsonl").is_file() or eval_file is None:
        raise DataError(f"{path} holds neither train.jsonl + validation.jsonl nor a datasets save; "
                          "or pass one JSONL file to split by conversation group")
    return read_jsonl(path / "train.jsonl"), read_jsonl(eval_file), str(path)


# ---------------------------------------------------------------- tokenizing

def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode_conversation(tokenizer, messages: list[dict], max_length: int) -> dict | None:
    """input_ids and labels (int32 arrays) for one conversation; labels are IGNORE except on the
    assistant's turns (their text and end-of-turn marker). Truncated to `max_length` tokens;
    None when no assistant token survives the truncation.

    The template is rendered for each prefix of the conversation: the text between the prompt
    for assistant turn i and the rendering that includes it is that turn.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template: use an instruct model's tokenizer, "
                         "or set tokenizer.chat_template")
    segments: list[tuple[str, bool]] = []  # (text, is the assistant's)
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        full = _render(tokenizer, messages[:i + 1], generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation, "
                             "so the assistant's tokens cannot be located; use a template of the usual form")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    ids, labels = [], []
    for text, trained in segments:
        if not text:
            continue
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(t == IGNORE for t in labels[1:]):  # the first token is never predicted
        return None
    return {"input_ids": np.asarray(ids, dtype=np.int32), "labels": np.asarray(labels, dtype=np.int32)}


def encode(tokenizer, conversations: list[dict], max_length: int) -> list[dict]:
    """Encode every conversation; those whose assistant turns lie beyond `max_length` are dropped (with a note).
    A conversation the chat template refuses is a DataError naming it."""
    out = []
    for i, c in enumerate(conversations):
        try:
            encoded = encode_conversation(tokenizer, c["messages"], max_length)
        except TemplateError as err:
            raise DataError(f"{c.get('where', f'conversation {i}')}: the chat template refuses this conversation "
                            f"({err})") from None
        if encoded:
            out.append(encoded)
    if not out:
        raise DataError(f"no conversation keeps an assistant token within --max-length {max_length}: raise it")
    if len(out) < len(conversations):
        print(f"note: {len(conversations) - len(out)} of {len(conversations)} conversations have no assistant "
              f"token within --max-length {max_length} and are left out", file=sys.stderr)
    return out


class Collator:
    """Dynamic padding: pad to the longest sequence of the batch (right side), labels with IGNORE."""

    def __init__(self, tokenizer):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.from_numpy(e["input_ids"].astype(np.int64))
            labels[i, :n] = torch.from_numpy(e["labels"].astype(np.int64))
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss: labels after the causal shift that are not IGNORE."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


# ---------------------------------------------------------------- evaluating and generating

@torch.no_grad()
def evaluate_loss(model, tokenizer, encoded: list[dict], batch_size: int, device) -> dict[str, float]:
    """Validation loss (mean over assistant tokens, in nats) and perplexity exp(loss). `batch_size`
    conversations at a time: their logits, (batch, length, vocabulary), are the memory that counts."""
    collate = Collator(tokenizer)
    was_training = model.training
    model.eval()
    order = np.argsort([len(e["input_ids"]) for e in encoded], kind="stable")
    total, tokens = 0.0, 0
    for s in range(0, len(order), batch_size):
        batch = collate([encoded[j] for j in order[s:s + batch_size]])
        n = loss_tokens(batch)
        if n == 0:
            continue
        loss = model(**to_device(batch, device)).loss.float()
        total, tokens = total + float(loss) * n, tokens + n
    model.train(was_training)
    mean = total / tokens
    return {"loss": mean, "perplexity": float(np.exp(min(mean, 50.0))), "tokens": float(tokens)}


def read_prompts(path: str | Path) -> list[list[dict]]:
    """Prompts for generation, one per JSONL line: a string, {"prompt": str}, {"messages": [...]}
    (the conversation so far) or MT-Bench's {"turns": [...]} (its first turn)."""
    path = Path(path)
    prompts = []
    for n, row in _json_lines(path, f"--prompts {path}: no such file; pass a JSONL file of prompts"):
        if isinstance(row, str):
            prompts.append([{"role": "user", "content": row}])
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.append([{"role": "user", "content": row["prompt"]}])
        elif isinstance(row, dict) and isinstance(row.get("turns"), list) and row["turns"]:
            prompts.append([{"role": "user", "content": str(row["turns"][0])}])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            messages = [m for m in row["messages"] if isinstance(m, dict)]
            while messages and messages[-1].get("role") == "assistant":  # answer the last user turn
                messages.pop()
            if not messages:
                raise DataError(f"{path}:{n}: the messages hold no user turn to answer")
            prompts.append([{"role": m["role"], "content": m["content"]} for m in messages])
        else:
            raise DataError(f"{path}:{n}: a prompt line is a JSON string, {{\"prompt\": ...}}, "
                              "{\"messages\": [...]} or {\"turns\": [...]}")
    if not prompts:
        raise DataError(f"{path} holds no prompts")
    return prompts


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], device, max_new_tokens: int = 128) -> list[dict]:
    """Greedy answers, one prompt at a time: [{"messages", "prompt", "answer"}]."""
    was_training = model.training
    model.eval()
    out = []
    for messages in prompts:
        text = _render(tokenizer, messages, generation_prompt=True)
        enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        enc = to_device({k: enc[k] for k in ("input_ids", "attention_mask")}, device)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answer = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out.append({"messages": messages, "prompt": messages[-1]["content"], "answer": answer.strip()})
    model.train(was_training)
    return out

