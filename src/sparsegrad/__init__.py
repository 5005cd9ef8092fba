"""sparsegrad: SparseGrad fine-tuning of transformer MLP blocks (Chekalina et al., EMNLP 2024).

    bases = sparsegrad.compute_bases(model, batches, n_steps=10)   # preliminary phase
    sparsegrad.apply(model, bases, density=0.01, mode="fixed")     # MLP linears -> SparseGradLinear
    opt = sparsegrad.optimizer(model, lr=1e-4)                      # AdamW + lazy sparse AdamW
    ...train...
    sparsegrad.merge(model)                                         # back to plain nn.Linear

Sharded over processes with FSDP2: ``sparsegrad.shard(model)`` after apply (see sharding.py).

As a peft method: ``get_peft_model(model, sparsegrad.SparseGradConfig(bases=bases))`` (the
`sparsegrad.tuner` package, which needs peft; imported on first use).

This package is the method alone (torch, safetensors, transformers). The fine-tuning recipes --
tasks, the training loop, the command line -- are `sparsegrad.recipes` (the `recipes` extra).
"""
from .adapter import load_adapter, save_adapter
from .basis import Bases, GramAccumulator, compute_bases
from .folding import fold
from .layer import DynamicSparseGradLinear, FixedSparseGradLinear, SparseGradLinear
from .meprop import MePropLinear
from .model import apply, merge, sparse_layers, sparsify_gradients, trainable_parameters
from .optim import SparseAdamW, clip_grad_norm_, optimizer
from .refresh import SupportRefresh
from .sharding import shard
from .targets import DEFAULT_TARGETS, find_targets

__version__ = "0.1.0"


def __getattr__(name: str):
    # the peft integration (sparsegrad.tuner) imports peft: only when asked for
    if name in ("SparseGradConfig", "SparseGradCallback"):
        from . import tuner

        return getattr(tuner, name)
    raise AttributeError(f"module 'sparsegrad' has no attribute {name!r}")


__all__ = [
    "DEFAULT_TARGETS",
    "Bases",
    "DynamicSparseGradLinear",
    "FixedSparseGradLinear",
    "GramAccumulator",
    "MePropLinear",
    "SparseAdamW",
    "SparseGradLinear",
    "SupportRefresh",
    "__version__",
    "apply",
    "clip_grad_norm_",
    "compute_bases",
    "find_targets",
    "fold",
    "load_adapter",
    "merge",
    "optimizer",
    "save_adapter",
    "shard",
    "sparse_layers",
    "sparsify_gradients",
    "trainable_parameters",
]
