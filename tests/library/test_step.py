"""A training step as the GPU sees it: what the host reads back, and one compiled graph.

Read-backs are counted by operator (sparsegrad.readbacks) on the CPU, where they cost nothing but are
the same operators that stall a GPU's host. Rows of dy are skipped only where that pays (the CPU,
sparse_linear.skips_zero_rows); these tests count the step as it runs on a GPU, with no row skipping.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from transformers import BertConfig, BertForSequenceClassification

import sparsegrad
from sparsegrad.bench.speed import synthetic_batch
from sparsegrad.readbacks import ReadBackCounter
from sparsegrad.recipes.methods import prepare, split_label

LABELS = ("lora", "sparsegrad-fixed", "sparsegrad-dynamic", "meprop", "ft")


def tiny_bert(dtype=torch.float32) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).to(dtype)


@pytest.fixture(scope="module")
def setting():
    model = tiny_bert()
    batches = [synthetic_batch(model, 8, 32, 0.6, seed=i) for i in range(4)]  # padded tails
    return batches, sparsegrad.compute_bases(model, batches[:2], n_steps=2, progress=False)


def converted(label: str, bases, dtype=torch.float32) -> torch.nn.Module:
    model = tiny_bert(dtype)
    prepare(model, **split_label(label), rest="all", bases=bases, density=0.02)
    for layer in sparsegrad.sparse_layers(model).values():
        layer.skip_zero_rows = False  # as on a GPU (see the module's docstring)
    return model


def train_step(model, opt, batch) -> torch.Tensor:
    loss = model(**batch).loss
    loss.backward()
    sparsegrad.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def test_read_backs_per_step_are_loras(setting):
    """fixed reads back what LoRA's step reads; dynamic and MeProp at most one more per step over 20 steps
    (their lazy optimizer state grows now and then)."""
    batches, bases = setting
    counts = {}
    for label in LABELS:
        model = converted(label, bases).train()
        opt = sparsegrad.optimizer(model, lr=1e-3)
        train_step(model, opt, batches[0])  # the first step builds the optimizer state
        with ReadBackCounter() as counter:
            for i in range(20):
                train_step(model, opt, batches[i % len(batches)])
        counts[label] = counter.total
    assert counts["sparsegrad-fixed"] == counts["lora"] == counts["ft"], counts
    assert counts["sparsegrad-dynamic"] <= counts["lora"] + 20, counts
    assert counts["meprop"] <= counts["lora"] + 20, counts


def test_the_counter_sees_read_backs():
    x = torch.tensor([0.0, 1.0, 2.0])
    with ReadBackCounter() as counter:
        x.nonzero(), bool(x.any()), x[x > 0], x.unique(), x.repeat_interleave(torch.tensor([1, 2, 0]))
        x.sort(), x[torch.tensor([0, 2])], x.topk(2)  # static shapes: none
    assert dict(counter.counts) == {"aten.nonzero": 1, "aten._local_scalar_dense": 1, "aten.index": 1,
                                    "aten._unique2": 1, "aten.repeat_interleave": 1}


def test_no_graph_break_in_a_model_with_fixed_layers(setting):
    batches, bases = setting
    torch._dynamo.reset()
    model = converted("sparsegrad-fixed", bases).train()
    explained = torch._dynamo.explain(lambda batch: model(**batch).loss)(batches[0])
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_training_equals_eager(setting, backend):
    """torch.compile over a model with fixed layers (forward and backward through AOTAutograd; inductor
    generates code too): the same losses and trained values as eager, in float64."""
    batches, bases = setting
    bases = copy.deepcopy(bases)
    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        model = converted("sparsegrad-fixed", bases, dtype=torch.float64).train()
        opt = sparsegrad.optimizer(model, lr=1e-2)
        run = torch.compile(model, backend=backend) if compiled else model
        losses = [train_step(run, opt, b).item() for b in batches]
        runs.append((losses, [m.values.detach().clone() for m in sparsegrad.sparse_layers(model).values()]))
    (eager_losses, eager_values), (losses, values) = runs
    assert losses == pytest.approx(eager_losses, rel=0, abs=1e-12)
    assert eager_values[0].abs().sum() > 0  # it trained
    for a, b in zip(values, eager_values):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
