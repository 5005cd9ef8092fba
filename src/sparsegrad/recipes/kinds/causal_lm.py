"""Instruction tuning of a decoder (the `chat` task): loss on the assistant's tokens, scored by
validation loss and perplexity; the untrained model is the baseline. The data side is chat.py."""
from __future__ import annotations

from .. import chat
from .base import TaskKind


class CausalLM(TaskKind):
    name = "causal_lm"
    baseline_kind = "untrained model"
    default_rest = "none"  # only the method's MLP part: the LM head is tied to the embeddings
    answers_prompts = True
    default_model_name = "SmolLM2-135M-Instruct"
    default_model_call = "sparsegrad.recipes.assets.smollm2_path()"

    def load(self, task, data_dir):
        train, validation, source = chat.load_conversations(data_dir)
        return train, {"validation": validation}, source

    def default_model(self) -> str:
        from ..assets import smollm2_path

        return str(smollm2_path())

    def auto_model(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def check_tokenizer(self, tokenizer, name):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"--model {name}: its tokenizer has no chat template; the chat task needs an instruct "
                             "model (or a tokenizer_config.json / chat_template.jinja with one)")

    def encode(self, tokenizer, examples, max_length):
        return chat.encode(tokenizer, examples, max_length)

    def collator(self, tokenizer):
        return chat.Collator(tokenizer)

    def loss_items(self, batch):
        return chat.loss_tokens(batch)

    def evaluate(self, task, model, tokenizer, encoded, device, *, eval_batch_size, train_batch_size):
        # at most the training batch size: a decoder's logits over the vocabulary dwarf everything else
        return chat.evaluate_loss(model, tokenizer, encoded, min(eval_batch_size, train_batch_size), device)

    def baseline(self, task, data, evaluate_untrained):
        return evaluate_untrained()
