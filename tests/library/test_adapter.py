"""Adapters: what training changed, saved small and loaded onto a fresh base model with the trained
model's outputs; merge + save_pretrained gives a folder that loads without sparsegrad."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import sparsegrad
from sparsegrad.adapter import load_adapter, plain_model_bytes, save_adapter
from sparsegrad.recipes.methods import prepare


def _trained(tiny_llama_dir, batches, method="sparsegrad", mode="fixed", rest="none", dtype=torch.float32,
             bases=None, structure="scattered"):
    """The tiny decoder after 4 steps of `method` (SparseGrad layers still in place)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype)
    if method == "sparsegrad" and bases is None:
        bases = sparsegrad.compute_bases(model, batches[:2], n_steps=2, progress=False)
    prepare(model, method, rest=rest, bases=bases, mode=mode, structure=structure, density=0.1)
    opt = sparsegrad.optimizer(model, lr=1e-2)
    for batch in batches[2:]:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, bases


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("mode,rest,dtype,tol", [("fixed", "none", torch.float64, 1e-10),
                                                 ("dynamic", "none", torch.float64, 1e-10),
                                                 ("fixed", "all", torch.float32, 2e-5),
                                                 ("block", "none", torch.float64, 1e-10)])
def test_adapter_reproduces_the_trained_model(tiny_llama_dir, chat_batches, tmp_path, mode, rest, dtype, tol):
    structure = "block" if mode == "block" else "scattered"  # the fixed mode's block support
    model, _ = _trained(tiny_llama_dir, chat_batches, mode="fixed" if mode == "block" else mode, rest=rest,
                        dtype=dtype, structure=structure)
    info = save_adapter(model, tmp_path / "adapter", base_model=str(tiny_llama_dir))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert len(config["layers"]) == 12 and config["bases"] == "embedded"
    assert bool(config["dense"]) == (rest == "all")
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype)
    before = _logits(fresh, chat_batches[0])
    load_adapter(fresh, tmp_path / "adapter")
    expected, got = _logits(model, chat_batches[0]), _logits(fresh, chat_batches[0])
    assert (expected - before).abs().max() > 100 * tol  # training changed the outputs...
    assert (expected - got).abs().max() < tol  # ...and the adapter carries exactly that change
    if rest == "none":  # (with rest=all the embeddings, most of this tiny model, train and are saved whole)
        assert info["bytes"] < plain_model_bytes(model) / 5


@pytest.mark.parametrize("group_by", ["layer", "shape"])
def test_adapter_of_bases_not_grouped_by_role(tiny_llama_dir, chat_batches, tmp_path, group_by):
    """Each layer's basis rows are stored with the bases it holds, however the bases were grouped."""
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64)
    bases = sparsegrad.compute_bases(plain, chat_batches[:2], n_steps=2, group_by=group_by, progress=False)
    model, _ = _trained(tiny_llama_dir, chat_batches, dtype=torch.float64, bases=bases)
    save_adapter(model, tmp_path / "adapter")
    fresh = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64), tmp_path / "adapter")
    assert (_logits(model, chat_batches[0]) - _logits(fresh, chat_batches[0])).abs().max() < 1e-10


def test_bases_by_reference_are_smaller_and_checked(tiny_llama_dir, chat_batches, tmp_path):
    model, bases = _trained(tiny_llama_dir, chat_batches)
    bases.save(tmp_path / "bases.safetensors")
    embedded = save_adapter(model, tmp_path / "embedded")
    by_ref = save_adapter(model, tmp_path / "by-ref", bases_file=tmp_path / "bases.safetensors")
    assert by_ref["bytes"] < embedded["bytes"]
    fresh = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "by-ref")
    assert (_logits(model, chat_batches[0]) - _logits(fresh, chat_batches[0])).abs().max() < 2e-5

    other = sparsegrad.compute_bases(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), chat_batches[3:5],
                                     n_steps=2, progress=False)
    other.save(tmp_path / "bases.safetensors")  # a different file at the referenced path
    with pytest.raises(ValueError, match="sha256"):
        load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "by-ref")
    (tmp_path / "bases.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="refers to the bases"):
        load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "by-ref")


def test_adapter_that_does_not_fit_is_refused(tiny_llama_dir, chat_batches, tmp_path, minilm_path):
    model, _ = _trained(tiny_llama_dir, chat_batches)
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match="lacks"):
        load_adapter(AutoModelForCausalLM.from_pretrained(minilm_path), tmp_path / "adapter")
    lora, _ = _trained(tiny_llama_dir, chat_batches, method="lora")
    save_adapter(lora, tmp_path / "lora")
    with pytest.raises(ValueError, match="LoRA"):
        load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "lora")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(model, tmp_path)


def test_merged_model_loads_without_sparsegrad(tiny_llama_dir, chat_batches, tmp_path):
    model, _ = _trained(tiny_llama_dir, chat_batches)
    expected = _logits(model, chat_batches[0])
    sparsegrad.merge(model)
    model.save_pretrained(tmp_path / "merged")
    torch.save({"batch": {k: chat_batches[0][k] for k in ("input_ids", "attention_mask")}, "logits": expected},
               tmp_path / "expected.pt")
    script = f"""
import sys, torch
sys.modules["sparsegrad"] = None  # importing sparsegrad would fail: the folder must not need it
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "merged")!r}).eval()
saved = torch.load({str(tmp_path / "expected.pt")!r})
with torch.no_grad():
    logits = model(**saved["batch"]).logits
print(float((logits - saved["logits"]).abs().max()))
print(type(model.model.layers[0].mlp.up_proj).__name__)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    diff, kind = done.stdout.split()
    assert float(diff) < 1e-5 and kind == "Linear"


def test_lora_adapter_of_the_same_count_for_size(tiny_llama_dir, chat_batches, tmp_path):
    """The sizes compared in the notes: SparseGrad fixed (indices + values + basis rows) vs LoRA at the same
    trainable count vs the whole model."""
    sparse, _bases = _trained(tiny_llama_dir, chat_batches)
    lora, _ = _trained(tiny_llama_dir, chat_batches, method="lora")
    s = save_adapter(sparse, tmp_path / "sparse")["bytes"]
    lo = save_adapter(lora, tmp_path / "lora")["bytes"]
    k = sum(layer.k for layer in sparsegrad.sparse_layers(sparse).values())
    n_lora = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert abs(n_lora - k) < 0.3 * k  # matched counts
    assert s > 8 * k  # int16 row + int16 col + float32 value per entry, plus basis rows
    assert lo >= 4 * n_lora and s < plain_model_bytes(sparse)
