"""Instruction tuning benchmark: the paper's Table 6 (LLaMA-2 on OpenAssistant) on the embedded
decoder, SmolLM2-135M-Instruct, with real oasst1 conversations.

    sparsegrad bench chat --data-dir ../shared/chat/oasst1_en_validation_top1_conversations.jsonl

The paper's setting: the up and down projections of every third block (`--targets up_proj down_proj
--blocks every:3`), 1 epoch at lr 9e-4, only the MLP part trains; 1% density (the paper kept 0.2% of
LLaMA-2's much wider layers; at SmolLM2's 576x1536, 1% keeps LoRA at rank 4 rather than below 1); full FT trains those layers dense and
LoRA is matched to the sparse count. One `compare` (a fresh process per method, resumable), then
`--bf16-methods` again under bfloat16 autocast where the hardware has it. Reports trainable
parameters, validation loss and perplexity, steps/s, peak memory, and the adapter's file size
against the whole model and the LoRA adapter. It takes every `sparsegrad finetune` option (e.g.
--lr, --model, --max-train-samples) for its runs.

Output: out/fp32/... and out/bf16/... (compare folders), out/chat.json and out/chat.md.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from sparsegrad.util import write_json_atomic, write_text_atomic

from ..recipes.compare import run_compare
from ..recipes.config import RunConfig, from_args
from ..recipes.config import add_arguments as add_config_arguments
from ..recipes.experiment import claimed_folder
from ..recipes.results import SummaryRow

METHODS = ("ft", "lora", "meprop", "sparsegrad-fixed", "sparsegrad-dynamic")
# the paper's setting (Table 6): up and down projections of every third block, 1 epoch at lr 9e-4
PAPER_SETTING = {"task": "chat", "targets": ["up_proj", "down_proj"], "blocks": "every:3", "max_length": 256,
                 "batch_size": 4, "epochs": 1, "lr": 9e-4, "max_prompts": 5}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--bf16-methods", nargs="*", default=["sparsegrad-fixed", "lora"], choices=METHODS,
                   help="run these again with --mixed-precision bf16 (skipped where bfloat16 is unsupported)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--output-dir", default="bench-results/chat")
    p.add_argument("--resume", action="store_true")
    add_config_arguments(p, RunConfig, skip=("task", "method", "mode", "mixed_precision"), group="runs",
                         defaults=PAPER_SETTING)


def bf16_supported() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:  # CPU: bfloat16 matmuls run natively with AVX512-BF16 / AMX, emulated (slowly) otherwise
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def run(args: argparse.Namespace) -> dict:
    out = Path(args.output_dir)
    if not args.data_dir:
        raise ValueError("bench chat needs --data-dir: a JSONL file of {\"messages\": [...]} conversations, "
                         "or a folder")
    cfg = from_args(RunConfig, args, task="chat")
    bf16 = args.bf16_methods if bf16_supported() else []
    command = {"bench": "chat", "methods": args.methods, "bf16": bf16, "seeds": args.seeds, "config": cfg.identity()}
    with claimed_folder(out, command, args.resume):
        start = time.time()

        def compare(methods: list[str], cfg: RunConfig, folder: Path) -> list[SummaryRow]:
            # resume=True continues a compare this benchmark began, and starts one it has not
            return run_compare(methods, cfg, folder, seeds=args.seeds, resume=True).rows

        rows = compare(args.methods, cfg, out / "fp32")
        if bf16:
            rows += [replace(r, method=r.method + " bf16")
                     for r in compare(bf16, replace(cfg, mixed_precision="bf16"), out / "bf16")]
        result = {"meta": {"config": cfg.identity(), "options": cfg.changed(), "bf16": bf16,
                           "wall_seconds": time.time() - start},
                  "rows": [r.to_dict() for r in rows]}
        write_json_atomic(out / "chat.json", result)
        write_text_atomic(out / "chat.md", markdown(result) + "\n")
        return result


def markdown(result: dict) -> str:
    """Table 6-like: one row per method."""
    rows = [SummaryRow.from_dict(r) for r in result["rows"]]
    lora = next((r for r in rows if r.method == "lora"), None)
    lines = [("| method | trainable | validation loss | perplexity | untrained loss | steps/s | peak MB "
             "| adapter MB | adapter x model | adapter x LoRA |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = r.method + (f" (r={r.lora_rank})" if r.lora_rank else "")
        size = r.adapter_bytes or 0
        vs_model = f"{size / r.model_bytes:.4f}" if r.model_bytes else ""
        vs_lora = f"{size / lora.adapter_bytes:.2f}" if lora and lora.adapter_bytes else ""
        loss = r.status if r.mean is None else f"{r.mean:.4f}"
        lines.append(f"| {name} | {r.trainable:,} | {loss} | {r.splits.get('validation/perplexity', 0):.2f} "
                     f"| {r.baseline:.4f} | {r.steps_per_s:.3f} | {r.peak_memory_mb:,.0f} "
                     f"| {size / 2**20:.2f} | {vs_model} | {vs_lora} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    print(markdown(result))
    print(f"\nresults: {Path(args.output_dir) / 'chat.json'}, {Path(args.output_dir) / 'chat.md'}")
    return 0
