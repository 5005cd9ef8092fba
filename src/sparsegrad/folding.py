"""When S is folded into the weight: once after each optimizer step, from one place.

A SparseGrad layer keeps W_0 + U^T S V merged in `weight`, so its forward pass is nn.Linear's. An
optimizer step changes S; the change must reach `weight` before the next forward. It is folded right
after the step, by a hook that torch calls after the step of every optimizer
(`torch.optim.optimizer.register_optimizer_step_post_hook`): sparsegrad.optimizer, torch's own, the
Trainer's, accelerate's -- each layer whose S the optimizer holds, and which had a gradient, folds.
Forward reads nothing to decide whether to fold, so a step never waits for the device and a compiled
forward holds no check.

Writes to S outside an optimizer step (loading, `layer.set_trained`, a user's own in-place edits)
fold through `set_trained`, `load_state_dict`, or `fold(model)`; `state_dict()` and merging fold
what is pending too, so what is saved is always current.
"""
from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

_LAYERS: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()
_SERIAL = itertools.count()
_HOOK = None


def register(layer: nn.Module) -> None:
    """Fold `layer` after every optimizer step that updates its S (called by the layer's constructor).
    Layers fold in the order they were built: the same on every rank, as the sharded fold's collectives need."""
    global _HOOK
    _LAYERS[next(_SERIAL)] = layer
    if _HOOK is None:
        _HOOK = register_optimizer_step_post_hook(_after_step)


def _after_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if not _LAYERS:  # every SparseGrad layer is gone: nothing to fold
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for _, layer in sorted(_LAYERS.items()):
        trained = layer.trainable
        if id(trained) in held and trained.grad is not None:  # a parameter without a gradient did not move
            layer.fold_step()


@torch.no_grad()
def fold(model: nn.Module) -> None:
    """Fold every change of S not yet in the weights of `model`'s SparseGrad layers (after writing S
    in place yourself). Collective when the model is sharded: every rank calls it."""
    from .layer import SparseGradLinear

    for layer in model.modules():
        if isinstance(layer, SparseGradLinear):
            layer.sync()
