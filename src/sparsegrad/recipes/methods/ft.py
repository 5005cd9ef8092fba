"""Full fine-tuning of the target MLP linears: every weight entry trains (the paper's "Regular FT")."""
from __future__ import annotations

from .base import Method


class FullFineTuning(Method):
    name = "ft"

    def train_mlp(self, module):
        for p in module.parameters():
            p.requires_grad_(True)
        return sum(p.numel() for p in module.parameters())
