"""Instruction tuning benchmark: the paper's Table 6 (LLaMA-2 on OpenAssistant) on the embedded
decoder, SmolLM2-135M-Instruct, with real oasst1 conversations.

    sparsegrad bench chat --data-dir ../shared/chat/oasst1_en_validation_top1_conversations.jsonl

The paper's setting: the up and down projections of every third block (`--targets up_proj down_proj
--blocks every:3`), 1 epoch at lr 9e-4, only the MLP part trains; 1% density (the paper kept 0.2% of
LLaMA-2's much wider layers; at SmolLM2's 576x1536, 1% keeps LoRA at rank 4 rather than below 1); full FT trains those layers dense and
LoRA is matched to the sparse count. One `sparsegrad compare` (a fresh process per method,
resumable), then `--bf16-methods` again under bfloat16 autocast where the hardware has it.
Reports trainable parameters, validation loss and perplexity, steps/s, peak memory, and the
adapter's file size against the whole model and the LoRA adapter. Options it does not know go on
to `sparsegrad finetune` (e.g. --lr, --model, --max-train-samples).

Output: out/fp32/... and out/bf16/... (compare folders), out/chat.json and out/chat.md.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..checkpoint import write_json_atomic, write_text_atomic
from ..experiment import claim_folder, run_compare

METHODS = ("ft", "lora", "meprop", "sparsegrad-fixed", "sparsegrad-dynamic")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", required=True, help="a JSONL file of {\"messages\": [...]} conversations, or a folder")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--bf16-methods", nargs="*", default=["sparsegrad-fixed", "lora"], choices=METHODS,
                   help="run these again with --mixed-precision bf16 (skipped where bfloat16 is unsupported)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=9e-4, help="default 9e-4, the paper's")
    p.add_argument("--prompts", help="a prompt file answered by each method's best model (default: none)")
    p.add_argument("--output-dir", default="bench-results/chat")
    p.add_argument("--resume", action="store_true")


def bf16_supported() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:  # CPU: bfloat16 matmuls run natively with AVX512-BF16 / AMX, emulated (slowly) otherwise
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def run(args: argparse.Namespace, passthrough: list[str]) -> dict:
    out = Path(args.output_dir)
    common = ["--task", "chat", "--data-dir", str(args.data_dir), "--targets", "up_proj", "down_proj",
              "--blocks", "every:3", "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
              "--epochs", str(args.epochs), "--lr", str(args.lr), "--no-progress", *passthrough]
    if args.prompts:
        common += ["--prompts", str(args.prompts), "--max-prompts", "5"]
    bf16 = args.bf16_methods if bf16_supported() else []
    claim_folder(out, {"bench": "chat", "methods": args.methods, "bf16": bf16, "argv": common}, args.resume)
    start = time.time()
    rows = run_compare(args.methods, common, out / "fp32", resume=(out / "fp32" / "command.json").is_file())["rows"]
    if bf16:
        folder = out / "bf16"
        rows += [{**r, "method": r["method"] + " bf16"} for r in
                 run_compare(bf16, [*common, "--mixed-precision", "bf16"], folder,
                             resume=(folder / "command.json").is_file())["rows"]]
    result = {"meta": {"argv": common, "bf16": bf16, "wall_seconds": time.time() - start}, "rows": rows}
    write_json_atomic(out / "chat.json", result)
    write_text_atomic(out / "chat.md", markdown(result) + "\n")
    return result


def markdown(result: dict) -> str:
    """Table 6-like: one row per method."""
    rows = result["rows"]
    lora = next((r for r in rows if r["method"] == "lora"), None)
    lines = [("| method | trainable | validation loss | perplexity | untrained loss | steps/s | peak MB "
             "| adapter MB | adapter x model | adapter x LoRA |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = r["method"] + (f" (r={r['lora_rank']})" if r.get("lora_rank") else "")
        size = r.get("adapter_bytes") or 0
        vs_model = f"{size / r['model_bytes']:.4f}" if r.get("model_bytes") else ""
        vs_lora = f"{size / lora['adapter_bytes']:.2f}" if lora and lora.get("adapter_bytes") else ""
        lines.append(f"| {name} | {r['trainable']:,} | {r['mean']:.4f} | {r.get('validation/perplexity', 0):.2f} "
                     f"| {r['baseline']:.4f} | {r['steps_per_s']:.3f} | {r['peak_memory_mb']:,.0f} "
                     f"| {size / 2**20:.2f} | {vs_model} | {vs_lora} |")
    return "\n".join(lines)


def main(args: argparse.Namespace, passthrough: list[str]) -> int:
    result = run(args, passthrough)
    print(markdown(result))
    print(f"\nresults: {Path(args.output_dir) / 'chat.json'}, {Path(args.output_dir) / 'chat.md'}")
    return 0
