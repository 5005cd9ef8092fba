"""Task kinds: classification (GLUE, BBC News) and causal-LM chat. A Task names its kind by key."""
from __future__ import annotations

from ..tasks import Task
from .base import TaskKind
from .causal_lm import CausalLM
from .classification import Classification

KINDS: dict[str, TaskKind] = {kind.name: kind for kind in (Classification(), CausalLM())}


def kind_of(task: Task) -> TaskKind:
    if task.kind not in KINDS:
        raise ValueError(f"task {task.name!r} has kind {task.kind!r}, which is not one of {sorted(KINDS)}")
    return KINDS[task.kind]


__all__ = ["KINDS", "TaskKind", "kind_of"]
