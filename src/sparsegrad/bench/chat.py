"""Instruction tuning benchmark: the paper's Table 6 (LLaMA-2 on OpenAssistant) on the embedded
decoder, SmolLM2-135M-Instruct, with real oasst1 conversations; each method at its own learning rate.

    sparsegrad bench chat --data-dir ../shared/chat/oasst1_en_validation_top1_conversations.jsonl \\
        --output-dir docs/results/chat

The paper's setting: the up and down projections of every third block (`--targets up_proj down_proj
--blocks every:3`), 1 epoch, only the MLP part trains; 1% density (the paper kept 0.2% of LLaMA-2's
much wider layers; at SmolLM2's 576x1536, 1% keeps LoRA at rank 4 rather than below 1); full FT trains
those layers dense and LoRA is matched to the sparse count. The protocol is protocol.py's: per method,
seed 0 at 3 lrs 4x apart around the paper's 9e-4 (one more past a winning edge), selected on a tenth
of the training conversations held out; seeds 1 and 2 at the chosen lr; the validation loss of the
three (mean ± std). Then `--bf16-methods` again under bfloat16 autocast at their float32 lr, where the
hardware has it. Records in out/runs/<fp32|bf16>/chat/<method>/; out/chat.json and out/chat.md from them.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from sparsegrad.util import write_json_atomic, write_text_atomic

from ..recipes.config import RunConfig, from_args
from ..recipes.config import add_arguments as add_config_arguments
from ..recipes.methods import split_label
from .protocol import add_workers_argument, cell, group_spec, read_records, run_groups, summarize

METHODS = ("ft", "lora", "meprop", "sparsegrad-fixed", "sparsegrad-dynamic", "sparsegrad-block")
GRID = (2.25e-4, 9e-4, 3.6e-3)  # around the paper's 9e-4 (Table 15)
KEYS = ("setting", "task", "method")
# the paper's setting (Table 6): up and down projections of every third block, 1 epoch
PAPER_SETTING = {"task": "chat", "targets": ["up_proj", "down_proj"], "blocks": "every:3", "max_length": 256,
                 "batch_size": 4, "epochs": 1, "heldout": 0.1}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--bf16-methods", nargs="*", default=["sparsegrad-fixed", "lora"], choices=METHODS,
                   help="run these again with --mixed-precision bf16 at their float32 lr (skipped where "
                        "bfloat16 is unsupported)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the first one also searches the lr")
    p.add_argument("--grid", type=float, nargs="+", default=list(GRID), help="the lrs every method tries")
    p.add_argument("--no-extend", action="store_true", help="no extra lr past an edge of the grid")
    p.add_argument("--output-dir", default="bench-results/chat")
    p.add_argument("--work-dir", help="the runs while they train, and the bases (default: OUTPUT_DIR/work)")
    p.add_argument("--report-only", action="store_true", help="rebuild chat.json / chat.md from the records")
    add_workers_argument(p)
    add_config_arguments(p, RunConfig, skip=("task", "method", "mode", "structure", "mixed_precision", "lr", "prompts",
                                              "max_prompts", "max_new_tokens"), group="runs", defaults=PAPER_SETTING)


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
    failed: list[str] = []
    if not args.report_only:
        if not args.data_dir:
            raise ValueError("bench chat needs --data-dir: a JSONL file of {\"messages\": [...]} conversations, "
                             "or a folder")
        base = from_args(RunConfig, args, task="chat")
        work = Path(args.work_dir or out / "work")

        def group(label: str, setting: str, cfg: RunConfig, grid, extend: bool) -> dict:
            cfg = replace(cfg, **split_label(label))
            return group_spec(f"{setting} chat {label}", cfg, grid=grid, seeds=args.seeds, extend=extend,
                              records=out / "runs" / setting / "chat" / label, work=work / setting / label,
                              bases=work / "bases.safetensors", keys={"setting": setting, "method": label})

        failed = run_groups([group(m, "fp32", base, args.grid, not args.no_extend) for m in args.methods],
                            args.workers)
        if args.bf16_methods and bf16_supported():
            chosen = {r["method"]: r["lr"] for r in summarize(read_records(out / "runs" / "fp32"), KEYS)["rows"]}
            bf16 = replace(base, mixed_precision="bf16")
            failed += run_groups([group(m, "bf16", bf16, [chosen[m]], False) for m in args.bf16_methods if m in chosen],
                              args.workers)
    result = {**summarize(read_records(out / "runs"), KEYS), "failed": failed}
    write_json_atomic(out / "chat.json", result)
    write_text_atomic(out / "chat.md", markdown(result) + "\n")
    return result


def markdown(result: dict) -> str:
    """Table 6-like: one row per method, validation loss mean ± std over the seeds at its lr."""
    lines = ["| method | trainable | validation loss | untrained (held-out) | steps/s | lrs tried (held-out loss) |",
             "|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        name = r["method"] + (" bf16" if r["setting"] == "bf16" else "") + (f" (r={r['lora_rank']})" if r["lora_rank"] else "")
        tried = ", ".join(f"{lr}: {'diverged' if v is None else f'{v:.3f}'}" for lr, v in r["search"].items())
        lines.append(f"| {name} | {r['trainable']:,} | {cell(r, scale=1, digits=4)} | {r['dev_baseline']:.4f} "
                     f"| {r['steps_per_s']:.3f} | {tried} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    print(markdown(result))
    print(f"\n{result['runs']} runs, {result['compute_seconds'] / 3600:.2f} h; results: "
          f"{Path(args.output_dir) / 'chat.json'}, {Path(args.output_dir) / 'chat.md'}")
    if result["failed"]:
        print(f"failed: {'; '.join(result['failed'])} (their output above; run again to resume)", file=sys.stderr)
    return 1 if result["failed"] else 0
