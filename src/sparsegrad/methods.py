"""The four fine-tuning methods at equal trainable MLP parameters, set up on one model.

- "ft":         the target MLP linears dense-trainable (regular fine-tuning);
- "lora":       peft LoRA on the same linears, rank chosen so its count matches the sparse methods';
- "meprop":     top-k of the weight gradient in the original space (k per layer);
- "sparsegrad": top-k in the HOSVD basis ("fixed" or "dynamic" mode; needs bases).

The rest of the model follows `rest`: "all" (the paper's GLUE setting: every non-MLP parameter
trains), "head" (PEFT-style: only the task head, i.e. what lies outside `model.base_model`) or
"none" (only the method's MLP part: the decoder setting, where the LM head is tied to the embeddings).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .basis import Bases
from .model import apply, layer_k, trainable_parameters
from .targets import Blocks, Targets, find_targets, in_out_features

METHODS = ("ft", "lora", "meprop", "sparsegrad")
RESTS = ("all", "head", "none")
# spellings accepted for --method / --run-type (the authors' scripts call them run types)
METHOD_ALIASES = {"regular": "ft", "full": "ft", "full_ft": "ft", "regular_ft": "ft", "sparse": "sparsegrad",
                  "sparse_grad": "sparsegrad", "sg": "sparsegrad"}


def canonical_method(name: str) -> str:
    key = name.lower().replace("-", "_")
    key = METHOD_ALIASES.get(key, key)
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return key


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

    def as_dict(self) -> dict:
        return asdict(self)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The task head: parameters outside `model.base_model` (e.g. BERT's classifier)."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ValueError(f"{type(model).__name__} has no separate base_model, so its head is unknown: use --rest all")
    inside = {id(p) for p in base.parameters()}
    return [p for p in model.parameters() if id(p) not in inside]


def lora_rank_for(budget: int, layers: dict[str, nn.Module]) -> int:
    """The LoRA rank whose r * (d_in + d_out) summed over layers is nearest to `budget` (at least 1)."""
    per_rank = sum(sum(in_out_features(m)) for m in layers.values())
    return max(1, round(budget / per_rank))


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
    density: float | None = None,
    n_params: int | None = None,
    targets: Targets = None,
    blocks: Blocks = None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
) -> MethodInfo:
    """Set `model` up for `method` in place: convert or wrap the target MLP linears and set
    every requires_grad flag. Validates everything before changing the model."""
    method = canonical_method(method)
    if rest not in RESTS:
        raise ValueError(f"rest={rest!r}: choose 'all' (every non-MLP parameter trains, as in the paper), "
                         "'head' (only the task head) or 'none' (only the MLP part of the method)")
    if method == "sparsegrad" and mode not in ("fixed", "dynamic"):
        raise ValueError(f"mode={mode!r}: SparseGrad runs in 'fixed' or 'dynamic' mode")
    if method == "sparsegrad" and bases is None:
        raise ValueError("method 'sparsegrad' needs bases (compute_bases, or --bases FILE)")
    layers = find_targets(model, targets, blocks=blocks)
    budget = sparse_budget(layers, density, n_params)
    head = head_parameters(model) if rest == "head" else None

    rank = None
    if method == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        rank = lora_rank or lora_rank_for(budget, layers)
        config = LoraConfig(r=rank, lora_alpha=lora_alpha or 2 * rank, lora_dropout=0.0,
                            target_modules=sorted(layers), bias="none")
        inject_adapter_in_model(config, model)
    elif method == "meprop":
        apply(model, None, density=density, n_params=n_params, mode="meprop", targets=sorted(layers))
    elif method == "sparsegrad":
        apply(model, bases, density=density, n_params=n_params, mode=mode, targets=sorted(layers))

    # requires_grad: the rest of the model, then the MLP part of the method
    mlp_modules = [model.get_submodule(name) for name in layers]
    mlp_params = {id(p) for m in mlp_modules for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(rest == "all" and id(p) not in mlp_params)
    for p in head or []:
        p.requires_grad_(True)
    trainable_mlp = 0
    for m in mlp_modules:
        if method == "ft":
            for p in m.parameters():
                p.requires_grad_(True)
            trainable_mlp += sum(p.numel() for p in m.parameters())
        elif method == "lora":
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.requires_grad_(True)
                    trainable_mlp += p.numel()
        else:
            m.trainable.requires_grad_(True)
            trainable_mlp += m.k

    return MethodInfo(
        method=method, mode=mode if method == "sparsegrad" else None, rest=rest, target_layers=len(layers),
        trainable=trainable_parameters(model), trainable_mlp=trainable_mlp, sparse_budget=budget,
        total=sum(p.numel() for p in model.parameters()), lora_rank=rank,
    )
