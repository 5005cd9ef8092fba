"""LoRA through peft on the target MLP linears, its rank matched to the sparse methods' budget."""
from __future__ import annotations

from torch import nn

from sparsegrad.sparse_linear import in_out_features

from .base import Method, MethodOptions


def lora_rank_for(budget: int, layers: dict[str, nn.Module]) -> int:
    """The LoRA rank whose r * (d_in + d_out) summed over layers is nearest to `budget` (at least 1)."""
    per_rank = sum(sum(in_out_features(m)) for m in layers.values())
    return max(1, round(budget / per_rank))


def inject_lora(model: nn.Module, target_modules: list[str], rank: int, alpha: float | None = None) -> None:
    """peft LoRA factors on `target_modules` of `model`, in place (no dropout, no bias)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0, target_modules=target_modules,
                        bias="none")
    inject_adapter_in_model(config, model)


class LoRA(Method):
    name = "lora"

    def convert(self, model, layers, options: MethodOptions):
        rank = options.lora_rank or lora_rank_for(options.budget, layers)
        inject_lora(model, sorted(layers), rank, options.lora_alpha)
        return {"lora_rank": rank}

    def train_mlp(self, module):
        count = 0
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
                count += p.numel()
        return count
