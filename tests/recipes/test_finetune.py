"""The fine-tuning recipe's pieces, called directly on tiny models: a step, an evaluation, a resume."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from sparsegrad import sparse_layers
from sparsegrad.recipes.chat import IGNORE
from sparsegrad.recipes.config import RunConfig
from sparsegrad.recipes.finetune import FineTuneRecipe, finetune
from sparsegrad.recipes.results import RunResult
from sparsegrad.util import to_device


def _chat_cfg(tiny_llama_dir, chat_file, **kw) -> RunConfig:
    return RunConfig(**{"task": "chat", "model": str(tiny_llama_dir), "data_dir": str(chat_file), "batch_size": 8,
                        "lr": 3e-3, "density": 0.1, "bases_steps": 2, "max_length": 64, "epochs": 2, "cpu": True,
                        **kw})


def _ready(cfg, tmp_path) -> FineTuneRecipe:
    recipe = FineTuneRecipe(cfg, tmp_path / "run", progress=False)
    recipe.setup()
    return recipe


@pytest.mark.parametrize("mode", ["fixed", "dynamic"])
def test_a_step_trains_only_what_the_method_trains(tiny_llama_dir, chat_file, tmp_path, mode):
    recipe = _ready(_chat_cfg(tiny_llama_dir, chat_file, mode=mode), tmp_path)
    before = {n: p.detach().clone() for n, p in recipe.raw.named_parameters()}
    trainable = {n for n, p in recipe.raw.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".values" if mode == "fixed" else ".delta") for n in trainable)
    losses = [recipe.train_step() for _ in range(2)]  # the first step's lr is 0 (linear warm-up from 0)
    assert all(math.isfinite(loss) and loss > 0 for loss in losses)
    after = dict(recipe.raw.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    # rest="none" for chat: the sparse values alone trained; the frozen weights they fold into took the folds
    folded = {f"{name}.weight" for name in sparse_layers(recipe.raw)}
    assert changed == trainable | folded
    if mode == "dynamic":  # the step kept the top-k of each layer's complete gradient
        layer = recipe.raw.model.layers[0].mlp.up_proj
        assert 0 < int(layer.delta.ne(0).sum()) <= layer.k
    assert recipe.optimizer.state and recipe.scheduler.last_epoch == 2


def test_evaluation_is_the_mean_loss_over_assistant_tokens(tiny_llama_dir, chat_file, tmp_path):
    recipe = _ready(_chat_cfg(tiny_llama_dir, chat_file), tmp_path)
    metrics = recipe.evaluate()
    # by hand: the summed token losses of every validation conversation over their assistant tokens
    total, tokens = 0.0, 0
    recipe.raw.eval()
    collate = recipe.kind.collator(recipe.tokenizer)
    with torch.no_grad():
        for example in recipe.eval_data["validation"]:
            batch = collate([example])
            logits = recipe.raw(**to_device(batch, recipe.device)).logits[0, :-1]
            labels = batch["labels"][0, 1:]
            keep = labels != IGNORE
            total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            tokens += int(keep.sum())
    assert metrics["tokens"] == tokens
    assert metrics["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-6)
    assert recipe.state.baseline == metrics  # the chat baseline is the untrained model's


def test_classification_evaluation_is_the_accuracy_of_the_argmax(minilm_path, tmp_path):
    cfg = RunConfig(max_train_samples=40, max_eval_samples=30, max_length=32, batch_size=8, method="ft", cpu=True)
    recipe = _ready(cfg, tmp_path)
    metrics = recipe.evaluate()
    enc = recipe.eval_data["validation"]
    collate = recipe.kind.collator(recipe.tokenizer)
    recipe.raw.eval()
    with torch.no_grad():
        preds = [int(recipe.raw(**collate([{k: v for k, v in e.items() if k != "labels"}])).logits.argmax())
                 for e in enc]
    assert metrics["accuracy"] == pytest.approx(np.mean([p == e["labels"] for p, e in zip(preds, enc)]))
    assert recipe.state.baseline["accuracy"] < 0.5  # the majority class of five


class _Killed(Exception):
    pass


class _KilledAfterCheckpoint(FineTuneRecipe):
    """Dies right after writing the checkpoint of step `at`, as kill -9 would after the rename."""

    at = 4

    def save_checkpoint(self) -> None:
        super().save_checkpoint()
        if self.state.step == self.at:
            raise _Killed


def test_resume_reaches_the_uninterrupted_result(tiny_llama_dir, chat_file, tmp_path):
    # dynamic: the mode with the most state to restore (dense delta, lazy Adam moments, the merged copy)
    cfg = _chat_cfg(tiny_llama_dir, chat_file, mode="dynamic", eval_steps=2, epochs=1, max_steps=8)
    whole = finetune(cfg, tmp_path / "whole", progress=False)

    killed = _KilledAfterCheckpoint(cfg, tmp_path / "killed", bases_file=tmp_path / "whole" / "bases.safetensors",
                                    progress=False)
    killed.setup()
    with pytest.raises(_Killed):
        killed.train()
    assert not (tmp_path / "killed" / "results.json").exists()

    resumed = FineTuneRecipe(cfg, tmp_path / "killed", bases_file=tmp_path / "whole" / "bases.safetensors",
                             progress=False)
    resumed.setup(resume=True)
    assert resumed.state.step == 4 and resumed.state.resumed_at == [4]
    resumed.train()
    result = resumed.finish()
    assert isinstance(result, RunResult) and result.train_steps == whole.train_steps == 8
    assert [h["loss"] for h in result.history] == pytest.approx([h["loss"] for h in whole.history], rel=1e-6)
    assert result.final["validation"]["loss"] == pytest.approx(whole.final["validation"]["loss"], rel=1e-6)
    assert RunResult.load(tmp_path / "killed" / "results.json") == result
    assert finetune(cfg, tmp_path / "killed", resume=True) == result  # a finished run answers from its file


def test_heldout_split_selects_and_dev_is_only_reported(tmp_path):
    from sparsegrad.recipes.data import HELDOUT, load_task

    whole = load_task("bbcnews")
    data = load_task("bbcnews", heldout=0.1, max_train_samples=60)
    held = data.eval[HELDOUT]
    assert list(data.eval) == [HELDOUT, "validation"] and len(held) == round(0.1 * len(whole.train))
    texts = {e["text"] for e in held}
    assert not texts & {e["text"] for e in data.train}  # held out: never trained on
    assert [e["text"] for e in load_task("bbcnews", heldout=0.1).eval[HELDOUT]] == [e["text"] for e in held]
    with pytest.raises(ValueError, match="--heldout"):
        load_task("bbcnews", heldout=len(whole.train))

    cfg = RunConfig(max_train_samples=48, max_eval_samples=24, heldout=24, max_length=32, batch_size=8, method="ft",
                    rest="head", epochs=1, lr=1e-3, cpu=True)
    result = finetune(cfg, tmp_path / "run", progress=False)
    assert list(result.final) == [HELDOUT, "validation"]
    assert result.score == result.final[HELDOUT]["accuracy"] == max(h[HELDOUT]["accuracy"] for h in result.history)


def test_bases_after_a_head_warmup_see_a_head_that_learned(minilm_path, tmp_path):
    cfg = RunConfig(max_train_samples=64, max_eval_samples=16, max_length=32, batch_size=16, rest="head",
                    bases_steps=2, bases_warmup_steps=6, lr=5e-3, cpu=True)
    warm = FineTuneRecipe(cfg, tmp_path / "warm", progress=False)
    warm.setup_data()
    warm.setup_model()
    head = {n: p.detach().clone() for n, p in warm.model.named_parameters() if n.startswith("classifier")}
    encoder = {n: p.detach().clone() for n, p in warm.model.named_parameters() if not n.startswith("classifier")}
    warm.setup_bases()
    info = warm.bases_info["head_warmup"]
    assert info["steps"] == 6 and info["last_loss"] < info["first_loss"]
    after = dict(warm.model.named_parameters())
    assert all(not torch.equal(after[n], p) for n, p in head.items())  # the head moved ...
    assert all(torch.equal(after[n], p) for n, p in encoder.items())  # ... and nothing else did
    assert all(p.requires_grad for p in warm.model.parameters())  # the flags as they were, for prepare

    cold = FineTuneRecipe(replace(cfg, bases_warmup_steps=0), tmp_path / "cold", progress=False)
    cold.setup_data()
    cold.setup_model()
    cold.setup_bases()
    role = next(iter(warm.bases.U))
    assert not torch.allclose(warm.bases.U[role].abs(), cold.bases.U[role].abs(), atol=1e-3)


def test_support_refresh_in_the_recipe(minilm_path, tmp_path):
    cfg = RunConfig(max_train_samples=64, max_eval_samples=16, max_length=32, batch_size=16, rest="head", epochs=2,
                    bases_steps=2, refresh_steps=3, lr=5e-3, cpu=True)
    recipe = _ready(cfg, tmp_path)
    layer = recipe.raw.bert.encoder.layer[0].intermediate.dense
    support = layer.rows.clone(), layer.cols.clone()
    recipe.train()  # 8 steps: refreshes after steps 3 and 6
    assert recipe.refresh.refreshes == 2 and layer.frozen_rows is not None
    assert not (torch.equal(layer.rows, support[0]) and torch.equal(layer.cols, support[1]))
    result = recipe.finish()
    assert result.status == "finished" and result.final["validation"]["accuracy"] > 0


def test_compiled_steps_equal_eager_ones(tiny_llama_dir, chat_file, tmp_path, monkeypatch):
    """--compile: the training steps run through torch.compile (here its aot_eager backend: the graph
    capture and AOTAutograd, without code generation) and give the eager run's losses and values."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        recipe = _ready(_chat_cfg(tiny_llama_dir, chat_file, compile=compiled), tmp_path / str(compiled))
        assert (recipe.model is not recipe.raw) == compiled
        losses = [recipe.train_step() for _ in range(3)]
        runs.append((losses, [p.detach().clone() for p in recipe.raw.parameters() if p.requires_grad]))
    (eager, eager_values), (losses, values) = runs
    assert losses == pytest.approx(eager, rel=1e-6)
    for a, b in zip(values, eager_values):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
