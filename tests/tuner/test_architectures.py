"""Default targets for more decoder families, each on a tiny random model built from its transformers config:
apply keeps the outputs, training steps move the loss, merge keeps the trained outputs, and the peft adapter
round-trips; a mixture-of-experts model is refused by name."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

import sparsegrad
from sparsegrad.tuner import SparseGradConfig

TINY = {  # model_type -> (its config's tiny sizes, MLP roles)
    "opt": ({"hidden_size": 32, "ffn_dim": 64, "word_embed_proj_dim": 32, "num_attention_heads": 2,
             "max_position_embeddings": 64}, ("fc1", "fc2")),
    "gpt_neox": ({"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2},
                 ("dense_h_to_4h", "dense_4h_to_h")),
    "falcon": ({"hidden_size": 32, "num_attention_heads": 2}, ("dense_h_to_4h", "dense_4h_to_h")),
    "phi3": ({"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "pad_token_id": 0},
             ("gate_up_proj", "down_proj")),  # gate and up fused: one role
    "gemma3_text": ({"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "head_dim": 16}, ("gate_proj", "up_proj", "down_proj")),
}
VOCAB = 100


def tiny(model_type: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    sizes, _ = TINY.get(model_type, ({}, ()))
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, num_hidden_layers=2, bos_token_id=1, eos_token_id=2,
                                  **sizes, **extra)
    return AutoModelForCausalLM.from_config(config).double()


def batches(n: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": x, "labels": x} for x in (torch.randint(3, VOCAB, (4, 16), generator=g) for _ in range(n))]


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def train(model, data, lr=1e-2) -> list[float]:
    model.train()
    opt = sparsegrad.optimizer(model, lr=lr)
    losses = []
    for _ in range(3):
        for batch in data:
            loss = model(**batch).loss
            loss.backward()
            losses.append(loss.item())
            opt.step()
            opt.zero_grad()
    return losses


@pytest.mark.parametrize("model_type", list(TINY))
def test_default_targets_apply_train_merge_and_round_trip(model_type, tmp_path):
    data = batches()
    model = tiny(model_type)
    bases = sparsegrad.compute_bases(model, data[:2], 2, progress=False)
    roles = {name.rsplit(".", 1)[-1] for name in bases.layers}
    assert roles == set(TINY[model_type][1]) and len(bases.U) == len(roles)

    before = logits(model, data[0])
    sparsegrad.apply(model, bases, density=0.05)
    torch.testing.assert_close(logits(model, data[0]), before, rtol=0, atol=1e-10)
    losses = train(model, data)
    assert losses[-1] < losses[0] - 0.01, losses  # it learns
    trained = logits(model, data[0])
    sparsegrad.merge(model)
    assert not sparsegrad.sparse_layers(model)
    torch.testing.assert_close(logits(model, data[0]), trained, rtol=0, atol=1e-10)

    adapted = get_peft_model(tiny(model_type), SparseGradConfig(bases=bases, density=0.05))
    train(adapted, data)
    adapted.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny(model_type), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, data[0]), logits(adapted, data[0]), rtol=0, atol=1e-10)


def test_mixture_of_experts_is_refused_by_name():
    moe = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "mixtral", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, bos_token_id=1, eos_token_id=2))
    with pytest.raises(ValueError, match=r"model_type='mixtral' is a mixture-of-experts model: .*targets=\[\.\.\.\]"):
        sparsegrad.compute_bases(moe, batches(1), 1, progress=False)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        get_peft_model(moe, SparseGradConfig(density=0.01))
