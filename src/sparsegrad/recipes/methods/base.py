"""Method: one way to fine-tune the target MLP linears, at a trainable budget shared by all methods."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sparsegrad import Bases


@dataclass
class MethodOptions:
    """What the methods are set up with; each reads the fields it needs."""

    budget: int                        # sum of k over the target layers (LoRA is matched to it)
    bases: Bases | None = None
    mode: str = "fixed"                # SparseGrad's selection
    structure: str = "scattered"       # the fixed mode's support: scattered or block
    density: float | None = None
    n_params: int | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None


class Method:
    """A new baseline is one subclass in its own file plus an entry in methods.METHODS."""

    name: str = ""
    needs_bases: bool = False

    def convert(self, model: nn.Module, layers: dict[str, nn.Module], options: MethodOptions) -> dict:
        """Convert or wrap the target layers of `model` in place; return what to report (e.g. a LoRA rank)."""
        return {}

    def train_mlp(self, module: nn.Module) -> int:
        """Let the method's part of one converted target layer train; return its trainable count."""
        raise NotImplementedError
