"""Adapters: save only what training changed, and put it back onto a fresh base model.

A folder holding
    adapter_config.json         format, base model, and per layer: mode (and the fixed support's structure),
                                shapes, k, role
    adapter_model.safetensors   per SparseGrad layer its trained entries of S (d_in, d_out) as
                                (rows, cols, values) with int16 indices where they fit, the rows of U
                                and V they need (once per role),
                                or nothing of the bases when they are stored by reference; every other
                                trained parameter whole (a task head, LayerNorms, LoRA factors, ...)

Loading adds  dW^T = U[rows]^T S V[cols]  to each layer's weight: the model stays a plain Hugging Face
model, with the outputs of the trained one (to float rounding: training folds its updates step by
step, loading folds their sum once).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor

from .layer import SparseGradLinear
from .model import sparse_layers
from .sharding import is_sharded
from .sparse_linear import in_out_features, is_linear_like, linear_weight
from .targets import role_of
from .util import atomic_path, file_sha256

FORMAT = "sparsegrad-adapter"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def _index_dtype(*dims: int) -> torch.dtype:
    """int16 indices where every dimension fits (up to 32,767: MLPs of models to ~7B), int32 otherwise."""
    return torch.int16 if max(dims) <= torch.iinfo(torch.int16).max else torch.int32


def entry_tensors(layer: SparseGradLinear) -> dict[str, torch.Tensor]:
    """S's trained entries as an adapter stores them: rows, cols (int16 where they fit) and values."""
    rows, cols, values = layer.trained_entries()
    index = _index_dtype(layer.in_features, layer.out_features)
    return {"rows": rows.to(index).cpu(), "cols": cols.to(index).cpu(), "values": values.cpu()}


def basis_rows(layers: list[SparseGradLinear]) -> dict[str, torch.Tensor]:
    """The rows of U and V that the entries of `layers` (one role: the same bases) use, with their
    indices: {"U", "U_index", "V", "V_index"}. What an adapter with its bases embedded holds."""
    out = {}
    used = [layer.trained_entries()[:2] for layer in layers]  # (rows, cols) of each layer
    for i, side in enumerate(("U", "V")):
        basis = getattr(layers[0], side)
        idx = torch.unique(torch.cat([u[i].to(basis.device) for u in used]))  # sorted
        out[side] = basis.index_select(0, idx).cpu()
        out[f"{side}_index"] = idx.to(_index_dtype(*basis.shape)).cpu()
    return out


def basis_groups(layers: dict[str, SparseGradLinear]) -> dict[str, list[SparseGradLinear]]:
    """The layers grouped by the bases they hold, each group named by its role when the role's
    layers share one pair (the paper's grouping), else by the layer's own name."""
    pairs_of_role: dict[str, set] = {}  # role -> the SharedBases its layers hold
    for name, layer in layers.items():
        pairs_of_role.setdefault(role_of(name), set()).add(layer.bases)
    groups: dict[str, list[SparseGradLinear]] = {}
    for name, layer in layers.items():
        role = role_of(name)
        groups.setdefault(role if len(pairs_of_role[role]) == 1 else name, []).append(layer)
    return groups


def basis_group_of(name: str, groups) -> str:
    """The group (see basis_groups) whose stored basis rows the layer `name` uses."""
    return name if name in groups else role_of(name)


def full_basis(rows: torch.Tensor, index: torch.Tensor, d: int) -> torch.Tensor:
    """A (d, d) basis with the stored `rows` at `index` and zeros elsewhere: all that S's entries need."""
    out = rows.new_zeros(d, d)
    out[index.long()] = rows
    return out


def save_adapter(model: nn.Module, folder: str | Path, *, base_model: str | None = None,
                 bases_file: str | Path | None = None) -> dict:
    """Write the adapter of `model` (SparseGrad layers still in place, not merged) into `folder`,
    atomically; return {"bytes": ..., "tensors": ...}. A model sharded by sparsegrad.shard: every
    rank calls it (the entries are gathered), rank 0 writes ("bytes" is None elsewhere).

    bases_file: store the bases by reference (path and sha256 of a Bases.save file) instead of the
    basis rows the entries need; smaller, but loading then needs that file.
    """
    folder = Path(folder)
    layers = sparse_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    records: dict[str, dict] = {}
    trained: dict[str, SparseGradLinear] = {}
    for name, layer in layers.items():
        if not isinstance(layer, SparseGradLinear):  # MeProp trains the weight itself: saved whole below
            continue
        entries = entry_tensors(layer)  # values in the layer's (master) dtype
        records[name] = {"mode": layer.mode, "in_features": layer.in_features, "out_features": layer.out_features,
                         "k": layer.k, "entries": int(entries["values"].numel()), "role": role_of(name)}
        if layer.mode == "fixed":
            records[name]["structure"] = layer.structure
        tensors |= {f"{name}.{key}": t for key, t in entries.items()}
        trained[name] = layer
    bases_ref = None
    if bases_file is not None:
        bases_file = Path(bases_file)
        bases_ref = {"file": str(bases_file.resolve()), "sha256": file_sha256(bases_file)}
    else:  # the basis rows the entries use, once per role: basis.<role>.U (n, d_in) with their indices
        for group, group_layers in basis_groups(trained).items():
            tensors |= {f"basis.{group}.{key}": t for key, t in basis_rows(group_layers).items()}
    sparse_params = {id(layer.trainable) for layer in layers.values() if isinstance(layer, SparseGradLinear)}
    dense = []
    for pname, p in model.named_parameters():
        if p.requires_grad and id(p) not in sparse_params:
            p = p.detach()
            tensors[f"dense.{pname}"] = (p.full_tensor() if isinstance(p, DTensor) else p).cpu().contiguous()
            dense.append(pname)
    config = {"format": FORMAT, "version": 1, "base_model": base_model, "layers": records, "dense": dense,
              "bases": bases_ref or "embedded"}

    if is_sharded(model) and dist.get_rank() != 0:
        return {"bytes": None, "tensors": len(tensors)}
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return {"bytes": sum(f.stat().st_size for f in folder.iterdir()), "tensors": len(tensors)}


