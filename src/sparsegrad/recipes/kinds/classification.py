"""Sequence classification and regression (GLUE, BBC News): a head on an encoder, scored by GLUE's metrics."""
from __future__ import annotations

import numpy as np
import torch

from sparsegrad.util import to_device

from ..glue import compute_metrics, load_classification, majority_baseline
from ..tasks import DataError
from .base import TaskKind


class Classification(TaskKind):
    name = "classification"
    baseline_kind = "majority class"
    default_rest = "all"  # the paper's GLUE setting
    default_model_name = "all-MiniLM-L6-v2"
    default_model_call = "sparsegrad.recipes.assets.minilm_path()"

    def load(self, task, data_dir):
        return load_classification(task, data_dir)

    def check_train(self, task, train):
        if not task.is_regression and len({e["label"] for e in train}) < 2:
            raise DataError(f"{task.name} training data holds a single label "
                            f"({ {e['label'] for e in train} }): a classifier cannot learn")

    def default_model(self) -> str:
        from ..assets import minilm_path

        return str(minilm_path())

    def auto_model(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def model_kwargs(self, task):
        if task.is_regression:
            return {"num_labels": 1, "problem_type": "regression"}
        return {"num_labels": task.num_labels, "id2label": dict(enumerate(task.labels)),
                "label2id": {label: i for i, label in enumerate(task.labels)}}

    def encode(self, tokenizer, examples, max_length):
        # token ids as int32 arrays: QQP and MNLI hold ~400k examples
        texts = [e["text"] for e in examples]
        pairs = [e["text_pair"] for e in examples] if examples[0]["text_pair"] is not None else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        keys = list(enc.keys())
        return [{**{k: np.asarray(enc[k][i], dtype=np.int32) for k in keys}, "labels": e["label"]}
                for i, e in enumerate(examples)]

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def loss_items(self, batch):
        return int(batch["labels"].shape[0])

    def evaluate(self, task, model, tokenizer, encoded, device, *, eval_batch_size, train_batch_size):
        preds = predict(model, tokenizer, encoded, eval_batch_size, device, regression=task.is_regression)
        return compute_metrics(task, preds, np.array([e["labels"] for e in encoded]))

    def baseline(self, task, data, evaluate_untrained):
        return majority_baseline(task, data.train, next(iter(data.eval.values())))


@torch.no_grad()
def predict(model, tokenizer, encoded: list[dict], batch_size: int, device, *, regression: bool) -> np.ndarray:
    """Class ids (or scores) for `encoded`, in order; batches sorted by length to pad less."""
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    was_training = model.training
    model.eval()
    order = np.argsort([len(e["input_ids"]) for e in encoded], kind="stable")
    out = np.empty(len(encoded), dtype=np.float64 if regression else np.int64)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = collate([{k: v for k, v in encoded[j].items() if k != "labels"} for j in idx])
        logits = model(**to_device(batch, device)).logits.float()
        out[idx] = (logits[:, 0] if regression else logits.argmax(-1)).cpu().numpy()
    model.train(was_training)
    return out
