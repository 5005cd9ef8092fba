"""The run configuration, written once: a dataclass whose fields carry their help text, from which
the command line is built (`add_arguments` / `from_args`) and which results.json records.

    cfg = RunConfig(task="sst2", data_dir="glue/", method="lora", lr=5e-4)
    finetune(cfg, "runs/sst2-lora")
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field

from sparsegrad.support import STRUCTURES

from .kinds import kind_of
from .methods import RESTS, SPARSEGRAD_MODES, canonical_method, default_lr
from .tasks import get_task


def option(default, help: str, *, flag: str | None = None, choices=None, aliases: tuple[str, ...] = ()):
    """A config field with its command-line help (flag: the option's name when it is not --field-name)."""
    meta = {"help": help, "flag": flag, "choices": choices, "aliases": aliases}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """Everything that defines one run (saved in results.json; a resumed run must match it)."""

    # task and data
    task: str = option("bbcnews", "cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli, bbcnews (embedded default), "
                                  "or chat (instruction tuning of a decoder)")
    data_dir: str | None = option(None, "GLUE folder: DIR/<TASK>/{train,dev}.tsv, or a datasets save_to_disk "
                                        "folder; chat: a JSONL file of {\"messages\": [...]} (split by conversation "
                                        "tree), a folder with train.jsonl + validation.jsonl, or a datasets folder")
    max_train_samples: int | None = option(None, "a fixed random subset of the training set")
    max_eval_samples: int | None = option(None, "a fixed random subset of each evaluation split")
    heldout: float | None = option(None, "hold out this share (< 1) or number of training examples as the split "
                                         "that selects the best model and stops early; the task's own evaluation "
                                         "splits are then only reported (an lr search that never sees dev)")
    max_length: int = option(128, "truncation length in tokens")
    # model and method
    model: str | None = option(None, "local model folder or hub name (default: the embedded all-MiniLM-L6-v2; "
                                     "chat: the embedded SmolLM2-135M-Instruct)")
    method: str = option("sparsegrad", "ft, lora, meprop or sparsegrad (also accepted: regular, full_ft, sparse, sg)",
                         aliases=("--run-type",))
    mode: str = option("fixed", "SparseGrad mode", choices=SPARSEGRAD_MODES)
    structure: str = option("scattered", "the fixed mode's support: scattered (the top-k entries; the paper's) or "
                                         "block (r rows x c columns of S: a cheaper gradient and fold)",
                            choices=STRUCTURES)
    density: float | None = option(None, "share of each MLP weight that trains (default 0.01)")
    n_params: int | None = option(None, "entries that train per MLP layer (instead of --density)")
    rest: str | None = option(None, "'all': every non-MLP parameter trains too (the paper's GLUE; default); "
                                    "'head': only the task head; 'none': only the MLP part (default for chat)",
                              choices=RESTS)
    targets: list[str] | None = option(None, "MLP module names or suffixes (default: per architecture), "  # noqa: RUF009
                                             "e.g. up_proj down_proj")
    blocks: str | None = option(None, "which blocks: all (default), a list '0,3,6', or 'every:3' (every third, "
                                      "from block 0; 'every:3:1' from block 1)")
    lora_rank: int | None = option(None, "LoRA rank (default: matched to the sparse trainable count)")
    bases_steps: int = option(11, "preliminary-phase batches (BERT-base: 11 x 12 blocks = 132 slices)")
    bases_warmup_steps: int = option(0, "SparseGrad: train the task head alone for N steps before the preliminary "
                                        "phase, so that the bases and the fixed support see the gradients of a head "
                                        "that has begun to learn")
    refresh_steps: int | None = option(None, "SparseGrad fixed: re-choose the support every N steps from the "
                                             "gradient energy of the steps just before (the bases are kept)")
    # training
    epochs: int | None = option(None, "default: the task's (GLUE 20 as in the paper, bbcnews 2, chat 1)")
    max_steps: int | None = option(None, "stop after this many optimizer steps")
    batch_size: int = option(16, "examples per process and micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float | None = option(None, "peak learning rate (linear warm-up and decay); default: the method's, per "
                                    "kind of task and --rest (docs/learning-rates.md)")
    weight_decay: float = option(0.01, "AdamW weight decay (none on biases and norms)")
    warmup_ratio: float = option(0.06, "share of the steps spent warming the learning rate up")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: off)")
    patience: int = option(3, "early stopping: evaluations without improvement (0: off)")
    eval_steps: int | None = option(None, "evaluate every N steps (default: each epoch)")
    save_steps: int | None = option(None, "also checkpoint every N steps (default: at each evaluation)")
    eval_batch_size: int = option(64, "examples per evaluation batch")
    seed: int = option(0, "the run's seed (the command line takes several with --seeds)", flag="")
    mixed_precision: str = option("no", "autocast precision", choices=("no", "bf16", "fp16"))
    dtype: str = option("float32", "the model's weights: bfloat16 / float16 halve their memory (SparseGrad folds "
                        "its updates into them exactly; see docs/api.md, 'Precision and memory')",
                        choices=("float32", "bfloat16", "float16"))
    gradient_checkpointing: bool = option(False, "recompute activations in backward: less memory, the same run")
    compile: bool = option(False, "torch.compile the training forward and backward (one graph with fixed "
                                  "SparseGrad, LoRA or full FT; the top-k methods' backward stays eager)")
    cpu: bool = option(False, "train on the CPU even where CUDA is available")
    fsdp: bool = option(False, "shard the model over the processes (torchrun / accelerate launch) with FSDP2: each "
                               "block's weights, gradients and optimizer state are split N ways (default: DDP, a "
                               "whole model per process)")
    # chat
    prompts: str | None = option(None, "a JSONL prompt file (strings, {prompt}, {messages} or MT-Bench {turns}); "
                                       "the best model's answers go to generations.jsonl")
    max_prompts: int | None = option(None, "answer only the first N prompts")
    max_new_tokens: int = option(128, "answer length limit")

    def __post_init__(self) -> None:
        self.method = canonical_method(self.method)
        if self.rest is None:
            self.rest = kind_of(get_task(self.task)).default_rest

    def with_default_lr(self) -> RunConfig:
        """This configuration with its lr set: the one given, or the method's default."""
        if self.lr is not None:
            return self
        task = get_task(self.task)
        return dataclasses.replace(self, lr=default_lr(task.kind, self.rest, self.method, self.mode, self.structure))

    def identity(self) -> dict:
        """The fields that must match for a folder to hold 'the same run' (compiling changes how it runs, not
        what it computes: a run may be resumed with or without it)."""
        return {k: v for k, v in asdict(self).items() if k != "compile"}

    def changed(self) -> dict:
        """The fields that differ from the defaults: what a table says a run was given."""
        defaults = RunConfig(task=self.task).identity()
        return {k: v for k, v in self.identity().items() if v != defaults[k]}


