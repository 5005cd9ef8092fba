"""methods.prepare: the four methods at equal trainable MLP counts, and the rest of the model."""
from __future__ import annotations

import pytest

import sparsegrad
from sparsegrad.recipes.methods import canonical_method, lora_rank_for, prepare
from sparsegrad.targets import find_targets


@pytest.fixture(scope="module")
def minilm_bases(_minilm_classifier, bbc_batches):
    import copy

    model = copy.deepcopy(_minilm_classifier).eval()
    return sparsegrad.compute_bases(model, bbc_batches[:2], n_steps=2, progress=False)


def _trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["ft", "lora", "meprop", "sparsegrad"])
def test_rest_head_trains_only_head_and_mlp_part(minilm, minilm_bases, method):
    info = prepare(minilm, method, rest="head", bases=minilm_bases)
    names = _trainable_names(minilm)
    outside_mlp = {n for n in names if "intermediate.dense" not in n and not (".output.dense" in n and "attention" not in n)}
    assert outside_mlp == {"classifier.weight", "classifier.bias"}
    head = 384 * 5 + 5
    assert info.trainable == head + info.trainable_mlp
    assert info.sparse_budget == 12 * round(0.01 * 384 * 1536)
    if method in ("meprop", "sparsegrad"):
        assert info.trainable_mlp == info.sparse_budget
    if method == "lora":
        assert info.lora_rank == 3 and info.trainable_mlp == 3 * 12 * (384 + 1536)
        assert abs(info.trainable_mlp - info.sparse_budget) <= 12 * (384 + 1536) / 2
    if method == "ft":
        assert info.trainable_mlp == 6 * (2 * 384 * 1536 + 1536 + 384)  # weights and biases


@pytest.mark.parametrize("method", ["lora", "sparsegrad"])
def test_rest_all_trains_every_non_mlp_parameter(minilm, minilm_bases, method):
    total_before = sum(p.numel() for p in minilm.parameters())
    mlp = sum(p.numel() for m in find_targets(minilm, None).values() for p in m.parameters())
    info = prepare(minilm, method, rest="all", bases=minilm_bases)
    assert info.trainable == total_before - mlp + info.trainable_mlp
    assert all(p.requires_grad for n, p in minilm.named_parameters() if "attention" in n or "embeddings" in n)


def test_lora_rank_matches_bert_base_budget():
    from torch import nn
    layers = {f"l{i}": nn.Linear(768, 3072) for i in range(12)} | {f"o{i}": nn.Linear(3072, 768) for i in range(12)}
    budget = 24 * round(0.01 * 768 * 3072)
    assert lora_rank_for(budget, layers) == 6  # 23,593 per layer / 3,840 per rank


def test_prepared_models_train(minilm, minilm_bases, bbc_batches):
    prepare(minilm, "sparsegrad", rest="head", bases=minilm_bases, mode="dynamic")
    opt = sparsegrad.optimizer(minilm, lr=1e-3)
    layer = next(iter(sparsegrad.sparse_layers(minilm).values()))
    before = layer.delta.detach().clone()
    minilm(**bbc_batches[0]).loss.backward()
    opt.step()
    assert int((layer.delta != before).sum()) == layer.k


def test_block_support_at_the_matched_count(minilm, minilm_bases, bbc_batches):
    """structure="block": every MLP linear holds a block of exactly the layer's k (the count LoRA is matched to),
    the label names it, and one step trains every entry of the block; the structure belongs to the fixed mode."""
    from sparsegrad.recipes.methods import method_label, split_label

    info = prepare(minilm, **split_label("sparsegrad-block"), rest="head", bases=minilm_bases)
    assert info.trainable_mlp == info.sparse_budget and info.structure == "block"
    assert method_label(info.method, info.mode, info.structure) == "sparsegrad-block"
    layers = sparsegrad.sparse_layers(minilm).values()
    assert {layer.structure for layer in layers} == {"block"}
    opt = sparsegrad.optimizer(minilm, lr=1e-3)
    before = [layer.values.detach().clone() for layer in layers]
    minilm(**bbc_batches[0]).loss.backward()
    opt.step()
    assert all(bool((layer.values != b).all()) for layer, b in zip(layers, before))
    with pytest.raises(ValueError, match="structure='block' shapes the support of SparseGrad's fixed mode"):
        prepare(minilm, "lora", structure="block")


def test_bad_options(minilm, minilm_bases):
    with pytest.raises(ValueError, match="unknown method 'adapter'"):
        canonical_method("adapter")
    assert canonical_method("regular") == "ft" and canonical_method("Sparse-Grad") == "sparsegrad"
    with pytest.raises(ValueError, match="rest='most'"):
        prepare(minilm, "ft", rest="most")
    with pytest.raises(ValueError, match="needs bases"):
        prepare(minilm, "sparsegrad")
    with pytest.raises(ValueError, match="density=1.5 is out of range"):
        prepare(minilm, "lora", density=1.5)
    with pytest.raises(ValueError, match="match no linear layer"):
        prepare(minilm, "ft", targets=["mlp.up_proj"])
    assert not any(isinstance(m, sparsegrad.SparseGradLinear) for m in minilm.modules())
    assert all(p.requires_grad for p in minilm.parameters())  # untouched by the failed calls
