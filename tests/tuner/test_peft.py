"""SparseGrad as a peft method: get_peft_model, training, disable_adapter, save_pretrained /
PeftModel.from_pretrained, merge_and_unload / unload, against the library's own functions."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, BloomConfig, BloomForCausalLM

import sparsegrad
from sparsegrad import SparseGradLinear
from sparsegrad.tuner import SparseGradConfig, SparseGradLayer


@pytest.fixture(scope="module")
def bases(tiny_llama_dir, chat_batches):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64)
    return sparsegrad.compute_bases(model, chat_batches[:2], n_steps=2, progress=False)


def _model(folder, dtype=torch.float64):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _train(model, batches, lr=1e-2):
    model.train()
    opt = sparsegrad.optimizer(model, lr=lr)
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


OPTIONS = {"fixed": {"mode": "fixed"}, "dynamic": {"mode": "dynamic"}, "block": {"mode": "fixed", "structure": "block"}}


@pytest.mark.parametrize("variant", list(OPTIONS))
def test_peft_model_trains_as_the_library_does(tiny_llama_dir, chat_batches, bases, variant):
    """One layer, not two: get_peft_model + training gives the very model sparsegrad.apply gives."""
    options = OPTIONS[variant]
    mode = options["mode"]
    base_out = _logits(_model(tiny_llama_dir), chat_batches[0])
    peft_model = get_peft_model(_model(tiny_llama_dir), SparseGradConfig(bases=bases, density=0.1, **options))
    layers = [m for m in peft_model.modules() if isinstance(m, SparseGradLayer)]
    assert len(layers) == 12  # gate, up, down of 4 blocks
    assert torch.allclose(_logits(peft_model, chat_batches[0]), base_out, rtol=0, atol=1e-12)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == (sum(m.sparsegrad_layer["default"].k for m in layers) if mode == "fixed"
                         else sum(m.in_features * m.out_features for m in layers))  # dynamic: dense S

    library = sparsegrad.apply(_model(tiny_llama_dir), bases, density=0.1, **options)
    structures = {layer.structure for layer in sparsegrad.sparse_layers(library).values() if mode == "fixed"}
    assert structures <= {options.get("structure", "scattered")}
    for p in library.parameters():  # as peft: only SparseGrad's values train
        p.requires_grad_(False)
    for layer in sparsegrad.sparse_layers(library).values():
        layer.trainable.requires_grad_(True)
    _train(library, chat_batches[2:])
    _train(peft_model, chat_batches[2:])
    expected, got = _logits(library, chat_batches[0]), _logits(peft_model, chat_batches[0])
    assert (expected - base_out).abs().max() > 1e-2  # it learned something
    assert torch.allclose(got, expected, rtol=0, atol=1e-10)


@pytest.fixture(scope="module", params=list(OPTIONS))
def trained(request, tiny_llama_dir, chat_batches, bases):
    model = get_peft_model(_model(tiny_llama_dir), SparseGradConfig(bases=bases, density=0.1, **OPTIONS[request.param]))
    return _train(model, chat_batches[2:])


def test_disable_adapter_gives_the_base_model(tiny_llama_dir, chat_batches, trained):
    base_out = _logits(_model(tiny_llama_dir), chat_batches[0])
    trained_out = _logits(trained, chat_batches[0])
    with trained.disable_adapter():
        assert torch.allclose(_logits(trained, chat_batches[0]), base_out, rtol=0, atol=1e-10)
    assert torch.allclose(_logits(trained, chat_batches[0]), trained_out, rtol=0, atol=1e-10)


def test_saved_adapter_reloads_and_merges(tiny_llama_dir, chat_batches, trained, tmp_path):
    expected = _logits(trained, chat_batches[0])
    trained.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SPARSEGRAD" and config["bases"] is None and config["embed_bases"]

    loaded = PeftModel.from_pretrained(_model(tiny_llama_dir), tmp_path / "adapter")
    assert torch.allclose(_logits(loaded, chat_batches[0]), expected, rtol=0, atol=1e-10)
    structures = {m.structure for m in trained.modules() if isinstance(m, SparseGradLinear) and m.mode == "fixed"}
    assert structures == {m.structure for m in loaded.modules() if isinstance(m, SparseGradLinear) and m.mode == "fixed"}
    held = {id(m.bases) for m in loaded.modules() if isinstance(m, SparseGradLinear)}
    assert len(held) == 3  # one SharedBases per role (gate, up, down), loaded from the embedded rows
    merged = loaded.merge_and_unload()
    assert type(merged.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert not any(isinstance(m, SparseGradLayer) for m in merged.modules())
    assert torch.allclose(_logits(merged, chat_batches[0]), expected, rtol=0, atol=1e-10)

    base_out = _logits(_model(tiny_llama_dir), chat_batches[0])
    unloaded = PeftModel.from_pretrained(_model(tiny_llama_dir), tmp_path / "adapter").unload()
    assert torch.allclose(_logits(unloaded, chat_batches[0]), base_out, rtol=0, atol=1e-10)

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    config.hidden_size = config.hidden_size * 3 // 2  # a wider model: the adapter does not fit it
    with pytest.raises(ValueError, match=r"this model's is \d+->\d+: load the adapter onto the base model"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_config(config), tmp_path / "adapter")
    config = AutoConfig.from_pretrained(tiny_llama_dir)
    config.num_hidden_layers += 1  # a deeper model: its last block has no entries in the adapter
    with pytest.raises(ValueError, match=r"holds no entries for 3 of this model's target layers .*fewer blocks"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_config(config), tmp_path / "adapter")
    changed = SparseGradConfig.from_pretrained(tmp_path / "adapter")
    if changed.mode == "fixed":  # (a dynamic adapter's entries are any number)
        changed.density = 0.05  # as a resume with another --density would
        with pytest.raises(ValueError, match=r"k=\d+ there: it was saved with another density, n_params or mode"):
            PeftModel.from_pretrained(_model(tiny_llama_dir), tmp_path / "adapter", config=changed)


def test_reloaded_adapter_goes_on_training(tiny_llama_dir, chat_batches, bases, tmp_path):
    """is_trainable=True: a fixed adapter reloaded with its embedded basis rows trains on, as the original."""
    config = SparseGradConfig(bases=bases, density=0.1, mode="fixed")
    original = _train(get_peft_model(_model(tiny_llama_dir), config), chat_batches[2:4])
    original.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(_model(tiny_llama_dir), tmp_path / "adapter", is_trainable=True)
    # fresh optimizers on both: the same next steps
    _train(original, chat_batches[4:])
    _train(reloaded, chat_batches[4:])
    assert torch.allclose(_logits(reloaded, chat_batches[0]), _logits(original, chat_batches[0]), rtol=0, atol=1e-9)


def test_adapter_by_reference_is_smaller_and_checked(tiny_llama_dir, chat_batches, bases, tmp_path):
    bases_file = tmp_path / "bases.safetensors"
    bases.save(bases_file)
    sizes = {}
    for embed in (True, False):
        model = get_peft_model(_model(tiny_llama_dir),
                               SparseGradConfig(bases=str(bases_file), density=0.1, embed_bases=embed))
        _train(model, chat_batches[2:4])
        model.save_pretrained(tmp_path / str(embed))
        sizes[embed] = (tmp_path / str(embed) / "adapter_model.safetensors").stat().st_size
        loaded = PeftModel.from_pretrained(_model(tiny_llama_dir), tmp_path / str(embed))
        assert torch.allclose(_logits(loaded, chat_batches[0]), _logits(model, chat_batches[0]), rtol=0, atol=1e-10)
    assert sizes[False] < sizes[True] / 2
    config = json.loads((tmp_path / "False" / "adapter_config.json").read_text())
    assert config["bases"] == str(bases_file) and len(config["bases_sha256"]) == 64
    bases_file.write_bytes(bases_file.read_bytes()[:-8] + b"\0" * 8)  # another file at that path
    with pytest.raises(ValueError, match="SHA-256 differs"):
        PeftModel.from_pretrained(_model(tiny_llama_dir), tmp_path / "False")


def test_bfloat16_adapter_reloads_bit_exactly(tiny_llama_dir, chat_batches, bases):
    """A bfloat16 model: the weight is rebuilt exactly, so a reloaded adapter gives the same bits."""
    import tempfile

    model = _train(get_peft_model(_model(tiny_llama_dir, torch.bfloat16), SparseGradConfig(bases=bases, density=0.1)),
                   chat_batches[2:4])
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = PeftModel.from_pretrained(_model(tiny_llama_dir, torch.bfloat16), folder)
    for (name, a), (_, b) in zip(model.merge_and_unload().state_dict().items(),
                                 loaded.merge_and_unload().state_dict().items()):
        assert torch.equal(a, b), name


def test_blocks_and_targets_select_layers(tiny_llama_dir, bases):
    model = get_peft_model(_model(tiny_llama_dir),
                           SparseGradConfig(bases=bases, target_modules=["up_proj", "down_proj"], blocks="every:2"))
    names = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, SparseGradLayer))
    assert names == [f"model.layers.{b}.mlp.{p}" for b in (0, 2) for p in ("down_proj", "up_proj")]


def test_clear_errors(tiny_llama_dir, chat_batches, bases):
    model = get_peft_model(_model(tiny_llama_dir), SparseGradConfig(density=0.1))  # no bases
    with pytest.raises(RuntimeError, match="has no bases yet"):
        model(**chat_batches[0])
    with pytest.raises(ValueError, match="'fixed' or 'dynamic'"):
        SparseGradConfig(mode="meprop")
    with pytest.raises(ValueError, match="density or n_params"):
        SparseGradConfig(density=0.1, n_params=5)
    with pytest.raises(ValueError, match="embed_bases=False"):
        SparseGradConfig(bases=bases, embed_bases=False)
    no_energy = sparsegrad.Bases(bases.U, bases.V, bases.layers)
    with pytest.raises(ValueError, match="with_energy=True"):
        get_peft_model(_model(tiny_llama_dir), SparseGradConfig(bases=no_energy))
    with pytest.raises(ValueError, match="match no linear layer"):
        get_peft_model(_model(tiny_llama_dir), SparseGradConfig(bases=bases, target_modules=["nothing_here"]))
    with pytest.raises(ValueError, match=r"already holds peft adapters .*get_base_model"):
        get_peft_model(get_peft_model(_model(tiny_llama_dir), SparseGradConfig(bases=bases)),
                       SparseGradConfig(bases=bases))
    bloom = BloomForCausalLM(BloomConfig(vocab_size=50, hidden_size=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match=r"no default MLP targets for model_type='bloom'.*target_modules=\[\.\.\.\]"):
        get_peft_model(bloom, SparseGradConfig(density=0.1))


def test_two_adapters_switch(tiny_llama_dir, chat_batches, bases):
    """A second adapter: set_adapter folds it in place of the first; each gives its own outputs."""
    model = get_peft_model(_model(tiny_llama_dir), SparseGradConfig(bases=bases, density=0.1))
    _train(model, chat_batches[2:4])
    first = _logits(model, chat_batches[0])
    model.add_adapter("other", SparseGradConfig(bases=bases, density=0.1, mode="dynamic"))
    model.set_adapter("other")
    _train(model, chat_batches[4:])
    other = _logits(model, chat_batches[0])
    assert (other - first).abs().max() > 1e-3
    model.set_adapter("default")
    assert torch.allclose(_logits(model, chat_batches[0]), first, rtol=0, atol=1e-10)
    model.delete_adapter("default")
    model.set_adapter("other")
    assert torch.allclose(_logits(model, chat_batches[0]), other, rtol=0, atol=1e-10)


def test_dynamic_adapter_trains_on_with_its_bases_file(tiny_llama_dir, chat_batches, bases, tmp_path):
    """A dynamic adapter chooses new entries anywhere: reloaded with only its embedded rows it refuses
    to train (clearly); with the bases file named in its config it trains on as the original."""
    bases_file = tmp_path / "bases.safetensors"
    bases.save(bases_file)
    original = _train(get_peft_model(_model(tiny_llama_dir), SparseGradConfig(bases=bases, density=0.1,
                                                                               mode="dynamic")), chat_batches[2:4])
    original.save_pretrained(tmp_path / "adapter")
    partial = PeftModel.from_pretrained(_model(tiny_llama_dir), tmp_path / "adapter", is_trainable=True)
    with pytest.raises(RuntimeError, match=r"only the basis rows.*to run it, model.eval\(\)"):
        _train(partial, chat_batches[4:])
    partial.eval()  # trainable, but only run: a plain forward is fine
    assert torch.allclose(partial(**chat_batches[0]).logits, _logits(original, chat_batches[0]), rtol=0, atol=1e-9)
    config = SparseGradConfig.from_pretrained(tmp_path / "adapter")
    config.bases = str(bases_file)
    reloaded = PeftModel.from_pretrained(_model(tiny_llama_dir), tmp_path / "adapter", config=config,
                                         is_trainable=True)
    _train(original, chat_batches[4:])
    _train(reloaded, chat_batches[4:])
    assert torch.allclose(_logits(reloaded, chat_batches[0]), _logits(original, chat_batches[0]), rtol=0, atol=1e-9)
    other = sparsegrad.Bases({k: -u for k, u in bases.U.items()}, bases.V, bases.layers, bases.energy)
    other.save(tmp_path / "other.safetensors")
    config.bases = str(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="basis rows differ"):
        PeftModel.from_pretrained(_model(tiny_llama_dir), tmp_path / "adapter", config=config)


def test_registered_in_peft_and_refused_on_a_peft_that_does_not_fit(monkeypatch):
    from peft import mapping
    from peft.tuners.tuners_utils import BaseTuner

    from sparsegrad import tuner

    assert sparsegrad.SparseGradConfig is SparseGradConfig  # the top-level name imports the tuner on first use
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["SPARSEGRAD"] is tuner.SparseGradModel
    monkeypatch.delattr(BaseTuner, "_remap_adapter_state_dict_for_load")
    with pytest.raises(ImportError, match=r"needs peft>=0.21,<0.22.*_remap_adapter_state_dict_for_load"):
        tuner._register()
