"""One typed configuration: the command line is built from RunConfig, and results are typed."""
import argparse
import dataclasses

import pytest

from sparsegrad.recipes.config import CommandOptions, RunConfig, add_arguments, from_args
from sparsegrad.recipes.kinds import KINDS, kind_of
from sparsegrad.recipes.results import SummaryRow
from sparsegrad.recipes.tasks import TASKS


def _parser():
    p = argparse.ArgumentParser()
    add_arguments(p, RunConfig)
    add_arguments(p, CommandOptions)
    return p


def test_every_field_is_an_option_with_help_and_its_default():
    p = _parser()
    options = {a.dest: a for a in p._actions}
    for f in dataclasses.fields(RunConfig):
        if f.name == "seed":  # the command line takes --seeds
            continue
        assert f.name in options, f.name
        assert f.metadata["help"] and options[f.name].help
    defaults = from_args(RunConfig, p.parse_args([]))
    assert defaults == RunConfig()


def test_options_parse_into_typed_fields():
    args = _parser().parse_args(["--task", "chat", "--lr", "3e-4", "--targets", "up_proj", "down_proj",
                                 "--run-type", "regular", "--cpu", "--seeds", "1", "2", "--mode", "dynamic"])
    cfg, options = from_args(RunConfig, args), from_args(CommandOptions, args)
    assert cfg.lr == 3e-4 and cfg.targets == ["up_proj", "down_proj"] and cfg.cpu and cfg.mode == "dynamic"
    assert cfg.method == "ft" and cfg.rest == "none"  # alias resolved; the chat kind's default rest
    assert options.seeds == [1, 2]
    with pytest.raises(SystemExit):
        _parser().parse_args(["--mode", "sparse"])


def test_every_task_names_a_registered_kind():
    for task in TASKS.values():
        assert kind_of(task) is KINDS[task.kind]


def test_summary_rows_read_files_of_the_older_flat_layout():
    row = {"task": "chat", "method": "lora", "rest": "none", "metric": "loss", "mean": 1.0, "std": 0.0,
           "seeds": [0], "scores": [1.0], "baseline": 2.0, "greater_is_better": False, "trainable": 10,
           "trainable_mlp": 10, "total": 100, "lora_rank": 1, "steps_per_s": 1.0, "peak_memory_mb": 5.0,
           "memory_kind": "cpu", "lr": 1e-3, "batch_size": 4, "validation/perplexity": 2.7}
    parsed = SummaryRow.from_dict(row)
    assert parsed.splits == {"validation/perplexity": 2.7}
    assert SummaryRow.from_dict(parsed.to_dict()) == parsed


def test_each_method_takes_its_own_default_lr_unless_one_is_given():
    from sparsegrad.recipes.methods import DEFAULT_LR, FALLBACK_LR

    peft = {m: RunConfig(task="sst2", rest="head", method=m.split("-")[0], mode=(m.split("-") + ["fixed"])[1])
            for m in ("ft", "lora", "meprop", "sparsegrad-fixed", "sparsegrad-dynamic")}
    for label, cfg in peft.items():
        assert cfg.lr is None and cfg.with_default_lr().lr == DEFAULT_LR[("classification", "head", label)]
    assert peft["lora"].with_default_lr().lr != peft["ft"].with_default_lr().lr  # the methods want different ones
    assert RunConfig(task="sst2", rest="all").with_default_lr().lr == DEFAULT_LR[("classification", "all", "ft")]
    chat = {m: RunConfig(task="chat", method=m).with_default_lr().lr for m in ("ft", "lora")}
    assert chat == {"ft": DEFAULT_LR[("causal_lm", "none", "ft")], "lora": DEFAULT_LR[("causal_lm", "none", "lora")]}
    assert RunConfig(task="chat", rest="all").with_default_lr().lr == FALLBACK_LR  # not measured
    assert RunConfig(task="sst2", rest="head", method="lora", lr=3e-4).with_default_lr().lr == 3e-4
    args = _parser().parse_args(["--task", "sst2"])
    assert from_args(RunConfig, args).lr is None  # left out on the command line: resolved by the recipe
