"""SparseGradModel: the peft tuner that puts SparseGradLayer on the MLP linears.

The bases are shared by all layers of a role and held once, in one SharedBases module that each of
them holds (as peft's VeRA shares its projections). An adapter folder holds, besides peft's
``adapter_config.json``:

    base_model.model.<layer>.sparsegrad_{rows,cols,values}     S's trained entries, per layer
    base_model.sparsegrad_basis.<role>.{U,V}[_index]           the basis rows they use, per role
                                                               (left out with embed_bases=False)
"""
from __future__ import annotations

import os

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..adapter import basis_group_of, basis_groups, basis_rows, full_basis
from ..basis import Bases, compute_bases
from ..model import layer_k
from ..shared_bases import BasesPerRole, SharedBases
from ..sparse_linear import check_plain_weight, master_dtype
from ..support import choose_support
from ..targets import DEFAULT_TARGETS, find_targets
from .config import SparseGradConfig
from .layer import ENTRY_KEYS, SparseGradLayer, sparsegrad_linears

PEFT_PREFIX = "base_model.model."  # of every adapter key in a saved adapter
BASES_PREFIX = "base_model.sparsegrad_basis."


class SparseGradModel(BaseTuner):
    """SparseGrad on the MLP linears of a model, as a peft tuner.

        bases = sparsegrad.compute_bases(model, batches, n_steps=10)
        model = get_peft_model(model, SparseGradConfig(bases=bases, density=0.01))
    """

    prefix: str = "sparsegrad_"
    tuner_layer_cls = SparseGradLayer
    target_module_mapping = DEFAULT_TARGETS

    def _prepare_adapter_config(self, config: SparseGradConfig, model_config: dict) -> SparseGradConfig:
        if any(isinstance(m, BaseTuner) for m in self.model.modules()):  # a PeftModel wrapped again
            raise ValueError("this model already holds peft adapters (a PeftModel): add a SparseGrad adapter with "
                             "model.add_adapter(name, SparseGradConfig(...)), or get_peft_model on the base model "
                             "(model.get_base_model())")
        found = find_targets(self.model, config.target_modules, blocks=config.blocks)  # clear errors first
        if config.blocks is not None:
            config.target_modules = list(found)
        elif config.target_modules is None:
            config.target_modules = DEFAULT_TARGETS[model_config["model_type"]]
        return config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        # While the adapter's layers are built: its bases (None: zeros until an adapter's saved rows
        # arrive), one SharedBases per role, device and dtype, and the zero placeholders.
        config = self.peft_config[adapter_name]
        bases = None
        if isinstance(config.bases, str) and not _is_file(config.bases):
            if not config.embed_bases:
                raise FileNotFoundError(f"the adapter refers to the bases file {config.bases}, which is missing: "
                                        "pass its path as bases=... (the file written by Bases.save)")
            # an adapter being loaded carries the basis rows it uses: the file is not needed
        else:
            bases = config.resolve_bases()
        self._building = (bases, BasesPerRole(), {})
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            del self._building

    def _create_and_replace(self, config: SparseGradConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, **kwargs) -> None:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{current_key!r} is a {type(base).__name__}: SparseGradConfig adapts nn.Linear layers "
                            "(for GPT-2's Conv1D use sparsegrad.apply)")
        check_plain_weight(base, current_key)
        k = layer_k(base.in_features, base.out_features, config.density, config.n_params)
        parts = self._layer_parts(config, current_key, base, k)
        if isinstance(target, SparseGradLayer):
            target.update_layer(adapter_name, k=k, mode=config.mode, **parts)
        else:
            layer = SparseGradLayer(target, adapter_name, k=k, mode=config.mode, **parts)
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)  # an added adapter is not trainable until set_adapter
            self._replace_module(parent, target_name, layer, target)

    def _layer_parts(self, config: SparseGradConfig, key: str, base: nn.Linear, k: int) -> dict:
        bases, roles, zeros = self._building
        device, dtype = base.weight.device, master_dtype(base.weight.dtype)
        d_in, d_out = base.in_features, base.out_features
        if bases is None:  # placeholders: zero bases, the first k entries as a support
            held = zeros.get((d_in, d_out, device, dtype))
            if held is None:
                held = zeros[d_in, d_out, device, dtype] = SharedBases(
                    torch.zeros(d_in, d_in), torch.zeros(d_out, d_out), device=device, dtype=dtype)
            flat = torch.arange(k, device=device)
            return {"bases": held, "support": (flat // d_out, flat % d_out), "placeholder": True}
        parts = {"bases": roles.get(*bases.for_layer(key), device, dtype)}
        if config.mode == "fixed":
            parts["energy"], parts["structure"] = bases.energy_for(key), config.structure
        return parts

    # ------------------------------------------------------------------ save / load (peft's hooks)
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        # keys carry the adapter name at the end; peft removes it
        out = {}
        linears = sparsegrad_linears(model, adapter_name)
        for name in linears:
            state = model.get_submodule(name).adapter_state(adapter_name)
            out |= {f"{name}.sparsegrad_{key}.{adapter_name}": t for key, t in state.items()}
        if config.embed_bases:
            groups = basis_groups({_model_key(name): layer for name, layer in linears.items()})
            for group, layers in groups.items():
                out |= {f"{BASES_PREFIX}{group}.{key}.{adapter_name}": t for key, t in basis_rows(layers).items()}
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = dict(state_dict)
        embedded: dict[str, dict[str, torch.Tensor]] = {}
        for key in [key for key in state_dict if key.startswith(BASES_PREFIX)]:
            group, _, part = key.removeprefix(BASES_PREFIX).rpartition(".")
            embedded.setdefault(group, {})[part] = state_dict.pop(key)
        # the whole bases where the config names their file (a dynamic adapter that trains on needs them)
        bases = config.resolve_bases() if not embedded or _is_file(config.bases) else None
        out, converted = {}, {}
        linears = sparsegrad_linears(model, adapter_name)
        for name, layer in linears.items():
            saved = PEFT_PREFIX + _model_key(name)
            if f"{saved}.sparsegrad_values" not in state_dict:
                continue
            out |= {f"{name}.sparsegrad_{key}.{adapter_name}": state_dict.pop(f"{saved}.sparsegrad_{key}")
                    for key in ENTRY_KEYS}
            if bases is not None:
                pair = bases.for_layer(_model_key(name))
                key = tuple(map(id, pair))
                if embedded and key not in converted:
                    _check_rows(embedded[basis_group_of(_model_key(name), embedded)], pair, layer.U.dtype,
                                config.bases)
            elif embedded:
                group = embedded[basis_group_of(_model_key(name), embedded)]
                saved_shape = (group["U"].shape[1], group["V"].shape[1])  # (d_in, d_out) the adapter was saved from
                if saved_shape != (layer.in_features, layer.out_features):
                    raise ValueError(f"the adapter's layer {_model_key(name)!r} is {saved_shape[0]}->{saved_shape[1]} "
                                     f"and this model's is {layer.in_features}->{layer.out_features}: load the "
                                     "adapter onto the base model it was trained from")
                pair = tuple(full_basis(group[side], group[f"{side}_index"], d)
                             for side, d in (("U", layer.in_features), ("V", layer.out_features)))
                key = id(group)
            else:
                raise ValueError("this SparseGrad adapter holds no basis rows and its config names no bases file: "
                                 "pass bases='<bases file>' to SparseGradConfig.from_pretrained, or save the "
                                 "adapter with embed_bases=True")
            entries = out[f"{name}.sparsegrad_values.{adapter_name}"].numel()
            if layer.mode == "fixed" and entries != layer.k:
                raise ValueError(f"the adapter holds {entries} entries in {_model_key(name)!r} and this config trains "
                                 f"k={layer.k} there: it was saved with another density, n_params or mode; use the "
                                 "same ones (a fixed support has exactly k entries)")
            if key not in converted:  # one SharedBases per role
                converted[key] = SharedBases(*pair, device=layer.U.device, dtype=layer.U.dtype)
            layer.load_trained(*layer.trained_entries(), bases=converted[key])  # S kept, in the loaded bases
            layer.placeholder = False
            layer.partial_bases = bool(embedded and bases is None)  # only the rows the entries use
        missing = [_model_key(name) for name, layer in linears.items() if layer.placeholder]
        if missing and (embedded or bases is not None):
            raise ValueError(f"the adapter holds no entries for {len(missing)} of this model's target layers "
                             f"({missing[0]!r}, ...): it was saved from a model with fewer blocks or other targets; "
                             "load it onto the base model it was trained from")
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict) | out


def _is_file(path) -> bool:
    return isinstance(path, str) and os.path.isfile(path)


def _check_rows(group: dict[str, torch.Tensor], pair: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype,
                path: str) -> None:
    """The bases file must give the very rows the adapter embeds (in the dtype the layers use)."""
    for side, basis in zip(("U", "V"), pair):
        rows = basis.index_select(0, group[f"{side}_index"].long().to(basis.device))
        if not torch.equal(rows.to(dtype).cpu(), group[side].to(dtype)):
            raise ValueError(f"{path} is not the bases file this adapter was trained with (its basis rows differ "
                             "from those the adapter embeds)")


def _model_key(name: str) -> str:
    """A module's name in the adapted model itself (what the bases and the targets name)."""
    return name.removeprefix(PEFT_PREFIX)


def fill_bases(model: nn.Module, bases: Bases, adapter_name: str = "default") -> None:
    """Give the adapter's layers their whole bases: those waiting for them also their support (fixed;
    S stays zero), those loaded with only the rows their entries use keep their entries."""
    roles = BasesPerRole()
    structure = model.peft_config[adapter_name].structure
    for name, inner in sparsegrad_linears(model, adapter_name).items():
        key = _model_key(name)
        held = roles.get(*bases.for_layer(key), inner.U.device, inner.U.dtype)
        fixed_support = inner.placeholder and inner.mode == "fixed"
        support = (choose_support(bases.energy_for(key).to(held.U.device), inner.k, structure) if fixed_support
                   else None)
        model.get_submodule(name).set_bases(adapter_name, held, support)


def compute_adapter_bases(model: nn.Module, batches, n_steps: int, adapter_name: str = "default",
                          **kwargs) -> Bases:
    """The preliminary phase on a PeftModel whose SparseGrad adapter awaits its bases (built without
    them): backpropagate `n_steps` batches through the base model (adapters disabled), then give the
    adapter's layers the bases and their support. Returns the bases (save them with ``.save``)."""
    linears = sparsegrad_linears(model, adapter_name)
    if not hasattr(model, "disable_adapter") or not linears:
        raise ValueError(f"compute_adapter_bases takes a PeftModel holding the SparseGrad adapter {adapter_name!r} "
                         "(get_peft_model(model, SparseGradConfig(...)))")
    targets = [_model_key(name) for name in linears]
    with model.disable_adapter():
        bases = compute_bases(model.get_base_model(), batches, n_steps, targets=targets, **kwargs)
    fill_bases(model, bases, adapter_name)
    return bases
