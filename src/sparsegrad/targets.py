"""Which modules SparseGrad replaces: the MLP linears of each architecture.

Targets follow PEFT's convention: a list of names matches every module whose
name ends with one of them (``"intermediate.dense"``), a single string is a
regular expression that must match the whole module name.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .sparse_linear import SparseLinear, check_plain_weight, is_linear_like

# Regular expressions over full module names, per `config.model_type`.
_BERT_LIKE = r".*\.(intermediate\.dense|(?<!attention\.)output\.dense)"
_LLAMA_LIKE = r".*\.mlp\.(gate_proj|up_proj|down_proj)"
DEFAULT_TARGETS: dict[str, str] = {
    **{t: _BERT_LIKE for t in ("bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet")},
    "distilbert": r".*\.ffn\.(lin1|lin2)",
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text",
                                "olmo", "olmo2")},
    "gpt2": r".*\.mlp\.(c_fc|c_proj)",
    "opt": r".*\.layers\.\d+\.(fc1|fc2)",
    **{t: r".*\.mlp\.(dense_h_to_4h|dense_4h_to_h)" for t in ("gpt_neox", "falcon")},
    "phi3": r".*\.mlp\.(gate_up_proj|down_proj)",  # gate and up fused in one linear: one role, its own bases
}

Targets = str | Iterable[str] | None
Blocks = str | Iterable[int] | None


def block_index(name: str) -> int | None:
    """The block a module belongs to: the first integer component of its name ('model.layers.7.mlp.up_proj' -> 7)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def parse_blocks(blocks: Blocks) -> tuple[str, object]:
    """Normalise a block selection: None / "all", a list of indices ("0,3,6" or [0, 3, 6]),
    or every n-th block ("every:3" = blocks 0, 3, 6, ...; "every:3:2" starts at block 2)."""
    if blocks is None or (isinstance(blocks, str) and blocks.strip().lower() in ("", "all")):
        return "all", None
    if isinstance(blocks, str):
        spec = blocks.strip().lower()
        if spec.startswith("every:"):
            parts = spec.split(":")[1:]
            try:
                n, start = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
            except (ValueError, IndexError):
                raise ValueError(f"blocks={blocks!r}: write every n-th block as 'every:N' or 'every:N:START'") from None
            if n < 1 or start < 0 or len(parts) > 2:
                raise ValueError(f"blocks={blocks!r}: 'every:N[:START]' needs N >= 1 and START >= 0")
            return "every", (n, start)
        try:
            blocks = [int(b) for b in spec.replace(" ", "").split(",") if b]
        except ValueError:
            raise ValueError(f"blocks={blocks!r}: give 'all', a list of block indices such as '0,3,6', "
                             "or 'every:3'") from None
    chosen = sorted({int(b) for b in blocks})
    if not chosen or chosen[0] < 0:
        raise ValueError(f"blocks={blocks!r}: block indices must be non-negative and at least one is needed")
    return "list", chosen


def select_blocks(layers: dict[str, nn.Module], blocks: Blocks) -> dict[str, nn.Module]:
    """The layers of `layers` that lie in the chosen blocks (see parse_blocks)."""
    kind, arg = parse_blocks(blocks)
    if kind == "all":
        return layers
    present = sorted({b for b in map(block_index, layers) if b is not None})
    if kind == "every":
        n, start = arg
        wanted = {b for b in present if b >= start and (b - start) % n == 0}
    else:
        missing = [b for b in arg if b not in present]
        if missing:
            raise ValueError(f"blocks {missing} do not exist: the targets lie in blocks {present[0]}..{present[-1]}")
        wanted = set(arg)
    chosen = {name: m for name, m in layers.items() if block_index(name) in wanted}
    if not chosen:
        raise ValueError(f"blocks={blocks!r} selects none of the target blocks {present}")
    return chosen


def _matcher(targets: Targets, model: nn.Module):
    if targets is None:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if (getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0) > 1:
            raise ValueError(
                f"model_type={model_type!r} is a mixture-of-experts model: its experts are not nn.Linear modules "
                "(transformers holds each block's experts as one 3-D parameter), and SparseGrad trains linear "
                "layers; name other layers to train with targets=[...], or fine-tune a dense model"
            )
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"sparsegrad has no default MLP targets for model_type={model_type!r}; name the MLP linear "
                f"layers: targets=[...] (SparseGradConfig: target_modules=[...]; the command line: --targets) "
                f"(known types: {', '.join(sorted(DEFAULT_TARGETS))})"
            )
        targets = DEFAULT_TARGETS[model_type]
    if isinstance(targets, str):
        pattern = re.compile(targets)
        return targets, lambda name: pattern.fullmatch(name) is not None
    suffixes = list(targets)
    if not suffixes:
        raise ValueError("targets is empty: name at least one MLP linear layer, e.g. ['intermediate.dense']")
    return suffixes, lambda name: any(name == s or name.endswith("." + s) for s in suffixes)


def find_targets(model: nn.Module, targets: Targets = None, *, blocks: Blocks = None) -> dict[str, nn.Module]:
    """Module name -> linear module for every target of `model` in the chosen `blocks`, in model order.

    The paper's LLaMA setting, "up and down projections of every third block", is
    ``targets=["up_proj", "down_proj"], blocks="every:3"``.
    Layers already converted (SparseLinear) are left out. Raises ValueError naming the targets
    when nothing matches, or when a match is not a linear layer.
    """
    spec, matches = _matcher(targets, model)
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or not matches(name):
            continue
        if isinstance(module, SparseLinear):
            continue
        module = getattr(module, "base_layer", module)  # a peft tuner layer: the linear it wraps
        if not is_linear_like(module):
            raise ValueError(
                f"target {name!r} is a {type(module).__name__}, not a linear layer; "
                f"narrow targets={spec!r} to the MLP linear layers"
            )
        check_plain_weight(module, name)
        found[name] = module
    if not found:
        linear_names = [n for n, m in model.named_modules() if is_linear_like(m)][:6]
        raise ValueError(
            f"targets={spec!r} match no linear layer of this {type(model).__name__}; "
            f"pass targets naming its MLP linears (its linear layers look like: {linear_names})"
        )
    return select_blocks(found, blocks)


def role_of(name: str) -> str:
    """The layer's role, shared across blocks: block indices replaced by '*'.

    'bert.encoder.layer.3.intermediate.dense' -> 'bert.encoder.layer.*.intermediate.dense'
    """
    return re.sub(r"\.\d+\.", ".*.", name)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
