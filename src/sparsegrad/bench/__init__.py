"""Benchmarks behind `sparsegrad bench ...`: each module has add_arguments(parser) and main(args).

    gpu     the prepared GPU check: CUDA tests, then steps/s, peak and read-backs per method (eager, compiled)
    layer   one MLP linear per method: the kernels alone
    speed   whole models per method: steps/s, peak memory, training-state bytes (Tables 3, 7, 8)
    llm     LLaMA-2-7B shapes in bfloat16: peak memory and state per method, projected to 32 blocks
    sharded FSDP2 at 1, 2, 4 processes: bytes per process, projected per GPU for 7B and 70B
    bases   the preliminary phase: streaming Gram sums against unfold-and-SVD
    support the fixed mode's supports, scattered and block: FLOPs, CPU step time, energy kept
    glue    methods x GLUE tasks, each at its own lr, PEFT and paper settings, and the levers (Table 4)
    chat    instruction tuning of the embedded decoder per method (Table 6)
    adapter the peft adapter's size, bases embedded or by reference, against LoRA
    report  docs/results.md and the pictures, from the JSON the others wrote

They build on the library and the recipes; neither imports them.
"""
from __future__ import annotations

import argparse

from . import adapter, bases, chat, glue, gpu, layer, llm, report, sharded, speed, support

BENCHES = {"gpu": gpu, "layer": layer, "speed": speed, "llm": llm, "sharded": sharded, "bases": bases,
           "support": support, "glue": glue, "chat": chat, "adapter": adapter, "report": report}


def add_bench_commands(parser: argparse.ArgumentParser) -> None:
    """`bench <name>` subcommands; each sets args.bench_main to its module's main."""
    kinds = parser.add_subparsers(dest="bench", required=True)
    for name, module in BENCHES.items():
        p = kinds.add_parser(name, help=module.__doc__.split("\n")[0], description=module.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(bench_main=module.main)
