"""SparseGradCallback: SparseGrad inside a Hugging Face Trainer (or TRL's SFTTrainer).

Works on a peft model (``get_peft_model(model, SparseGradConfig(...))``) and on one converted by
``sparsegrad.apply`` (then only the top-k timing below applies: the bases are already there).

    model = get_peft_model(model, SparseGradConfig(density=0.01))      # no bases yet
    trainer = Trainer(model, args, train_dataset=..., callbacks=[SparseGradCallback(n_steps=10)])
    trainer.train()

Before the first step the callback runs the preliminary phase on the Trainer's own dataloader
(the base model, adapters disabled) and gives the adapter its bases and support; the trained
parameters stay the same objects, so the optimizer the Trainer already built trains them.

`dynamic` takes its top-k of the complete gradient (summed over gradient accumulation and, in
data parallelism, reduced over processes): the layers keep the dense transformed gradient and the
callback cuts it to the top-k just before the optimizer step (after the Trainer's clipping, which
so sees the complete gradient). The sparse gradient then needs a sparse-aware optimizer:
``Trainer(..., optimizers=(sparsegrad.optimizer(model, lr), None))``.
"""
from __future__ import annotations

import torch
from transformers import TrainerCallback

from ..basis import Bases
from ..layer import DynamicSparseGradLinear
from ..model import defer_topk, sparse_layers, sparsify_gradients
from .layer import SparseGradLayer
from .model import compute_adapter_bases, fill_bases


class SparseGradCallback(TrainerCallback):
    """Preliminary phase from the Trainer's dataloader; dynamic's top-k before each optimizer step.

    Args:
        n_steps: batches backpropagated in the preliminary phase (the paper's n_steps).
        adapter_name: the SparseGrad adapter to prepare.
        bases_file: save the bases there (``Bases.save``) and name the file in the adapter's config;
            on a resume, give the adapter the whole bases from it (`dynamic` needs them to train on).
        bases_kwargs: passed on to ``sparsegrad.compute_bases`` (group_by, eigh_dtype, ...).
    """

    def __init__(self, n_steps: int = 10, adapter_name: str = "default", bases_file: str | None = None,
                 **bases_kwargs) -> None:
        self.n_steps, self.adapter_name, self.bases_file = n_steps, adapter_name, bases_file
        self.bases_kwargs = {"progress": False} | bases_kwargs

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, optimizer=None, **kwargs):
        layers = [m.sparsegrad_layer[self.adapter_name] for m in model.modules() if isinstance(m, SparseGradLayer)]
        if not layers and not sparse_layers(model):
            raise ValueError("SparseGradCallback: the Trainer's model holds no SparseGrad layer: wrap it with "
                             "get_peft_model(model, SparseGradConfig(...)) (or sparsegrad.apply) first")
        dynamic = [m for m in model.modules() if isinstance(m, DynamicSparseGradLinear) and m.trainable.requires_grad]
        if optimizer is not None and any(not _takes_sparse_gradients(optimizer, m.trainable) for m in dynamic):
            raise ValueError("the dynamic mode's gradients are sparse and the Trainer's optimizer takes dense ones: "
                             f"pass Trainer(..., optimizers=(sparsegrad.optimizer(model, lr={args.learning_rate:g}), "
                             "None))")
        if any(inner.placeholder for inner in layers):  # a fresh adapter: the preliminary phase
            bases = compute_adapter_bases(model, train_dataloader, self.n_steps, self.adapter_name,
                                          **self.bases_kwargs)
            if self.bases_file is not None:
                bases.save(self.bases_file)
        elif self.bases_file is not None and any(inner.partial_bases for inner in layers):
            # resumed from a checkpoint that embeds only the rows its entries use: `dynamic` needs them whole
            fill_bases(model, Bases.load(self.bases_file), self.adapter_name)
        if self.bases_file is not None:  # checkpoints name the file
            model.peft_config[self.adapter_name].bases = str(self.bases_file)
        defer_topk(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        sparsify_gradients(model)  # dynamic: the top-k of the complete gradient; fixed: nothing to cut


def _takes_sparse_gradients(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> bool:
    """Does `optimizer` update `param` lazily from a sparse gradient (a lazy group of sparsegrad.optimizer,
    torch's SparseAdam)?"""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the optimizer
    if isinstance(inner, torch.optim.SparseAdam):
        return True
    return any(group.get("lazy") and any(p is param for p in group["params"]) for group in inner.param_groups)
