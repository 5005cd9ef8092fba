"""Default MLP targets per architecture, on tiny models built from configs."""
import pytest
import transformers

from sparsegrad.targets import find_targets, role_of

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}

CASES = {
    "bert": ("BertConfig", "BertModel", {}, ["encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"]),
    "roberta": ("RobertaConfig", "RobertaModel", {}, ["encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense"]),
    "electra": ("ElectraConfig", "ElectraModel", {"embedding_size": 32}, ["encoder.layer.0.output.dense"]),
    "mpnet": ("MPNetConfig", "MPNetModel", {}, ["encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"]),
    "distilbert": ("DistilBertConfig", "DistilBertModel",
                   {"dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 100},
                   ["transformer.layer.0.ffn.lin1", "transformer.layer.0.ffn.lin2"]),
    "llama": ("LlamaConfig", "LlamaModel", {"num_key_value_heads": 2}, ["layers.0.mlp.gate_proj", "layers.0.mlp.down_proj"]),
    "mistral": ("MistralConfig", "MistralModel", {"num_key_value_heads": 2}, ["layers.1.mlp.up_proj"]),
    "qwen2": ("Qwen2Config", "Qwen2Model", {"num_key_value_heads": 2}, ["layers.0.mlp.up_proj"]),
    "gpt2": ("GPT2Config", "GPT2Model",
             {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 0},
             ["h.0.mlp.c_fc", "h.1.mlp.c_proj"]),
}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_default_targets_are_the_mlp_linears(arch):
    config_name, model_name, extra, expected = CASES[arch]
    own_names = arch in ("distilbert", "gpt2")  # these configs name their sizes differently
    config = getattr(transformers, config_name)(**(extra if own_names else {**TINY, **extra}))
    model = getattr(transformers, model_name)(config)
    found = find_targets(model)
    per_block = 3 if arch in ("llama", "mistral", "qwen2") else 2
    assert len(found) == 2 * per_block
    assert all(name in found for name in expected)
    assert not any("attention" in name or "attn" in name for name in found)


def test_user_targets_suffixes_and_regex():
    model = transformers.BertModel(transformers.BertConfig(**TINY))
    assert len(find_targets(model, ["intermediate.dense"])) == 2
    assert len(find_targets(model, r"encoder\.layer\.1\.intermediate\.dense")) == 1
    with pytest.raises(ValueError, match="is a BertIntermediate, not a linear layer"):
        find_targets(model, ["intermediate"])
    with pytest.raises(ValueError, match="targets is empty"):
        find_targets(model, [])


def test_role_names_share_across_blocks():
    assert role_of("bert.encoder.layer.3.intermediate.dense") == "bert.encoder.layer.*.intermediate.dense"
    assert role_of("model.layers.11.mlp.up_proj") == "model.layers.*.mlp.up_proj"
