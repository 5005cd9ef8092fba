"""The preliminary phase: HOSVD bases of MLP weight gradients, by streaming Gram sums.

Stacking the gradients G_n (d_in, d_out) of a layer role over steps and blocks
gives a (d_in, d_out, N) tensor; its HOSVD factors are the eigenvectors of

    A = sum_n G_n G_n^T   (d_in, d_in)    ->  U = eigenvectors as rows
    B = sum_n G_n^T G_n   (d_out, d_out)  ->  V = eigenvectors as rows

so each slice is folded into A and B as it arrives and dropped: memory d_in^2 + d_out^2 per role,
never the stacked tensor (the paper's Sec. 3.1 stacks the N slices; docs/method.md shows the two agree).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Self

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .sparse_linear import in_out_features, is_conv1d
from .targets import Blocks, Targets, find_targets, role_of
from .util import atomic_path, to_device

GROUP_BY = ("role", "shape", "layer")
FORMAT_VERSION = 1


def _descending_eigvecs(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows = eigenvectors of a symmetric PSD matrix, by descending eigenvalue; and sqrt(eigenvalues).

    Signs are fixed so that each vector's largest-magnitude component is positive.
    """
    evals, evecs = torch.linalg.eigh(gram)  # ascending, columns
    evals, rows = evals.flip(0), evecs.flip(1).t().contiguous()
    pivot = rows.abs().argmax(dim=1, keepdim=True)
    rows *= torch.sign(rows.gather(1, pivot))
    return rows, evals.clamp_min(0).sqrt()


