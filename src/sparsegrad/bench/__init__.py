"""Benchmarks behind `sparsegrad bench ...`: each module has add_arguments(parser) and main(args, passthrough).

    layer   one MLP linear per method (python -m sparsegrad.bench.layer)
    speed   whole models per method: steps/s, peak memory, training-state bytes (Tables 3, 7, 8)
    bases   the preliminary phase: streaming Gram sums against unfold-and-SVD
    glue    methods x GLUE tasks x seeds and the sparsity ablation (Tables 4, 11, 12)
    chat    instruction tuning of the embedded decoder per method (Table 6)
    report  docs/results.md and the pictures, from the JSON the others wrote
"""
from __future__ import annotations

from . import bases, chat, glue, report, speed

BENCHES = {"speed": speed, "bases": bases, "glue": glue, "chat": chat, "report": report}
