"""The `sparsegrad` command line.

    sparsegrad finetune                      # offline default: MiniLM on BBC News, SparseGrad fixed
    sparsegrad finetune --task sst2 --data-dir glue/ --method lora --seeds 0 1 2
    sparsegrad compare --task mrpc --data-dir glue/ --methods ft lora meprop sparsegrad
    sparsegrad bench speed | bases | glue --data-dir glue/ | report    # the paper's tables, measured here
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .methods import METHOD_ALIASES, METHODS, RESTS

COMPARE_METHODS = ("ft", "lora", "meprop", "sparsegrad", "sparsegrad-fixed", "sparsegrad-dynamic")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `finetune` and `compare` (compare passes them on to finetune)."""
    g = p.add_argument_group("task and data")
    g.add_argument("--task", default="bbcnews",
                   help="cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli, bbcnews (embedded default), or chat "
                        "(instruction tuning of a decoder)")
    g.add_argument("--data-dir", help="GLUE folder: DIR/<TASK>/{train,dev}.tsv, or a datasets save_to_disk folder; "
                                      "chat: a JSONL file of {\"messages\": [...]} (split by conversation tree), "
                                      "a folder with train.jsonl + validation.jsonl, or a datasets folder")
    g.add_argument("--max-train-samples", type=int, help="a fixed random subset of the training set")
    g.add_argument("--max-eval-samples", type=int, help="a fixed random subset of each evaluation split")
    g.add_argument("--max-length", type=int, default=128, help="truncation length in tokens (default 128)")
    g = p.add_argument_group("model and method")
    g.add_argument("--model", help="local model folder or hub name (default: the embedded all-MiniLM-L6-v2; "
                                   "chat: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--mode", default="fixed", choices=("fixed", "dynamic"), help="SparseGrad mode (default fixed)")
    g.add_argument("--density", type=float, help="share of each MLP weight that trains (default 0.01)")
    g.add_argument("--n-params", type=int, help="entries that train per MLP layer (instead of --density)")
    g.add_argument("--rest", choices=RESTS,
                   help="'all': every non-MLP parameter trains too (the paper's GLUE; default); 'head': only the "
                        "task head; 'none': only the MLP part (default for chat)")
    g.add_argument("--targets", nargs="+", help="MLP module names or suffixes (default: per architecture), "
                                                "e.g. up_proj down_proj")
    g.add_argument("--blocks", help="which blocks: all (default), a list '0,3,6', or 'every:3' (every third, from "
                                    "block 0; 'every:3:1' from block 1)")
    g.add_argument("--lora-rank", type=int, help="LoRA rank (default: matched to the sparse trainable count)")
    g.add_argument("--bases", help="reuse bases saved by an earlier run (a bases.safetensors file)")
    g.add_argument("--bases-steps", type=int, default=11, help="preliminary-phase batches (default 11)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help="default: the task's (GLUE 20 as in the paper, bbcnews 2)")
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    g.add_argument("--batch-size", type=int, default=16, help="examples per process and micro-batch (default 16)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-ratio", type=float, default=0.06)
    g.add_argument("--patience", type=int, default=3, help="early stopping: evaluations without improvement (0: off)")
    g.add_argument("--eval-steps", type=int, help="evaluate every N steps (default: each epoch)")
    g.add_argument("--save-steps", type=int, help="also checkpoint every N steps (default: at each evaluation)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (default 0)")
    g.add_argument("--optimize", type=int, default=0, metavar="N",
                   help="first run N Optuna trials over lr and batch size, then the seeds with the best")
    g.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    g.add_argument("--cpu", action="store_true", help="train on the CPU even where CUDA is available")
    g = p.add_argument_group("chat")
    g.add_argument("--prompts", help="a JSONL prompt file (strings, {prompt}, {messages} or MT-Bench {turns}); the "
                                     "best model's answers go to generations.jsonl")
    g.add_argument("--max-prompts", type=int, help="answer only the first N prompts")
    g.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit (default 128)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsegrad", description="SparseGrad fine-tuning of transformer MLPs")
    sub = parser.add_subparsers(dest="command", required=True)

    ft = sub.add_parser("finetune", help="fine-tune and evaluate one model on one task with one method")
    ft.add_argument("--method", "--run-type", dest="method", default="sparsegrad",
                    help=f"{', '.join(METHODS)} (also accepted: {', '.join(METHOD_ALIASES)})")
    add_run_options(ft)
    ft.add_argument("--output-dir", help="where results go (default: sparsegrad-runs/<task>-<method>-<time>)")
    ft.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    ft.add_argument("--no-progress", action="store_true", help="no progress bars")

    cmp = sub.add_parser("compare", help="run several methods on the same task and seeds; one table")
    cmp.add_argument("--methods", nargs="+", default=["ft", "lora", "meprop", "sparsegrad"], choices=COMPARE_METHODS)
    add_run_options(cmp)
    cmp.add_argument("--output-dir", help="default: sparsegrad-runs/compare-<task>-<time>")
    cmp.add_argument("--resume", action="store_true", help="continue the comparison in --output-dir")
    cmp.add_argument("--no-progress", action="store_true")

    from .bench import BENCHES

    bench = sub.add_parser("bench", help="benchmarks: the paper's tables measured here, and the results page")
    kinds = bench.add_subparsers(dest="bench", required=True)
    for name, module in BENCHES.items():
        module.add_arguments(kinds.add_parser(name, help=module.__doc__.split("\n")[0],
                                              description=module.__doc__,
                                              formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def _run_config(args: argparse.Namespace):
    from .train import RunConfig

    return RunConfig(
        task=args.task, method=getattr(args, "method", "sparsegrad"), model=args.model, mode=args.mode,
        density=args.density, n_params=args.n_params, rest=args.rest, targets=args.targets, blocks=args.blocks,
        lora_rank=args.lora_rank, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, prompts=args.prompts, max_prompts=args.max_prompts,
        max_new_tokens=args.max_new_tokens,
        lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, max_length=args.max_length,
        patience=args.patience, eval_steps=args.eval_steps, save_steps=args.save_steps, data_dir=args.data_dir,
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        bases_steps=args.bases_steps, mixed_precision=args.mixed_precision, cpu=args.cpu,
    )


def _forwarded(argv: list[str]) -> list[str]:
    """compare's own argv minus what compare itself handles (methods, output dir, resume)."""
    out, skip = [], False
    for a in argv:
        if a in ("--methods", "--output-dir"):
            skip = True
            continue
        if a.startswith("--"):
            skip = False
        if skip or a == "--resume" or a.startswith(("--methods=", "--output-dir=")):
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    if argv[:2] in (["bench", "glue"], ["bench", "chat"]):  # options they do not know go on to `finetune`
        args, passthrough = parser.parse_known_args(argv)
    else:
        args, passthrough = parser.parse_args(argv), []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # weight loading; our own bars show the run
        from .experiment import run_compare, run_finetune

        if args.command == "bench":
            from .bench import BENCHES

            return BENCHES[args.bench].main(args, passthrough)
        if args.command == "finetune":
            cfg = _run_config(args)
            if args.resume and not args.output_dir:
                raise ValueError("--resume needs the --output-dir of the run to continue")
            if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args.output_dir:
                raise ValueError("several processes write one run: pass --output-dir (the same on every process)")
            out = Path(args.output_dir or f"sparsegrad-runs/{cfg.task}-{cfg.method}-{stamp}")
            summary = run_finetune(cfg, out, seeds=args.seeds, optimize_trials=args.optimize, bases=args.bases,
                                   resume=args.resume, progress=not args.no_progress)
        else:
            _run_config(args)  # option errors before any run starts
            if args.resume and not args.output_dir:
                raise ValueError("--resume needs the --output-dir of the comparison to continue")
            out = Path(args.output_dir or f"sparsegrad-runs/compare-{args.task}-{stamp}")
            summary = run_compare(args.methods, _forwarded(argv[1:]), out, resume=args.resume)
    except (ValueError, FileNotFoundError, ModuleNotFoundError, ImportError) as err:
        print(f"sparsegrad: error: {err}", file=sys.stderr)
        return 2
    from .experiment import markdown_table

    if int(os.environ.get("RANK", "0")) != 0:  # one table per command, from rank 0
        return 0
    print(markdown_table(summary["rows"]))
    print(f"\nresults: {out}/summary.json, {out}/summary.md", file=sys.stderr)
    if summary.get("failed"):
        print(f"sparsegrad: error: these methods failed: {', '.join(summary['failed'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
