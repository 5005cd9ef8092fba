"""Atomic, verified checkpoints: a run can be killed at any moment (kill -9 included) and resumed.

A checkpoint is a folder `checkpoint-<step>/` holding
    model.safetensors   the model's full state_dict (merged sparse weights and their buffers included)
    state.pt            optimizer, scheduler, RNG states and the loop's own state
    manifest.json       each file's size and SHA-256, written last
It is written under a temporary name and renamed into place; then the `latest` file is
replaced atomically to point at it; only then are older checkpoints removed, keeping the newest
`keep` (two by default). A reader therefore always finds a complete checkpoint, or none; one
damaged afterwards (a truncated or altered file) is detected by its manifest, named, and passed
over for the previous good one.
"""
from __future__ import annotations

import json
import pickle
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from sparsegrad.sharding import is_sharded, load_full_state_dict
from sparsegrad.util import (
    atomic_path,
    file_sha256,
    remove_stale_temporaries,
    write_json_atomic,
    write_text_atomic,
)

LATEST = "latest"
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint or saved weights file that cannot be read; the message names the file."""


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_weights(weights: nn.Module | dict, path: Path) -> None:
    """A model's state_dict (shared tensors handled), or a state dict (a sharded model's, gathered), as safetensors."""
    if isinstance(weights, dict):
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    else:
        save_model(weights, str(path))


def save_weights(weights: nn.Module | dict, folder: Path) -> None:
    """A model's weights (or a gathered state dict) into folder/model.safetensors, atomically."""
    with atomic_path(folder / "model.safetensors") as tmp:
        _write_weights(weights, tmp)


def load_weights(model: nn.Module, folder: Path) -> None:
    """Load folder/model.safetensors into `model` (each rank its own shards, when sharded); a damaged
    or foreign file is a CheckpointError naming it."""
    path = folder / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        if is_sharded(model):
            missing, unexpected = load_full_state_dict(model, load_file(str(path)))
        else:
            missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:  # they name no file
        raise CheckpointError(f"{path} is damaged ({type(err).__name__}: {err})") from None
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}): "
                              "it was written by a different run")


def save_checkpoint(root: Path, step: int, weights: nn.Module | dict, state: dict, keep: int = 2) -> Path:
    """Write checkpoint-<step> (a model's weights, or a sharded model's gathered state dict) under `root`
    atomically, point `latest` at it, keep the newest `keep`."""
    if keep < 1:
        raise ValueError(f"keep={keep}: at least one checkpoint must be kept")
    final = root / f"checkpoint-{step}"
    with atomic_path(final) as tmp:  # the same step written again (e.g. after a resume) is replaced
        tmp.mkdir()
        _write_weights(weights, tmp / "model.safetensors")
        with open(tmp / "state.pt", "wb") as f:  # through a file object: a full disk surfaces as ENOSPC
            torch.save(state, f)
        write_json_atomic(tmp / MANIFEST, {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                                           for p in sorted(tmp.iterdir()) if not p.name.startswith(".")})
    write_text_atomic(root / LATEST, final.name)
    for old in checkpoints(root)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    remove_stale_temporaries(root, ".checkpoint-*.tmp*")  # left by a killed writer
    return final


def checkpoints(root: Path) -> list[Path]:
    """The checkpoint folders under `root`, oldest first."""
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[1].isdigit()]
    return sorted(found, key=_step)


def _step(path: Path) -> int:
    return int(path.name.split("-")[1])


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError naming the first file of `path` that is missing or differs from the manifest."""
    manifest_file = path / MANIFEST
    if not manifest_file.exists() and (path / "state.pt").is_file():
        return  # written before checkpoints had manifests: complete (it was renamed into place), unverified
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{manifest_file} is missing or damaged ({err})") from None
    for name, expected in manifest.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{file} is damaged: {size:,} bytes where {expected['bytes']:,} were written")
        if file_sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file} is damaged: its content differs from what was written")


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint under `root` that verifies, or None if there is none at all. Damaged ones
    are reported and passed over; if every checkpoint is damaged, a CheckpointError says what to do."""
    found = checkpoints(root)
    pointer = root / LATEST
    newest = pointer.read_text().strip().rpartition("-")[2] if pointer.is_file() else ""
    if newest.isdigit():  # `latest` names the newest complete one: any newer folder is left from a crash
        found = [p for p in found if _step(p) <= int(newest)]
    problems = []
    for path in reversed(found):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            problems.append(str(err))
            print(f"warning: {err}; trying the checkpoint before it", file=sys.stderr)
            continue
        return path
    if problems:
        raise CheckpointError(f"no checkpoint in {root} can be read ({'; '.join(problems)}): delete {root} to "
                              "start this run over, or restore the file from a copy")
    return None


def load_checkpoint(path: Path, model: nn.Module) -> dict:
    """Load a checkpoint's weights into `model`; return its state dict (optimizer etc.)."""
    load_weights(model, path)
    try:
        return torch.load(path / "state.pt", weights_only=False)
    except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path / 'state.pt'} is damaged ({type(err).__name__}: {err})") from None
