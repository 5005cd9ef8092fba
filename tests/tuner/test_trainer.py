"""SparseGrad in the Hugging Face Trainer and TRL's SFTTrainer: the preliminary phase from the
trainer's own dataloader (SparseGradCallback), checkpoints that reload and resume."""
from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
from transformers.utils import logging

import sparsegrad
from sparsegrad.recipes.chat import Collator, encode, read_jsonl
from sparsegrad.tuner import SparseGradCallback, SparseGradConfig

logging.set_verbosity_error()


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _trainer(folder, data, out, mode="fixed", max_steps=6, bases_file=None, **kwargs):
    tok = AutoTokenizer.from_pretrained(folder)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), SparseGradConfig(density=0.1, mode=mode))
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8,
                             learning_rate=1e-2, lr_scheduler_type="constant", save_steps=3, logging_steps=1,
                             report_to=[], use_cpu=True, seed=0, data_seed=0, **kwargs)
    optimizers = (sparsegrad.optimizer(model, lr=1e-2), None) if mode == "dynamic" else (None, None)
    return Trainer(model=model, args=args, train_dataset=data, data_collator=Collator(tok),
                   callbacks=[SparseGradCallback(n_steps=2, bases_file=bases_file)], optimizers=optimizers)


@pytest.fixture(scope="module")
def tiny_bases(tiny_llama_dir, chat_batches):
    return sparsegrad.compute_bases(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), chat_batches[:2], 2,
                                    progress=False)


@pytest.fixture(scope="module")
def chat_data(tiny_llama_dir, chat_file):
    return encode(AutoTokenizer.from_pretrained(tiny_llama_dir), read_jsonl(chat_file), 128)


@pytest.mark.parametrize("mode", ["fixed", "dynamic"])
def test_trainer_learns_and_its_checkpoint_reloads(tiny_llama_dir, chat_data, tmp_path, mode):
    trainer = _trainer(tiny_llama_dir, chat_data, tmp_path, mode)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1  # 10.30 -> 10.08 (fixed) measured
    batch = Collator(AutoTokenizer.from_pretrained(tiny_llama_dir))(chat_data[:8])
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "checkpoint-6")
    assert torch.allclose(_logits(reloaded, batch), _logits(trainer.model, batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["fixed", "dynamic"])
def test_trainer_resumes_to_the_uninterrupted_result(tiny_llama_dir, chat_data, tmp_path, mode):
    """dynamic resumes with the whole bases: the callback saves them and the adapter names the file."""
    bases_file = str(tmp_path / "bases.safetensors") if mode == "dynamic" else None
    whole = _trainer(tiny_llama_dir, chat_data, tmp_path / "whole", mode)
    whole.train()
    cut = _trainer(tiny_llama_dir, chat_data, tmp_path / "cut", mode, bases_file=bases_file)
    cut.args.max_steps = 3
    cut.train()  # stops after writing checkpoint-3
    resumed = _trainer(tiny_llama_dir, chat_data, tmp_path / "cut", mode, bases_file=bases_file)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    batch = Collator(AutoTokenizer.from_pretrained(tiny_llama_dir))(chat_data[:8])
    assert torch.allclose(_logits(resumed.model, batch), _logits(whole.model, batch), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_sft_trainer_on_smollm2(oasst_file, tmp_path):
    """TRL's SFTTrainer with peft_config=SparseGradConfig(...) on the embedded SmolLM2 and real oasst1 chats."""
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'sparsegrad-ft[trl]')")
    from datasets import Dataset

    from sparsegrad.recipes.assets import smollm2_path

    folder = smollm2_path()
    conversations = [{"messages": c["messages"]} for c in read_jsonl(oasst_file)[:16]]
    tok = AutoTokenizer.from_pretrained(folder)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                         max_length=64, logging_steps=1, save_steps=2, report_to=[], use_cpu=True, bf16=False, seed=0)
    config = SparseGradConfig(density=0.01, target_modules=["up_proj", "down_proj"], blocks="every:3")
    trainer = trl.SFTTrainer(model=AutoModelForCausalLM.from_pretrained(folder), args=args,
                             train_dataset=Dataset.from_list(conversations), processing_class=tok, peft_config=config,
                             callbacks=[SparseGradCallback(n_steps=1)])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    batch = tok(["The capital of France is"], return_tensors="pt")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "checkpoint-2")
    assert torch.allclose(_logits(reloaded, batch), _logits(trainer.model, batch), rtol=0, atol=1e-4)
    assert not torch.allclose(_logits(reloaded, batch), _logits(AutoModelForCausalLM.from_pretrained(folder), batch))


def test_trainer_with_a_model_converted_by_apply(tiny_llama_dir, chat_data, tiny_bases, tmp_path):
    """The library's own conversion in the Trainer: dynamic's top-k taken by the callback before each step."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    sparsegrad.apply(model, tiny_bases, density=0.1, mode="dynamic")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=chat_data,
                      data_collator=Collator(AutoTokenizer.from_pretrained(tiny_llama_dir)),
                      optimizers=(sparsegrad.optimizer(model, lr=1e-2), None), callbacks=[SparseGradCallback()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]
    for layer in sparsegrad.sparse_layers(model).values():
        assert not layer.topk_in_backward  # deferred: cut once per step, by the callback
        assert 0 < int(layer.delta.count_nonzero()) <= 4 * layer.k


def test_dynamic_in_the_trainer_needs_a_sparse_optimizer_and_says_which(tiny_llama_dir, chat_data, tmp_path):
    """The Trainer's default optimizer cannot take the dynamic mode's sparse gradients: the callback says
    which optimizer to pass before any step, instead of torch's advice to use SparseAdam."""
    trainer = _trainer(tiny_llama_dir, chat_data, tmp_path, "dynamic")
    trainer.optimizer = None  # the Trainer builds its default AdamW
    with pytest.raises(ValueError, match=r"optimizers=\(sparsegrad.optimizer\(model, lr=.*\), None\)"):
        trainer.train()


def test_dynamic_adapter_trains_in_the_trainer_without_the_callback(tiny_llama_dir, chat_data, tiny_bases, tmp_path):
    """With its bases given and sparsegrad.optimizer but no callback: the Trainer clips the complete gradient
    (dense: the adapter cuts its top-k only at the step) and the step keeps k entries per layer."""
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                           SparseGradConfig(bases=tiny_bases, density=0.1, mode="dynamic"))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=chat_data, data_collator=Collator(tok),
                      optimizers=(sparsegrad.optimizer(model, lr=1e-2), None))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]
    layers = [m for m in model.modules() if isinstance(m, sparsegrad.SparseGradLinear)]
    assert layers and all(0 < int(m.delta.count_nonzero()) <= 4 * m.k for m in layers)