def plain_model_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as a plain model (what save_pretrained writes after merging):
    every parameter except LoRA factors and SparseGrad's trained values."""
    extra = {id(layer.trainable) for layer in sparse_layers(model).values() if isinstance(layer, SparseGradLinear)}
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters()
               if id(p) not in extra and "lora_" not in name)


def _layer_basis(tensors: dict, groups: set[str], bases, name: str, side: str,
                 device) -> tuple[torch.Tensor, torch.Tensor]:
    """(basis rows, their indices) for a layer: from the adapter's `groups`, or all rows from the referenced bases."""
    if bases is None:
        group = basis_group_of(name, groups)
        return (tensors[f"basis.{group}.{side}"].to(device, torch.float64),
                tensors[f"basis.{group}.{side}_index"].long().to(device))
    U, V = bases.for_layer(name)
    basis = (U if side == "U" else V).to(device, torch.float64)
    return basis, torch.arange(basis.shape[0], device=device)


@torch.no_grad()
def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Add the adapter in `folder` to `model` (a fresh base model, plain nn.Linear MLPs), in place;
    return `model`. Raises ValueError when the adapter does not fit the model."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{folder} holds no {CONFIG_FILE}: pass a folder written by save_adapter")
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{folder}/{CONFIG_FILE} is not a sparsegrad adapter (format {config.get('format')!r}); "
                         "a LoRA adapter loads with peft.PeftModel.from_pretrained")
    tensors = load_file(str(folder / WEIGHTS_FILE))
    groups = {key.split(".", 1)[1].rsplit(".", 1)[0] for key in tensors if key.startswith("basis.")}  # basis.<group>.U
    bases = None
    if config["bases"] != "embedded":
        from .basis import Bases

        ref = Path(config["bases"]["file"])
        if not ref.is_file():
            raise FileNotFoundError(f"the adapter refers to the bases {ref}, which is missing: pass the model's "
                                    "bases file there, or save the adapter with its basis rows embedded")
        if file_sha256(ref) != config["bases"]["sha256"]:
            raise ValueError(f"{ref} is not the bases file this adapter was trained with (sha256 differs)")
        bases = Bases.load(ref)

    params = dict(model.named_parameters())
    missing = [n for n in config["dense"] if n not in params]
    if missing:
        raise ValueError(f"the adapter trains parameters this model lacks ({missing[:3]}): was it saved from "
                         "another architecture, or from a LoRA run (load those with peft)?")
    for name, rec in config["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the adapter holds layer {name!r}, which this model lacks: load it onto the base "
                             f"model it was trained from ({config.get('base_model')})") from None
        if not is_linear_like(module) or in_out_features(module) != (rec["in_features"], rec["out_features"]):
            raise ValueError(f"layer {name!r} of this model is not a {rec['in_features']}->{rec['out_features']} "
                             "linear layer: the adapter belongs to another model")
    for pname in config["dense"]:
        if tuple(params[pname].shape) != tuple(tensors[f"dense.{pname}"].shape):
            raise ValueError(f"parameter {pname!r} has shape {tuple(params[pname].shape)} here, "
                             f"{tuple(tensors['dense.' + pname].shape)} in the adapter")

    for name, rec in config["layers"].items():
        module = model.get_submodule(name)
        weight = linear_weight(module)  # (d_out, d_in) view of the module's weight
        device = weight.device
        U, u_index = _layer_basis(tensors, groups, bases, name, "U", device)
        V, v_index = _layer_basis(tensors, groups, bases, name, "V", device)
        rows = torch.searchsorted(u_index, tensors[f"{name}.rows"].long().to(device))
        cols = torch.searchsorted(v_index, tensors[f"{name}.cols"].long().to(device))
        S = torch.zeros(U.shape[0], V.shape[0], dtype=torch.float64, device=device)
        S[rows, cols] = tensors[f"{name}.values"].to(device, torch.float64)
        delta = U.t() @ S @ V  # (d_in, n_u) @ (n_u, n_v) @ (n_v, d_out): dW^T
        weight.copy_((weight.double() + delta.t()).to(weight.dtype))  # rounded once, whatever the dtype
    for pname in config["dense"]:
        params[pname].copy_(tensors[f"dense.{pname}"].to(params[pname].dtype))
    return model
