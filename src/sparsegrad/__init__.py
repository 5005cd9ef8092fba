"""sparsegrad: SparseGrad fine-tuning of transformer MLP blocks (Chekalina et al., EMNLP 2024).

    bases = sparsegrad.compute_bases(model, batches, n_steps=10)   # preliminary phase
    sparsegrad.apply(model, bases, density=0.01, mode="fixed")     # MLP linears -> SparseGradLinear
    opt = sparsegrad.optimizer(model, lr=1e-4)                      # AdamW + lazy sparse AdamW
    ...train...
    sparsegrad.merge(model)                                         # back to plain nn.Linear
"""
from .basis import Bases, GramAccumulator, compute_bases
from .layer import SparseGradLinear
from .model import apply, merge, sparse_layers, trainable_parameters
from .optim import SparseAdamW, optimizer
from .targets import DEFAULT_TARGETS, find_targets

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TARGETS",
    "Bases",
    "GramAccumulator",
    "SparseAdamW",
    "SparseGradLinear",
    "__version__",
    "apply",
    "compute_bases",
    "find_targets",
    "merge",
    "optimizer",
    "sparse_layers",
    "trainable_parameters",
]
