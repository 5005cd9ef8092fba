"""The support refresh: a `fixed` SparseGrad model re-chooses its supports every few steps.

The fixed support is chosen once, from the preliminary phase's gradients -- taken while a task head
is still random. A refresh re-chooses it from the energy of the gradients of the last `window` steps
before it, in the same bases (which are kept): the support follows where the gradient now is, at the
cost of forming the dense transformed gradient U G V^T during those steps.

    refresh = SupportRefresh(model, optimizer, every=50)
    for step in ...:
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        refresh.step()            # after each optimizer step

S does not change at a refresh (entries that leave the support keep their values, frozen, in the
weight and the adapter). The optimizer's state is carried: an entry that stays keeps its Adam
moments, one that joins starts from zero moments. With several data-parallel processes the energy is
summed over them before the choice, so every rank takes the same support. The energy is not saved in
checkpoints: a run resumed inside a window chooses from the steps since the resume.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .layer import FixedSparseGradLinear
from .sparse_linear import LOW_PRECISION
from .support import choose_support


class SupportRefresh:
    """Every `every` optimizer steps, the supports of the model's fixed layers are re-chosen from the
    gradient energy of the `window` steps before (see the module's docstring). Call `step()` after
    each optimizer step; `steps` counts them (set it when a training loop resumes)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, every: int, window: int = 4,
                 steps: int = 0) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, FixedSparseGradLinear)]
        if not self.layers:
            raise ValueError("the model has no fixed SparseGrad layer: a support refresh needs sparsegrad.apply(..., "
                             "mode='fixed')")
        if every < 1 or not 1 <= window <= every:
            raise ValueError(f"every={every}, window={window}: refresh every N >= 1 steps from a window of 1 to N steps")
        self.optimizer, self.every, self.window, self.steps = optimizer, every, window, steps
        self.refreshes = 0
        self._arm()

    def _arm(self) -> None:
        """Record energy through the steps of the window that comes next (the one that ends at a refresh)."""
        if (self.steps + self.window) // self.every > self.steps // self.every:
            for layer in self.layers:
                if layer.energy is None:
                    layer.record_energy()

    def step(self) -> bool:
        """After an optimizer step: refresh when this step ends a period; True when it did."""
        self.steps += 1
        refreshed = self.steps % self.every == 0
        if refreshed:
            for layer in self.layers:
                if dist.is_initialized() and dist.get_world_size() > 1:  # data parallel: every rank the same support
                    dist.all_reduce(layer.energy)
                carry_state(self.optimizer, layer.trainable, refresh_support(layer))
            self.refreshes += 1
        self._arm()
        return refreshed


@torch.no_grad()
def refresh_support(layer: FixedSparseGradLinear) -> torch.Tensor:
    """Make the k entries of largest recorded energy the layer's support (the bases are kept), and stop recording.

    S itself does not change, so neither does the weight: an entry that stays keeps its value, one that leaves
    keeps its value in the frozen part (folded, saved in the adapter, no longer trained), one that joins starts
    from its frozen value or zero. Returns, per new support position, the old position of the entry there or -1:
    what an optimizer's state is carried by (carry_state)."""
    if layer.energy is None:
        raise RuntimeError("refresh_support chooses from the recorded gradient energy: call layer.record_energy() "
                           "and run some backward passes first")
    if layer.sharded or layer.weight.dtype in LOW_PRECISION:
        raise NotImplementedError("the support refresh runs on float32 / float64 weights, unsharded")
    layer.sync()
    d_out = layer.out_features
    old_key = layer.rows.long() * d_out + layer.cols.long()  # (k,) in the values' order
    rows, cols, values = layer.trained_entries()  # the whole S: support, then frozen entries
    all_key, by_key = torch.sort(rows * d_out + cols)
    all_values = values[by_key]
    new_rows, new_cols = choose_support(layer.energy, layer.k, layer.structure)
    new_key = new_rows * d_out + new_cols
    frozen = ~torch.isin(all_key, new_key)
    layer.set_support(new_rows, new_cols, _lookup(all_key, all_values, new_key, 0.0),
                      frozen=(all_key[frozen] // d_out, all_key[frozen] % d_out, all_values[frozen]))
    layer.record_energy(False)
    order = torch.argsort(old_key)
    return _lookup(old_key[order], order, layer.rows.long() * d_out + layer.cols.long(), -1)


def _lookup(sorted_keys: torch.Tensor, values: torch.Tensor, keys: torch.Tensor, missing: float) -> torch.Tensor:
    """values[i] where sorted_keys[i] == key, for each key; `missing` where no key matches."""
    pos = torch.searchsorted(sorted_keys, keys).clamp_(max=max(sorted_keys.numel() - 1, 0))
    found = sorted_keys[pos] == keys if sorted_keys.numel() else torch.zeros_like(keys, dtype=torch.bool)
    out = torch.full(keys.shape, missing, dtype=values.dtype, device=values.device)
    out[found] = values[pos[found]]
    return out


@torch.no_grad()
def carry_state(optimizer: torch.optim.Optimizer, param: nn.Parameter, old_position: torch.Tensor) -> None:
    """Move the per-entry state of `param` (Adam's moments) to the entries' new positions; zero where
    old_position is -1. Scalars (the step count) stay."""
    state = optimizer.state.get(param)
    if not state:
        return
    kept = old_position >= 0
    for key, t in state.items():
        if torch.is_tensor(t) and t.shape == param.shape:
            moved = torch.zeros_like(t)
            moved[kept] = t[old_position[kept]]
            state[key] = moved