@dataclass
class CommandOptions:
    """What a command adds around its runs (not part of any one run's identity)."""

    seeds: list[int] = option([0], "one run per seed")  # noqa: RUF009 (a default_factory)
    optimize: int = option(0, "first run N Optuna trials over lr and batch size, then the seeds with the best")
    bases: str | None = option(None, "reuse bases saved by an earlier run (a bases.safetensors file)")
    output_dir: str | None = option(None, "where results go (default: sparsegrad-runs/<task>-<method>-<time>)")
    resume: bool = option(False, "continue the command in --output-dir (kill -9 included)")
    no_progress: bool = option(False, "no progress bars")


# ---------------------------------------------------------------- the command line, from the dataclasses

def _base_type(tp):
    """(scalar type, is a list) of a field's annotation: `int | None` -> (int, False), `list[str] | None` -> (str, True)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if isinstance(tp, types.UnionType) else [tp]
    tp = args[0]
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def add_arguments(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = (), defaults: dict | None = None,
                  group: str | None = None, help: dict[str, str] | None = None) -> None:
    """One option per field of the dataclass `cls` (--field-name), its help and default from the field
    (`defaults`, `help`: others for some fields, for a command where they mean something else)."""
    hints = typing.get_type_hints(cls)
    target = parser.add_argument_group(group) if group else parser
    defaults, help = defaults or {}, help or {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in skip or meta.get("flag") == "":
            continue
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        tp, is_list = _base_type(hints[f.name])
        flags = [meta.get("flag") or "--" + f.name.replace("_", "-"), *meta.get("aliases", ())]
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        help_text = help.get(f.name) or meta.get("help", "") + (f" (default {shown})" if default not in (None, False, [])
                                                                  else "")
        if tp is bool:
            target.add_argument(*flags, dest=f.name, action="store_true", help=help_text)
        else:
            target.add_argument(*flags, dest=f.name, type=tp, nargs="+" if is_list else None, default=default,
                                choices=meta.get("choices"), help=help_text)


def from_args(cls, args: argparse.Namespace, **overrides):
    """An instance of the dataclass `cls` from the parsed options (fields absent from `args` keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})
