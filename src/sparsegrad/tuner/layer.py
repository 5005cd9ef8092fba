"""SparseGradLayer: peft's tuner layer around an nn.Linear, one SparseGradLinear per adapter.

The adapters borrow the base layer's weight (no copy): SparseGrad keeps W_0 + U^T S V merged in
the weight and folds each step's change into it (layer.py). So, unlike LoRA, the layer runs one
adapter at a time, folded into the weight; the others, and all of them while disabled, are taken
out (``SparseGradLinear.unfold``). Merging is then free: the weight already holds the result.

An adapter is saved as its trained entries (rows, cols, values: ``adapter.entry_tensors``), not
as the dense parameters it trains with, and loaded back through `_load_from_state_dict` (the
tuner's state-dict hooks name the keys, see model.py).
"""
from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..adapter import entry_tensors
from ..layer import SparseGradLinear, layer_class
from ..shared_bases import SharedBases

ENTRY_KEYS = ("rows", "cols", "values")  # saved per layer as sparsegrad_<key>


class SparseGradLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("sparsegrad_layer",)

    def __init__(self, base_layer: nn.Linear, adapter_name: str, **kwargs) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.sparsegrad_layer = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self._loaded: list[str] = []  # state-dict prefixes of adapters that the last load filled
        self.register_load_state_dict_post_hook(SparseGradLayer._drop_loaded_from_missing)
        self.update_layer(adapter_name, **kwargs)

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, *, k: int, mode: str, bases: SharedBases,
                     support=None, energy: torch.Tensor | None = None, structure: str = "scattered",
                     placeholder: bool = False) -> None:
        """Add an adapter: S of `mode` with k entries in its role's `bases` (fixed: the support of that structure).
        placeholder: the bases are zeros waiting for an adapter's saved entries (or the Trainer callback)."""
        extra = {"support": support, "energy": energy, "structure": structure} if mode == "fixed" else {}
        inner = layer_class(mode).from_linear(self.base_layer, k=k, bases=bases, borrow=True, **extra)
        # dynamic: the gradient stays whole through backward (the Trainer clips it, accumulation sums it) and
        # is cut to its top-k at the optimizer step (SparseGradCallback, or the step itself: folding.py)
        inner.topk_in_backward = False
        inner.unfold()
        inner.placeholder = placeholder
        inner.partial_bases = False  # loaded with only the basis rows its entries use (see model.py)
        self.sparsegrad_layer[adapter_name] = inner
        self.set_adapter(self.active_adapters)

    def running_adapter(self) -> str | None:
        """The adapter folded into the weight: the active one, None while disabled."""
        if self.disable_adapters:
            return None
        active = [a for a in self.active_adapters if a in self.sparsegrad_layer]
        if len(active) > 1:
            raise ValueError(f"SparseGrad runs one adapter per layer at a time (it is folded into the weight), "
                             f"got {active}: set_adapter('<one name>')")
        return active[0] if active else None

    def _place(self) -> None:
        """Fold the running adapter into the weight, and take every other one out."""
        running = self.running_adapter()
        for name, inner in self.sparsegrad_layer.items():
            if name != running:
                inner.unfold()
        if running is not None:
            self.sparsegrad_layer[running].refold()

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode)
        self._place()

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        self._place()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.sparsegrad_layer:
            self.sparsegrad_layer[adapter_name].unfold()
        super().delete_adapter(adapter_name)
        self._place()

    def set_bases(self, adapter_name: str, bases: SharedBases, support=None) -> None:
        """Give an adapter its whole bases. A placeholder also gets its support (fixed) and S stays zero;
        a loaded adapter keeps its entries, and the bases must hold the very rows it was loaded with."""
        inner = self.sparsegrad_layer[adapter_name]
        if inner.placeholder:
            rows, cols = support if support is not None else inner.trained_entries()[:2]
            values = torch.zeros(rows.numel())
        else:
            rows, cols, values = inner.trained_entries()
            values = values.clone()
            for side, index in (("U", rows), ("V", cols)):
                basis, held = getattr(bases, side), getattr(inner, side)
                if not torch.equal(basis.index_select(0, index), held.index_select(0, index)):
                    raise ValueError(f"these bases are not the ones the adapter {adapter_name!r} was trained with "
                                     f"(rows of {side} differ)")
        inner.load_trained(rows, cols, values, bases=bases)
        inner.placeholder = inner.partial_bases = False

    # ------------------------------------------------------------------ merge
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """The weight already holds the running adapter: merging folds what is pending and marks it merged."""
        names = check_adapters_to_merge(self, adapter_names)
        running = self.running_adapter()
        if any(name != running for name in names):
            raise ValueError(f"SparseGrad merges the adapter it runs ({running}), not {names}: "
                             "set_adapter(name) and enable the adapters first")
        for name in names:
            inner = self.sparsegrad_layer[name]
            inner.sync()
            if safe_merge and not torch.isfinite(self.base_layer.weight).all():
                raise ValueError(f"NaNs detected in the merged weights: the adapter {name} seems to be broken")
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        self.merged_adapters.clear()  # the weight stays folded: the unmerged forward runs the same weight

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names) -> nn.Module:
        """The base layer, holding the merged weight (merge) or W_0 (unload)."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        else:
            for inner in self.sparsegrad_layer.values():
                inner.unfold()
        return self.get_base_layer()

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        running = self.running_adapter()
        if running is None or self.merged:
            return self.base_layer(x, *args, **kwargs)
        inner = self.sparsegrad_layer[running]
        if inner.placeholder:
            raise RuntimeError(
                f"the SparseGrad adapter {running!r} has no bases yet: pass bases=sparsegrad.compute_bases(...) "
                "(or a saved bases file) to SparseGradConfig, load a saved adapter with PeftModel.from_pretrained, "
                "or train with sparsegrad.tuner.SparseGradCallback")
        if (inner.mode == "dynamic" and inner.partial_bases and self.training and inner.trainable.requires_grad
                and torch.is_grad_enabled()):  # training it (in eval mode or under no_grad it only runs)
            raise RuntimeError(
                f"the adapter {running!r} was loaded with only the basis rows its entries use, and the dynamic "
                "mode chooses new entries anywhere: to go on training it, load it with bases='<bases file>' "
                "in its config, or save it with embed_bases=False; to run it, model.eval() or torch.no_grad()")
        return inner(x)

    # ------------------------------------------------------------------ save / load
    def adapter_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """What the adapter saves for this layer: {"rows", "cols", "values"}."""
        return entry_tensors(self.sparsegrad_layer[adapter_name])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        self._loaded = []
        for name, inner in self.sparsegrad_layer.items():
            keys = {key: f"{prefix}sparsegrad_{key}.{name}" for key in ENTRY_KEYS}
            if keys["values"] not in state_dict:
                continue
            if inner.placeholder:  # the tuner gives the bases first (SparseGradModel._remap_adapter_state_dict_for_load)
                error_msgs.append(f"{prefix}: the adapter {name!r} holds entries but no bases")
                continue
            inner.load_trained(*(state_dict[keys[key]] for key in ENTRY_KEYS))
            self._loaded.append(f"{prefix}sparsegrad_layer.{name}.")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @staticmethod
    def _drop_loaded_from_missing(module: SparseGradLayer, incompatible) -> None:
        # an adapter loaded from its entries filled its SparseGradLinear's state: none of it is missing
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                        if not any(k.startswith(p) for p in module._loaded)]

    def __repr__(self) -> str:
        return "sparsegrad." + super().__repr__()


def sparsegrad_linears(module: nn.Module, adapter_name: str) -> dict[str, SparseGradLinear]:
    """Module name -> the adapter's SparseGradLinear, for every SparseGradLayer in `module`."""
    return {name: m.sparsegrad_layer[adapter_name] for name, m in module.named_modules()
            if isinstance(m, SparseGradLayer) and adapter_name in m.sparsegrad_layer}
