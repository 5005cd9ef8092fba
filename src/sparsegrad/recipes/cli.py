"""The `sparsegrad` command line, built from the run configuration (config.py).

    sparsegrad finetune                      # offline default: MiniLM on BBC News, SparseGrad fixed
    sparsegrad finetune --task sst2 --data-dir glue/ --method lora --seeds 0 1 2
    sparsegrad compare --task mrpc --data-dir glue/ --methods ft lora meprop sparsegrad
    sparsegrad bench speed | layer | bases | glue --data-dir glue/ | chat | report
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from sparsegrad.util import DiskFullError

from .config import CommandOptions, RunConfig, add_arguments, from_args
from .methods import METHOD_LABELS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsegrad", description="SparseGrad fine-tuning of transformer MLPs")
    parser.add_argument("--version", action="version", version=f"sparsegrad {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    ft = sub.add_parser("finetune", help="fine-tune and evaluate one model on one task with one method")
    add_arguments(ft, RunConfig)
    add_arguments(ft, CommandOptions, group="command")

    cmp = sub.add_parser("compare", help="run several methods on the same task and seeds; one table")
    cmp.add_argument("--methods", nargs="+", default=["ft", "lora", "meprop", "sparsegrad"], choices=METHOD_LABELS,
                     help="method labels; sparsegrad-fixed / sparsegrad-dynamic pick the SparseGrad mode, "
                          "sparsegrad-block the fixed mode with --structure block "
                          "(default ft lora meprop sparsegrad)")
    add_arguments(cmp, RunConfig, skip=("method",))
    add_arguments(cmp, CommandOptions, group="command",
                  help={"output_dir": "where results go (default: sparsegrad-runs/compare-<task>-<time>)"})

    from ..bench import add_bench_commands  # the benchmarks plug in here; they build on the recipes

    add_bench_commands(sub.add_parser("bench", help="benchmarks: the paper's tables measured here, and the "
                                                    "results page"))
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sparsegrad-ft")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "(not installed)"


def reuse_story(cfg: RunConfig, out: Path, seed: int, adapter_bytes: int | None) -> str:
    """Where the adapter went and how to reuse it, in one line each."""
    from .kinds import kind_of
    from .tasks import get_task

    task = get_task(cfg.task)
    kind = kind_of(task)
    folder = out / f"seed-{seed}" / "adapter"
    size = f" ({adapter_bytes / 2**20:,.1f} MB)" if adapter_bytes else ""
    model = repr(cfg.model) if cfg.model else kind.default_model_call
    auto = kind.auto_model().__name__
    labels = f", num_labels={task.num_labels}" if task.kind == "classification" else ""
    return (f"adapter {folder}/{size}\n"
            f"reuse   sparsegrad.load_adapter({auto}.from_pretrained({model}{labels}), \"{folder}\")  "
            "# the fine-tuned model, a plain transformers one")


def _output_dir(options: CommandOptions, default: str) -> Path:
    if options.resume and not options.output_dir:
        raise ValueError("--resume needs the --output-dir of the command to continue")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not options.output_dir:
        raise ValueError("several processes write one run: pass --output-dir (the same on every process)")
    return Path(options.output_dir or default)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # weight loading; our own bars show the run
        if args.command == "bench":
            return args.bench_main(args)
        cfg, options = from_args(RunConfig, args), from_args(CommandOptions, args)
        if args.command == "finetune":
            from .experiment import run_finetune

            out = _output_dir(options, f"sparsegrad-runs/{cfg.task}-{cfg.method}-{stamp}")
            summary = run_finetune(cfg, out, seeds=options.seeds, optimize_trials=options.optimize,
                                   bases=options.bases, resume=options.resume, progress=not options.no_progress)
        else:
            from .compare import run_compare

            out = _output_dir(options, f"sparsegrad-runs/compare-{cfg.task}-{stamp}")
            summary = run_compare(args.methods, cfg, out, seeds=options.seeds, optimize_trials=options.optimize,
                                  bases=options.bases, resume=options.resume, progress=not options.no_progress)
    except PermissionError as err:  # an output folder (or a file in it) this user cannot write
        print(f"sparsegrad: error: cannot write {err.filename or 'the output folder'} (permission denied): choose "
              "another --output-dir, or make it writable", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, ModuleNotFoundError, ImportError, DiskFullError) as err:
        print(f"sparsegrad: error: {err}", file=sys.stderr)
        return 2
    from .results import markdown_table

    if int(os.environ.get("RANK", "0")) != 0:  # one table per command, from rank 0
        return 0
    print(markdown_table(summary.rows))
    print(f"\nresults {out}/summary.json (and summary.md); each run's: {out}/seed-<s>/results.json", file=sys.stderr)
    if args.command == "finetune" and summary.rows[0].status == "finished":
        print(reuse_story(cfg, out, options.seeds[0], summary.rows[0].adapter_bytes), file=sys.stderr)
    for row in summary.rows:
        if row.status != "finished":
            print(f"sparsegrad: error: {row.method} {row.status}: {row.message}", file=sys.stderr)
        elif row.not_learned:
            print(f"sparsegrad: warning: {row.method} ended at or below the baseline ({row.metric} "
                  f"{row.baseline:.4g}) with seed(s) {', '.join(map(str, row.not_learned))}: it learned nothing "
                  "there; try another --lr or more --epochs", file=sys.stderr)
    if summary.failed:
        print(f"sparsegrad: error: these methods failed: {', '.join(summary.failed)}", file=sys.stderr)
    return 1 if summary.failed or any(row.status != "finished" for row in summary.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
