"""apply / merge on real and tiny models, and the errors that name what to change."""
import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import sparsegrad


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def train_steps(model, batches, lr=1e-2):
    model.train()
    opt = sparsegrad.optimizer(model, lr=lr)
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture(scope="module")
def minilm_bases(_minilm_classifier, bbc_batches):
    return sparsegrad.compute_bases(_minilm_classifier, bbc_batches, n_steps=2, progress=False)


@pytest.mark.parametrize("mode", ["fixed", "dynamic", "meprop"])
def test_apply_then_merge_round_trips_on_minilm(minilm, bbc_batches, minilm_bases, tmp_path, mode):
    batch = bbc_batches[-1]
    before = logits(minilm, batch)
    sparsegrad.apply(minilm, minilm_bases, density=0.01, mode=mode)
    layers = sparsegrad.sparse_layers(minilm)
    assert len(layers) == 12 and all(m.mode == mode for m in layers.values())
    assert "bert.encoder.layer.0.attention.output.dense" not in layers
    torch.testing.assert_close(logits(minilm, batch), before, rtol=0, atol=1e-5)  # unchanged right after apply
    k_up, k_down = layers["bert.encoder.layer.0.intermediate.dense"].k, layers["bert.encoder.layer.0.output.dense"].k
    assert k_up == k_down == round(0.01 * 384 * 1536)

    train_steps(minilm, bbc_batches[:2])
    trained = logits(minilm, batch)
    assert (trained - before).abs().max() > 1e-4  # training changed the model
    sparsegrad.merge(minilm)
    assert not sparsegrad.sparse_layers(minilm)
    assert type(minilm.bert.encoder.layer[0].intermediate.dense) is nn.Linear
    torch.testing.assert_close(logits(minilm, batch), trained, rtol=0, atol=1e-5)  # merge keeps outputs

    minilm.save_pretrained(tmp_path)
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(reloaded, batch), trained, rtol=0, atol=1e-5)


def test_counts_and_freezing(minilm, minilm_bases):
    for p in minilm.parameters():
        p.requires_grad_(False)
    minilm.classifier.requires_grad_(True)
    sparsegrad.apply(minilm, minilm_bases, n_params=5000)
    head = sum(p.numel() for p in minilm.classifier.parameters())
    assert sparsegrad.trainable_parameters(minilm) == 12 * 5000 + head
    layer = sparsegrad.sparse_layers(minilm)["bert.encoder.layer.3.output.dense"]
    assert not layer.weight.requires_grad and layer.values.requires_grad and not layer.bias.requires_grad


@pytest.mark.parametrize("mode", ["fixed", "dynamic", "meprop"])
def test_merge_keeps_what_was_frozen(minilm, minilm_bases, bbc_batches, mode):
    """Everything but the head frozen, trained, merged: the merged MLP weights and biases stay frozen
    (MeProp's dense weights trained, so they stay trainable), as peft's merge_and_unload keeps them."""
    for p in minilm.parameters():
        p.requires_grad_(False)
    minilm.classifier.requires_grad_(True)
    sparsegrad.apply(minilm, minilm_bases, density=0.01, mode=mode)
    train_steps(minilm, bbc_batches[:1])
    head = sum(p.numel() for p in minilm.classifier.parameters())
    sparsegrad.merge(minilm)
    mlp = [minilm.bert.encoder.layer[i].intermediate.dense for i in range(6)] + \
        [minilm.bert.encoder.layer[i].output.dense for i in range(6)]
    assert all(type(m) is nn.Linear for m in mlp)
    assert all(m.weight.requires_grad == (mode == "meprop") and not m.bias.requires_grad for m in mlp)
    dense_mlp = sum(m.weight.numel() for m in mlp)
    assert sum(p.numel() for p in minilm.parameters() if p.requires_grad) == head + (dense_mlp if mode == "meprop" else 0)


def test_apply_errors_name_the_fix(minilm, minilm_bases):
    with pytest.raises(ValueError, match="density=1.5 is out of range"):
        sparsegrad.apply(minilm, minilm_bases, density=1.5)
    with pytest.raises(ValueError, match="density=0 is out of range"):
        sparsegrad.apply(minilm, minilm_bases, density=0)
    with pytest.raises(ValueError, match=r"k=589825 is out of range .* 1 <= k <= 589824"):
        sparsegrad.apply(minilm, minilm_bases, n_params=384 * 1536 + 1)
    with pytest.raises(ValueError, match="not both"):
        sparsegrad.apply(minilm, minilm_bases, density=0.01, n_params=10)
    with pytest.raises(ValueError, match="match no linear layer"):
        sparsegrad.apply(minilm, minilm_bases, targets=["mlp.up_proj"])
    with pytest.raises(ValueError, match="needs bases"):
        sparsegrad.apply(minilm, None, mode="fixed")
    with pytest.raises(ValueError, match="nothing to merge"):
        sparsegrad.merge(minilm)
    assert not sparsegrad.sparse_layers(minilm)  # failed calls left the model untouched
    sparsegrad.apply(minilm, minilm_bases)
    with pytest.raises(ValueError, match="called twice"):
        sparsegrad.apply(minilm, minilm_bases)


def test_bases_that_do_not_fit(minilm, bbc_batches):
    small = BertForSequenceClassification(BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                                     num_attention_heads=4, num_labels=5))
    batch = {k: v for k, v in bbc_batches[0].items() if k != "token_type_ids"}
    bases = sparsegrad.compute_bases(small, [batch], 1, progress=False)
    with pytest.raises(ValueError, match=r"computed for another model; recompute"):
        sparsegrad.apply(minilm, bases)
    per_layer = sparsegrad.compute_bases(small, [batch], 1, group_by="layer", progress=False, targets=["output.dense"])
    with pytest.raises(KeyError, match="no entry for layer"):
        sparsegrad.apply(minilm, per_layer)


