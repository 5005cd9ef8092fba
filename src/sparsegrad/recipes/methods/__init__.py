"""The fine-tuning methods compared at equal trainable MLP parameters, set up on one model.

- "ft":         the target MLP linears dense-trainable (regular fine-tuning);       ft.py
- "lora":       peft LoRA on the same linears, rank matched to the sparse count;   lora.py
- "meprop":     top-k of the weight gradient in the original space (k per layer);  meprop.py
- "sparsegrad": top-k in the HOSVD basis ("fixed" or "dynamic" mode, the fixed support scattered or a
                block; needs bases).                                             sparsegrad_method.py

The rest of the model follows `rest`: "all" (the paper's GLUE setting: every non-MLP parameter
trains), "head" (PEFT-style: only the task head, i.e. what lies outside `model.base_model`) or
"none" (only the method's MLP part: the decoder setting, where the LM head is tied to the embeddings).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from sparsegrad import Bases, trainable_parameters
from sparsegrad.model import layer_k
from sparsegrad.sparse_linear import in_out_features
from sparsegrad.support import STRUCTURES
from sparsegrad.targets import Blocks, Targets, find_targets

from .base import Method, MethodOptions
from .ft import FullFineTuning
from .lora import LoRA, inject_lora, lora_rank_for
from .meprop import MeProp
from .sparsegrad_method import SparseGrad

METHODS: dict[str, Method] = {m.name: m for m in (FullFineTuning(), LoRA(), MeProp(), SparseGrad())}
SPARSEGRAD_MODES = ("fixed", "dynamic")
# what `compare` and the benchmarks run: a method, or SparseGrad in one mode ("sparsegrad-fixed") or with the
# fixed mode's block support ("sparsegrad-block"); each label stands for its options (split_label)
LABEL_OPTIONS: dict[str, dict] = {
    **{name: {"method": name} for name in METHODS},
    **{f"sparsegrad-{mode}": {"method": "sparsegrad", "mode": mode} for mode in SPARSEGRAD_MODES},
    "sparsegrad-block": {"method": "sparsegrad", "mode": "fixed", "structure": "block"},
}
METHOD_LABELS = tuple(LABEL_OPTIONS)
RESTS = ("all", "head", "none")
# spellings accepted for --method (the authors' scripts call them run types)
METHOD_ALIASES = {"regular": "ft", "full": "ft", "full_ft": "ft", "regular_ft": "ft", "sparse": "sparsegrad",
                  "sparse_grad": "sparsegrad", "sg": "sparsegrad"}


# The default peak learning rate per (kind of task, rest, method label), chosen by the benchmarks' fair
# protocol: classification's by the best mean held-out score over the GLUE tasks that measure something
# (bench.glue.default_lrs), chat's by the chat bench's search. docs/learning-rates.md gives the evidence;
# a test keeps these equal to what the committed records choose. What is not listed takes FALLBACK_LR.
DEFAULT_LR: dict[tuple[str, str, str], float] = {
    # the PEFT setting of classification (only the head besides the method): CoLA, MRPC, SST-2 with MiniLM
    ("classification", "head", "ft"): 1e-4,
    ("classification", "head", "lora"): 2e-3,
    ("classification", "head", "meprop"): 4e-4,
    ("classification", "head", "sparsegrad-fixed"): 2e-3,
    ("classification", "head", "sparsegrad-dynamic"): 5e-4,
    ("classification", "head", "sparsegrad-block"): 2e-3,
    # the paper's setting (every non-MLP parameter trains too): the dense rest (15.6M in MiniLM) sets the
    # step, and every method chose full fine-tuning's
    **{("classification", "all", label): 1e-4 for label in METHOD_LABELS},
    # instruction tuning (only the MLP part trains): SmolLM2-135M on oasst1, the paper's Table 6 setting
    ("causal_lm", "none", "ft"): 9e-4,
    ("causal_lm", "none", "lora"): 3.6e-3,
    ("causal_lm", "none", "meprop"): 3.6e-3,
    ("causal_lm", "none", "sparsegrad-fixed"): 3.6e-3,
    ("causal_lm", "none", "sparsegrad-dynamic"): 3.6e-3,
    ("causal_lm", "none", "sparsegrad-block"): 3.6e-3,
}
FALLBACK_LR = 1e-4


def default_lr(kind: str, rest: str, method: str, mode: str | None, structure: str = "scattered") -> float:
    """The default lr of a method (mode, structure: SparseGrad's) on a kind of task ("classification", "causal_lm")."""
    return DEFAULT_LR.get((kind, rest, method_label(method, mode, structure)), FALLBACK_LR)


def canonical_method(name: str) -> str:
    key = name.lower().replace("-", "_")
    key = METHOD_ALIASES.get(key, key)
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return key


def split_label(label: str) -> dict:
    """The run options a label stands for: 'sparsegrad-block' -> {'method': 'sparsegrad', 'mode': 'fixed',
    'structure': 'block'}; 'lora' -> {'method': 'lora'}."""
    if label not in LABEL_OPTIONS:
        raise ValueError(f"unknown method {label!r}: choose from {', '.join(METHOD_LABELS)}")
    return dict(LABEL_OPTIONS[label])


def method_label(method: str, mode: str | None = None, structure: str = "scattered") -> str:
    """The label of a run's options (mode and structure count for SparseGrad only)."""
    if method != "sparsegrad" or mode is None:
        return method
    return "sparsegrad-block" if (mode, structure) == ("fixed", "block") else f"sparsegrad-{mode}"


@dataclass
class MethodInfo:
    """What `prepare` did: counts are trainable entries (k for sparse layers)."""

    method: str
    mode: str | None
    rest: str
    target_layers: int
    trainable: int          # every trainable entry
    trainable_mlp: int      # the MLP part: k's, LoRA factors or dense weights
    sparse_budget: int      # sum of k over layers at the requested density (what LoRA is matched to)
    total: int              # parameters of the model (frozen included; LoRA factors included)
    lora_rank: int | None = None
    structure: str | None = None  # the fixed mode's support: "scattered" or "block"

    def as_dict(self) -> dict:
        return asdict(self)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The task head: parameters outside `model.base_model` (e.g. BERT's classifier)."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ValueError(f"{type(model).__name__} has no separate base_model, so its head is unknown: use --rest all")
    inside = {id(p) for p in base.parameters()}
    return [p for p in model.parameters() if id(p) not in inside]


def sparse_budget(layers: dict[str, nn.Module], density: float | None, n_params: int | None) -> int:
    """Sum of k over `layers`; a ValueError naming the layer where density/n_params is impossible."""
    budget = 0
    for name, m in layers.items():
        try:
            budget += layer_k(*in_out_features(m), density, n_params)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None
    return budget


def prepare(
    model: nn.Module,
    method: str,
    *,
    rest: str = "all",
    bases: Bases | None = None,
    mode: str = "fixed",
    structure: str = "scattered",
    density: float | None = None,
    n_params: int | None = None,
    targets: Targets = None,
    blocks: Blocks = None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
) -> MethodInfo:
    """Set `model` up for `method` in place: convert or wrap the target MLP linears and set
    every requires_grad flag. Validates everything before changing the model."""
    chosen = METHODS[canonical_method(method)]
    if rest not in RESTS:
        raise ValueError(f"rest={rest!r}: choose 'all' (every non-MLP parameter trains, as in the paper), "
                         "'head' (only the task head) or 'none' (only the MLP part of the method)")
    if chosen.needs_bases and mode not in SPARSEGRAD_MODES:
        raise ValueError(f"mode={mode!r}: SparseGrad runs in 'fixed' or 'dynamic' mode")
    if structure not in STRUCTURES:
        raise ValueError(f"structure={structure!r} is not one of {STRUCTURES}")
    if structure != "scattered" and (chosen.name, mode) != ("sparsegrad", "fixed"):
        raise ValueError(f"structure={structure!r} shapes the support of SparseGrad's fixed mode: it belongs to "
                         "method 'sparsegrad' with mode 'fixed'")
    if chosen.needs_bases and bases is None:
        raise ValueError("method 'sparsegrad' needs bases (compute_bases, or --bases FILE)")
    layers = find_targets(model, targets, blocks=blocks)
    options = MethodOptions(budget=sparse_budget(layers, density, n_params), bases=bases, mode=mode,
                            structure=structure, density=density, n_params=n_params, lora_rank=lora_rank, lora_alpha=lora_alpha)
    head = head_parameters(model) if rest == "head" else []
    reported = chosen.convert(model, layers, options)

    # requires_grad: the rest of the model, then the MLP part of the method
    mlp_modules = [model.get_submodule(name) for name in layers]
    mlp_params = {id(p) for m in mlp_modules for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(rest == "all" and id(p) not in mlp_params)
    for p in head:
        p.requires_grad_(True)
    trainable_mlp = sum(chosen.train_mlp(m) for m in mlp_modules)

    return MethodInfo(
        method=chosen.name, mode=mode if chosen.needs_bases else None,
        structure=structure if chosen.needs_bases and mode == "fixed" else None, rest=rest, target_layers=len(layers),
        trainable=trainable_parameters(model), trainable_mlp=trainable_mlp, sparse_budget=options.budget,
        total=sum(p.numel() for p in model.parameters()), lora_rank=reported.get("lora_rank"),
    )


__all__ = ["METHODS", "METHOD_ALIASES", "METHOD_LABELS", "RESTS", "Method", "MethodInfo", "MethodOptions",
           "canonical_method", "head_parameters", "inject_lora", "lora_rank_for", "method_label", "prepare",
           "sparse_budget", "split_label"]
