"""Loading a task's model and tokenizer: the kind's Auto class, the embedded default, clear errors."""
from __future__ import annotations

from pathlib import Path

import torch

from .kinds import kind_of
from .tasks import Task


def default_model(task: Task) -> str:
    """The embedded defaults: SmolLM2-135M-Instruct for chat, all-MiniLM-L6-v2 otherwise."""
    return kind_of(task).default_model()


def load_model(name: str | None, task: Task, dtype: str = "float32"):
    """(tokenizer, model) for `task` with weights in `dtype`; a clear error if the folder does not load."""
    from transformers import AutoTokenizer

    kind = kind_of(task)
    name = name or kind.default_model()
    if Path(name).exists() and not (Path(name) / "config.json").is_file():
        raise ValueError(f"--model {name}: the folder holds no config.json; pass a Hugging Face model folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = kind.auto_model().from_pretrained(name, dtype=getattr(torch, dtype), **kind.model_kwargs(task))
    except (OSError, ValueError, KeyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--model {name}: could not load a model ({reason}); pass a local Hugging Face model "
                         "folder, or a hub name with a network") from None
    if tokenizer.pad_token is None:  # decoders: pad with the end-of-sequence token
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    kind.check_tokenizer(tokenizer, name)
    return tokenizer, model