class GramAccumulator:
    """Streaming HOSVD factors of gradient slices G (d_in, d_out).

    Each slice is added in place into compute_dtype sums (one GEMM per side, no temporaries);
    every `flush_every` slices those are folded into float64 totals, so long runs keep their precision.
    """

    def __init__(self, d_in: int, d_out: int, device=None, compute_dtype: torch.dtype = torch.float32,
                 flush_every: int = 16):
        self.compute_dtype, self.flush_every = compute_dtype, flush_every
        self.A = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
        self.B = torch.zeros(d_out, d_out, dtype=torch.float64, device=device)
        self._a = self.A if compute_dtype == torch.float64 else torch.zeros(d_in, d_in, dtype=compute_dtype, device=device)
        self._b = self.B if compute_dtype == torch.float64 else torch.zeros(d_out, d_out, dtype=compute_dtype, device=device)
        self.n = 0

    def add(self, g: torch.Tensor) -> None:
        g = g.to(self.compute_dtype)
        self._a.addmm_(g, g.t())  # += (d_in, d_out) @ (d_out, d_in)
        self._b.addmm_(g.t(), g)  # += (d_out, d_in) @ (d_in, d_out)
        self.n += 1
        if self.n % self.flush_every == 0:
            self._flush()

    def _flush(self) -> None:
        if self._a is not self.A:
            self.A += self._a
            self.B += self._b
            self._a.zero_()
            self._b.zero_()

    def bases(self, dtype: torch.dtype = torch.float32, eigh_dtype: torch.dtype = torch.float64
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """U (d_in, d_in), V (d_out, d_out), and the mode-1 / mode-2 singular values.

        eigh_dtype=torch.float32 runs the eigendecompositions in single precision (several times
        faster for d >= 2048 on CPU; vectors orthonormal to ~1e-6, the leading ones accurate)."""
        if self.n == 0:
            raise RuntimeError("no gradient was accumulated")
        self._flush()
        U, s_in = _descending_eigvecs(self.A.to(eigh_dtype))
        V, s_out = _descending_eigvecs(self.B.to(eigh_dtype))
        return U.to(dtype), V.to(dtype), s_in, s_out


def hosvd_unfold(slices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference HOSVD factors of a stacked (N, d_in, d_out) tensor by SVD of its unfoldings.

    Memory d_in * d_out * N: for tests and benchmarks only.
    """
    n, d_in, d_out = slices.shape
    mode1 = slices.permute(1, 0, 2).reshape(d_in, n * d_out)  # (d_in, N * d_out)
    mode2 = slices.permute(2, 0, 1).reshape(d_out, n * d_in)  # (d_out, N * d_in)
    u = torch.linalg.svd(mode1, full_matrices=False).U  # (d_in, min(d_in, N * d_out))
    v = torch.linalg.svd(mode2, full_matrices=False).U
    return u.t(), v.t()


def top_share(energy: torch.Tensor, share: float = 0.01) -> float:
    """Fraction of the total of `energy` (non-negative) held by its top `share` of entries."""
    flat = energy.reshape(-1).double()
    k = max(1, round(share * flat.numel()))
    return float(torch.topk(flat, k).values.sum() / flat.sum().clamp_min(1e-300))


@dataclass(repr=False)
class Bases:
    """Output of the preliminary phase.

    U / V: basis key -> (d_in, d_in) / (d_out, d_out), rows are basis vectors.
    layers: module name -> basis key.
    energy: module name -> (d_in, d_out), sum over steps of (U G V^T)^2: what
        the fixed mode chooses its support from.
    info: how they were made (steps, grouping, energy compaction per layer).
    """

    U: dict[str, torch.Tensor]
    V: dict[str, torch.Tensor]
    layers: dict[str, str]
    energy: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        roles = ", ".join(f"{k}: U {tuple(self.U[k].shape)}, V {tuple(self.V[k].shape)}" for k in self.U)
        return (f"Bases({len(self.U)} pair(s) for {len(self.layers)} layers, n_steps={self.info.get('n_steps')}, "
                f"energy for {len(self.energy)} layers; {roles})")

    def for_layer(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self.layers:
            known = list(self.layers)[:4]
            raise KeyError(
                f"the bases hold no entry for layer {name!r} (they cover {len(self.layers)} layers, e.g. {known}); "
                "compute them on this model with the same targets"
            )
        key = self.layers[name]
        return self.U[key], self.V[key]

    def energy_for(self, name: str) -> torch.Tensor:
        """The layer's energy (d_in, d_out), from which the fixed mode chooses its support."""
        energy = self.energy.get(name)
        if energy is None:
            raise ValueError(f"mode='fixed' chooses its support from the bases' energy, and the bases hold none for "
                             f"{name!r}: compute them with with_energy=True")
        return energy

    def save(self, path: str | os.PathLike) -> None:
        """Write to a safetensors file, atomically."""
        tensors = {f"U/{k}": u.contiguous() for k, u in self.U.items()}
        tensors |= {f"V/{k}": v.contiguous() for k, v in self.V.items()}
        tensors |= {f"energy/{k}": e.contiguous() for k, e in self.energy.items()}
        meta = {"format": "sparsegrad.bases", "version": str(FORMAT_VERSION),
                "layers": json.dumps(self.layers), "info": json.dumps(self.info)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Bases:
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise FileNotFoundError(f"no bases file at {path!r}; compute them with sparsegrad.compute_bases(...).save(path)")
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "sparsegrad.bases":
            raise ValueError(f"{path!r} is not a sparsegrad bases file")
        tensors = load_file(os.fspath(path), device=str(device))
        parts: dict[str, dict[str, torch.Tensor]] = {"U": {}, "V": {}, "energy": {}}
        for name, t in tensors.items():
            kind, _, key = name.partition("/")
            parts[kind][key] = t
        return cls(parts["U"], parts["V"], json.loads(meta["layers"]), parts["energy"], json.loads(meta["info"]))


def _basis_key(name: str, module: nn.Module, group_by: str) -> str:
    if group_by == "role":
        return role_of(name)
    if group_by == "shape":
        d_in, d_out = in_out_features(module)
        return f"{d_in}x{d_out}"
    return name


class _GradientTap:
    """Calls `fn(name, G)` with each target's weight gradient G (d_in, d_out) right after
    it is accumulated, then frees it; only the targets require grad meanwhile.

    Restores every parameter's requires_grad flag and .grad on exit.
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module]):
        self.model, self.layers = model, layers
        self.fn = None

    def __enter__(self) -> Self:
        params = list(self.model.parameters())
        self._saved = [(p, p.requires_grad, p.grad) for p in params]
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        self._handles = []
        for name, module in self.layers.items():
            conv = is_conv1d(module)

            def hook(p: torch.Tensor, name=name, conv=conv) -> None:
                g = p.grad if conv else p.grad.t()  # (d_in, d_out)
                self.fn(name, g)
                p.grad = None

            module.weight.requires_grad_(True)
            self._handles.append(module.weight.register_post_accumulate_grad_hook(hook))
        return self

    def run(self, batches: list[dict], fn, desc: str, progress: bool) -> None:
        self.fn = fn
        device = next(self.model.parameters()).device
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            with torch.enable_grad():
                out = self.model(**to_device(batch, device))
            loss = getattr(out, "loss", None)
            if loss is None:
                raise ValueError("model(**batch) returned no .loss: the batches must carry labels")
            loss.backward()

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for p, flag, grad in self._saved:
            p.requires_grad_(flag)
            p.grad = grad


@torch.no_grad()
def compute_bases(
    model: nn.Module,
    batches: Iterable[Mapping],
    n_steps: int,
    targets: Targets = None,
    *,
    blocks: Blocks = None,
    group_by: str = "role",
    with_energy: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    eigh_dtype: torch.dtype = torch.float64,
    progress: bool = True,
) -> Bases:
    """Run the preliminary phase on `model` and return its bases.

    Args:
        batches: yields dicts for ``model(**batch)`` with labels (the model returns `.loss`).
        n_steps: number of batches to backpropagate (the paper's n_steps).
        targets: MLP linears (default: per architecture, see sparsegrad.targets).
        blocks: which blocks: None (all), a list of indices, or "every:3" (see targets.parse_blocks).
        group_by: "role" (one pair per layer role shared across blocks, the paper),
            "shape" (one pair per layer shape) or "layer" (one pair per layer).
        with_energy: replay the same batches once more to record each layer's energy
            in the transformed space, which the fixed mode chooses its support from.
        compute_dtype: dtype of the Gram products (sums are kept in float64).
        eigh_dtype: dtype of the eigendecompositions; float32 is several times faster for wide
            layers on CPU (BERT-base: 1.74x -> 1.14x the Gram floor, see docs/results.md).

    The model's weights, requires_grad flags and .grad are unchanged afterwards.
    """
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by={group_by!r} is not one of {GROUP_BY}")
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    layers = find_targets(model, targets, blocks=blocks)
    steps: list[dict] = []
    for batch in batches:
        steps.append(batch)
        if len(steps) == n_steps:
            break
    if not steps:
        raise ValueError("batches yielded nothing: pass an iterable of model inputs with labels")

    keys = {name: _basis_key(name, m, group_by) for name, m in layers.items()}
    device = next(model.parameters()).device
    grams: dict[str, GramAccumulator] = {}
    for name, m in layers.items():
        if keys[name] not in grams:
            grams[keys[name]] = GramAccumulator(*in_out_features(m), device=device, compute_dtype=compute_dtype)

    with _GradientTap(model, layers) as tap:
        tap.run(steps, lambda name, g: grams[keys[name]].add(g), "sparsegrad bases", progress)
        U, V, spectra = {}, {}, {}
        for key, acc in grams.items():
            if acc.n == 0:
                raise RuntimeError(f"no gradient reached {key!r} in {len(steps)} steps: is it used by the forward pass?")
            U[key], V[key], s_in, s_out = acc.bases(eigh_dtype=eigh_dtype)
            spectra[key] = {"slices": acc.n, "top_singular_in": float(s_in[0]), "top_singular_out": float(s_out[0])}
        grams.clear()  # free the Gram sums before the energy pass

        energy: dict[str, torch.Tensor] = {}
        compaction: dict[str, dict[str, float]] = {}
        if with_energy:
            original: dict[str, torch.Tensor] = {}

            def record(name: str, g: torch.Tensor) -> None:
                u, v = U[keys[name]], V[keys[name]]
                g = g.to(u.dtype)
                t = u @ g @ v.t()  # (d_in, d_in) @ (d_in, d_out) @ (d_out, d_out)
                if name not in energy:
                    energy[name], original[name] = torch.zeros_like(t), torch.zeros_like(t)
                energy[name] += t.square()
                original[name] += g.square()

            tap.run(steps, record, "sparsegrad energy", progress)
            for name, e in energy.items():
                compaction[name] = {"original": top_share(original[name]), "transformed": top_share(e)}

    info = {"n_steps": len(steps), "group_by": group_by, "targets": sorted({keys[n] for n in layers}),
            "spectra": spectra, "top1pct_energy_share": compaction}
    return Bases(U, V, keys, energy, info)
