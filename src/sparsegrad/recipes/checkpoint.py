"""Atomic checkpoints: a run can be killed at any moment (kill -9 included) and resumed.

A checkpoint is a folder `checkpoint-<step>/` holding
    model.safetensors   the model's full state_dict (merged sparse weights and their buffers included)
    state.pt            optimizer, scheduler, RNG states and the loop's own state
It is written under a temporary name and renamed into place; then the `latest` file is
replaced atomically to point at it; only then are older checkpoints removed. A reader
therefore always finds a complete checkpoint, or none.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from sparsegrad.util import atomic_path, write_text_atomic

LATEST = "latest"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_weights(model: nn.Module, folder: Path) -> None:
    """The model's state_dict into folder/model.safetensors, atomically (shared tensors handled)."""
    with atomic_path(folder / "model.safetensors") as tmp:
        save_model(model, str(tmp))


def load_weights(model: nn.Module, folder: Path) -> None:
    missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}): "
                         "it was written by a different run")


def save_checkpoint(root: Path, step: int, model: nn.Module, state: dict, keep: int = 1) -> Path:
    """Write checkpoint-<step> under `root` atomically and point `latest` at it."""
    final = root / f"checkpoint-{step}"
    with atomic_path(final) as tmp:  # the same step written again (e.g. after a resume) is replaced
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
    write_text_atomic(root / LATEST, final.name)
    done = sorted((p for p in root.glob("checkpoint-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    for old in done[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".checkpoint-*.tmp*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` points at, or None."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.pt").is_file() else None


def load_checkpoint(path: Path, model: nn.Module) -> dict:
    """Load a checkpoint's weights into `model`; return its state dict (optimizer etc.)."""
    load_weights(model, path)
    return torch.load(path / "state.pt", weights_only=False)
