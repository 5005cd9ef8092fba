"""Model conversion: put SparseGradLinear in place of the MLP linears, and take it out again;
and the training loop's hooks into the converted layers (top-k timing, row statistics)."""
from __future__ import annotations

from torch import nn

from .basis import Bases
from .layer import MODES, layer_class
from .shared_bases import BasesPerRole
from .sparse_linear import SparseLinear, check_k, in_out_features, master_dtype
from .support import STRUCTURES
from .targets import Blocks, Targets, find_targets, set_submodule


def sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    """Module name -> converted layer (SparseGradLinear, or the MePropLinear baseline) of `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}


DEFAULT_DENSITY = 0.01  # the paper's 1% of each layer's entries


def layer_k(d_in: int, d_out: int, density: float | None, n_params: int | None) -> int:
    """k for one layer: `n_params`, or round(density * d_in * d_out)."""
    if density is not None and n_params is not None:
        raise ValueError("pass density or n_params, not both")
    if n_params is not None:
        return check_k(n_params, d_in, d_out)
    density = DEFAULT_DENSITY if density is None else density
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density={density!r} is out of range: choose a share of the layer's entries in (0, 1], e.g. 0.01")
    return check_k(max(1, round(density * d_in * d_out)), d_in, d_out)


def apply(
    model: nn.Module,
    bases: Bases | None,
    *,
    density: float | None = None,
    n_params: int | None = None,
    mode: str = "fixed",
    structure: str = "scattered",
    targets: Targets = None,
    blocks: Blocks = None,
) -> nn.Module:
    """Replace the target MLP linears of `model` by SparseGradLinear, in place; return `model`.

    k per layer is `n_params`, or `density * d_in * d_out` (default density 0.01,
    the paper's 1%). "fixed" and "dynamic" need `bases` from compute_bases;
    "meprop" needs none. `structure` is the fixed mode's support: "scattered" (the top-k entries of the
    preliminary phase's energy, the paper's) or "block" (k entries in r rows x c columns of S: the gradient
    and the fold then cost about r rows' worth; see support.block_support). The model's outputs are unchanged
    right after.
    Other parameters keep their requires_grad flags. `blocks` narrows the targets to some
    blocks (a list of indices, or "every:3"; see sparsegrad.targets.parse_blocks).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if structure not in STRUCTURES:
        raise ValueError(f"structure={structure!r} is not one of {STRUCTURES}")
    if structure != "scattered" and mode != "fixed":
        raise ValueError(f"structure={structure!r} shapes the fixed mode's support: use it with mode='fixed' "
                         f"(mode={mode!r} chooses its entries at every step)")
    if sparse_layers(model):
        raise ValueError("this model already holds SparseGradLinear layers: sparsegrad.apply was called twice; "
                         "call sparsegrad.merge(model) first to start again")
    if mode != "meprop" and bases is None:
        raise ValueError(f"mode={mode!r} needs bases: bases = sparsegrad.compute_bases(model, batches, n_steps)")
    if mode == "fixed" and bases is not None and not bases.energy:
        raise ValueError("mode='fixed' chooses its support from the bases' energy, and these bases hold none: "
                         "compute them with with_energy=True")
    layers = find_targets(model, targets, blocks=blocks)

    plan = {}  # validate everything before touching the model
    for name, module in layers.items():
        d_in, d_out = in_out_features(module)
        try:
            k = layer_k(d_in, d_out, density, n_params)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None
        U = V = energy = None
        if mode != "meprop":
            U, V = bases.for_layer(name)
            if tuple(U.shape) != (d_in, d_in) or tuple(V.shape) != (d_out, d_out):
                raise ValueError(
                    f"the bases for {name!r} are U {tuple(U.shape)}, V {tuple(V.shape)} but the layer is "
                    f"{d_in}->{d_out}: these bases were computed for another model; recompute them on this one"
                )
            energy = bases.energy_for(name) if mode == "fixed" else None
        plan[name] = (module, k, U, V, energy)

    cls, roles = layer_class(mode), BasesPerRole()
    for name, (module, k, U, V, energy) in plan.items():
        if mode == "meprop":
            layer = cls.from_linear(module, k=k)
        else:
            device, dtype = module.weight.device, master_dtype(module.weight.dtype)  # bases of bf16 layers: float32
            extra = {"energy": energy, "structure": structure} if mode == "fixed" else {}
            layer = cls.from_linear(module, k=k, bases=roles.get(U, V, device, dtype), **extra)
        set_submodule(model, name, layer)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Replace every converted layer by a plain nn.Linear (or the original Conv1D) holding
    the trained effective weight, in place; return `model`. Outputs are unchanged."""
    layers = sparse_layers(model)
    if not layers:
        raise ValueError("nothing to merge: this model holds no SparseGradLinear (call sparsegrad.apply first)")
    for name, layer in layers.items():
        set_submodule(model, name, layer.to_linear())
    return model


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable entries: k for each SparseGradLinear, numel for other trainable parameters."""
    counted = set()
    total = 0
    for layer in sparse_layers(model).values():
        if layer.trainable.requires_grad:
            total += layer.k
        counted.update(id(p) for p in (*layer.parameters(recurse=False), layer.trainable) if p is not layer.bias)
    for p in model.parameters():
        if p.requires_grad and id(p) not in counted:
            total += p.numel()
            counted.add(id(p))
    return total


def take_row_share(model: nn.Module) -> float | None:
    """Share of the output-gradient rows that held a non-zero, over the sparse layers' backward
    passes since the last call (the paper's Fig. 3); the counters restart. None without such layers."""
    nonzero = total = 0
    for layer in sparse_layers(model).values():
        nonzero, total = nonzero + layer.row_counts[0], total + layer.row_counts[1]
        layer.row_counts = [0, 0]
    return nonzero / total if total else None


def defer_topk(model: nn.Module, defer: bool = True) -> None:
    """Top-k layers (dynamic, meprop): take the top-k of the complete gradient in `sparsify_gradients`
    instead of at each backward. Needed for gradient accumulation and data parallelism, where the
    top-k must be taken of the summed (all-reduced) gradient, never per micro-batch or per rank."""
    for layer in sparse_layers(model).values():
        layer.topk_in_backward = not defer


def sparsify_gradients(model: nn.Module) -> None:
    """After the last backward of an optimizer step (and DDP's all-reduce): the top-k of every
    deferred dynamic / meprop gradient. A no-op for fixed layers."""
    for layer in sparse_layers(model).values():
        if not layer.topk_in_backward:
            layer.sparsify_grad()  # a no-op for fixed layers