def test_unknown_architecture_needs_targets():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    with pytest.raises(ValueError, match=r"no default MLP targets.*targets=\[\.\.\.\]"):
        sparsegrad.apply(Tiny(), None, mode="meprop")
    model = sparsegrad.apply(Tiny(), None, mode="meprop", targets=["fc"], n_params=3)
    assert isinstance(model.fc, sparsegrad.MePropLinear)  # the baseline, converted by the same apply


def _lm_batches(vocab: int, n: int = 3):
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, vocab, (4, 16), generator=g) for _ in range(n)]
    return [{"input_ids": x, "labels": x} for x in ids]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoders_round_trip(arch):
    torch.manual_seed(0)
    if arch == "gpt2":  # Conv1D MLP, weight stored (d_in, d_out)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                                           bos_token_id=0, eos_token_id=0))
        n_roles, kind = 2, "Conv1D"
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
        n_roles, kind = 3, "Linear"
    batches = _lm_batches(100)
    bases = sparsegrad.compute_bases(model, batches, 3, progress=False)
    assert len(bases.U) == n_roles
    before = logits(model, batches[0])
    sparsegrad.apply(model, bases, density=0.05)
    torch.testing.assert_close(logits(model, batches[0]), before, rtol=0, atol=1e-5)
    train_steps(model, batches)
    trained = logits(model, batches[0])
    assert (trained - before).abs().max() > 1e-4
    sparsegrad.merge(model)
    assert type(model.get_submodule(next(iter(bases.layers)))).__name__ == kind
    torch.testing.assert_close(logits(model, batches[0]), trained, rtol=0, atol=1e-5)


def test_bases_stay_shared_when_the_model_moves(minilm, minilm_bases):
    sparsegrad.apply(minilm, minilm_bases, density=0.01)
    minilm.to(torch.float64)  # a conversion that copies every tensor
    layers = sparsegrad.sparse_layers(minilm)
    first, other = layers["bert.encoder.layer.0.output.dense"], layers["bert.encoder.layer.5.output.dense"]
    assert first.V.dtype == torch.float64 and first.V is other.V and first.U is other.U
    assert first.bases is other.bases  # one SharedBases module per role
    assert "U" not in "".join(minilm.state_dict())  # bases are held by reference, not saved per layer


@pytest.mark.parametrize("mode", ["fixed", "dynamic", "meprop"])
def test_a_converted_model_moves_to_meta(minilm, minilm_bases, mode):
    """model.to("meta") (to measure or to rebuild a model without memory) reaches every tensor of the layers."""
    sparsegrad.apply(minilm, minilm_bases, density=0.01, mode=mode)
    minilm.to("meta")
    assert all(t.is_meta for t in (*minilm.parameters(), *minilm.buffers()))
    layer = next(iter(sparsegrad.sparse_layers(minilm).values()))
    assert layer.trainable.requires_grad and any(p is layer.trainable for p in layer.parameters())


def _storages(tensors) -> int:
    return len({t.untyped_storage().data_ptr() for t in tensors})


@pytest.mark.parametrize("mode", ["fixed", "dynamic"])
def test_bases_are_held_once_per_role_whatever_the_model_dtype(minilm, minilm_bases, mode):
    """float32 bases on a float64 model: converted once per role, not once per layer; model.to(...)
    keeps them shared."""
    minilm.double()
    sparsegrad.apply(minilm, minilm_bases, density=0.01, mode=mode)
    layers = list(sparsegrad.sparse_layers(minilm).values())
    roles = len(minilm_bases.U)
    assert len(layers) == 12 and roles == 2
    assert all(m.U.dtype == torch.float64 for m in layers)
    assert _storages(m.U for m in layers) == roles and _storages(m.V for m in layers) == roles
    minilm.float()
    assert all(m.U.dtype == torch.float32 for m in layers)
    assert _storages(m.U for m in layers) == roles and _storages(m.V for m in layers) == roles
    # bases already on the model's device and dtype are not copied at all
    fresh = {id(t) for t in minilm_bases.U.values()}
    minilm2 = BertForSequenceClassification(minilm.config)
    sparsegrad.apply(minilm2, minilm_bases, density=0.01, mode=mode)
    assert {id(m.U) for m in sparsegrad.sparse_layers(minilm2).values()} <= fresh


def test_layer_classes_per_mode(minilm, minilm_bases):
    """The modes are types: fixed and dynamic SparseGrad layers share sparsegrad.SparseGradLinear, MeProp is apart."""
    sparsegrad.apply(minilm, minilm_bases, density=0.01, mode="dynamic")
    layer = next(iter(sparsegrad.sparse_layers(minilm).values()))
    assert type(layer) is sparsegrad.DynamicSparseGradLinear and isinstance(layer, sparsegrad.SparseGradLinear)
    assert not hasattr(layer, "rows") and not hasattr(layer, "values")  # only its own state
    lin = nn.Linear(8, 6)
    meprop = sparsegrad.SparseGradLinear.from_linear(lin, k=5, mode="meprop")  # the old spelling still works
    assert type(meprop) is sparsegrad.MePropLinear and not isinstance(meprop, sparsegrad.SparseGradLinear)
    U, V = torch.linalg.qr(torch.randn(8, 8))[0], torch.linalg.qr(torch.randn(6, 6))[0]
    fixed = sparsegrad.SparseGradLinear(8, 6, k=3, mode="fixed", U=U, V=V, support=([0, 1, 2], [0, 1, 2]))
    assert type(fixed) is sparsegrad.FixedSparseGradLinear and not hasattr(fixed, "delta")
