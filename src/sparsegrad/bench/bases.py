"""The preliminary phase's cost: streaming Gram sums + eigh against unfold-and-SVD (docs/method.md).

    sparsegrad bench bases                       # BERT-base MLP shapes, 132 slices per role, both paths
    sparsegrad bench bases --llama-slices 120    # also LLaMA-2-7B's 4096x11008, streaming only

Each path runs in a fresh process over the same gradient slices G_n (d_in, d_out) of both MLP
roles (up: d -> 4d, down: 4d -> d); the slices are generated on the fly (random, seeded per slice)
and their generation is not timed. Reported per path: seconds (Gram sums or stacking + SVD, then
the eigen/singular vectors) and peak RSS above the process's RSS before the first slice.
"streaming-eigh32" runs the eigendecompositions in float32 (the Gram sums stay float64).
The Gram floor is 2 * N * d_in * d_out * (d_in + d_out) flops at the float32 matmul rate measured
in the same process; "x floor" is the streaming time over it. The two paths' subspaces agree:
|<u_i, u'_i>| for the leading vectors is reported.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from sparsegrad.basis import GramAccumulator, hosvd_unfold
from sparsegrad.util import write_json_atomic

from ..recipes.machine import machine
from ..recipes.memory import peak_rss, reset_peak_rss
from ..recipes.process import run_in_process

BERT_BASE = {"up": (768, 3072), "down": (3072, 768)}
LLAMA2_7B = {"up": (4096, 11008), "down": (11008, 4096)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slices", type=int, default=132,
                   help="gradient slices per role at BERT-base shapes (the paper: 132; 0: skip)")
    p.add_argument("--llama-slices", type=int, default=0,
                   help="also stream LLaMA-2-7B shapes with this many slices per role (the paper: 120)")
    p.add_argument("--no-unfold", action="store_true", help="skip the unfold-and-SVD path")
    p.add_argument("--output-dir", default="bench-results/bases")


def _slice(n: int, d_in: int, d_out: int) -> torch.Tensor:
    """A gradient-like slice: X^T dY of 64 random tokens plus noise, seeded by n."""
    g = torch.Generator().manual_seed(n)
    x, dy = torch.randn(64, d_in, generator=g), torch.randn(64, d_out, generator=g)
    return x.t() @ dy + 0.1 * torch.randn(d_in, d_out, generator=g)  # (d_in, 64) @ (64, d_out)


def matmul_gflops(d_in: int, d_out: int, reps: int = 5) -> float:
    """float32 GEMM rate of the Gram products on this machine: the best of `reps` timed G G^T + G^T G."""
    g = torch.randn(d_in, d_out)
    a, b = torch.empty(d_in, d_in), torch.empty(d_out, d_out)
    best = float("inf")
    for _ in range(reps + 1):
        start = time.perf_counter()
        torch.mm(g, g.t(), out=a)
        torch.mm(g.t(), g, out=b)
        best = min(best, time.perf_counter() - start)
    return 2 * d_in * d_out * (d_in + d_out) / best / 1e9


def measure(path: str, shapes: dict, n: int) -> dict:
    """One path over every role: {"seconds", "peak_bytes", "vectors"}."""
    reset_peak_rss()
    base = peak_rss()
    seconds, vectors = 0.0, {}
    for role, (d_in, d_out) in shapes.items():
        if path.startswith("streaming"):
            acc = GramAccumulator(d_in, d_out)
            for i in range(n):
                g = _slice(i, d_in, d_out)
                start = time.perf_counter()
                acc.add(g)
                seconds += time.perf_counter() - start
                del g
            start = time.perf_counter()
            U, V, _, _ = acc.bases(eigh_dtype=torch.float32 if path == "streaming-eigh32" else torch.float64)
            seconds += time.perf_counter() - start
            del acc
        else:
            stacked = torch.empty(n, d_in, d_out)
            for i in range(n):
                stacked[i] = _slice(i, d_in, d_out)
            start = time.perf_counter()
            U, V = hosvd_unfold(stacked)
            seconds += time.perf_counter() - start
            del stacked
        vectors[role] = (U[:8].clone(), V[:8].clone())
        del U, V
    return {"seconds": seconds, "peak_bytes": peak_rss() - base, "vectors": vectors}


def _worker(spec: dict) -> None:
    shapes = {role: tuple(s) for role, s in spec["shapes"].items()}
    d_in, d_out = next(iter(shapes.values()))
    rate = matmul_gflops(d_in, d_out)  # first, in a quiet process
    r = measure(spec["path"], shapes, spec["n"])
    torch.save(r["vectors"], spec["vectors"])
    print(json.dumps({"seconds": r["seconds"], "peak_bytes": r["peak_bytes"], "gflops": rate}))


def gram_flops(shapes: dict, n: int) -> float:
    return sum(2 * n * d_in * d_out * (d_in + d_out) for d_in, d_out in shapes.values())


def run(args: argparse.Namespace) -> dict:
    if args.slices < 0 or args.llama_slices < 0 or not (args.slices or args.llama_slices):
        raise ValueError("--slices / --llama-slices: slices per role, >= 0, at least one of them positive")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    cases = [("bert-base", BERT_BASE, args.slices,
              ["streaming", "streaming-eigh32"] + ([] if args.no_unfold else ["unfold"]))] if args.slices else []
    if args.llama_slices:
        cases.append(("llama-2-7b", LLAMA2_7B, args.llama_slices, ["streaming-eigh32"]))
    measured = {name for name, *_ in cases}
    previous = out / "bases.json"  # rows of shapes not measured now are kept (BERT-base and LLaMA in two sittings)
    kept = [r for r in json.loads(previous.read_text())["rows"] if r["shapes"] not in measured] \
        if previous.is_file() else []
    for name, shapes, n, paths in cases:
        found = {}
        for path in paths:
            print(f"{name}: {path}, {n} slices per role", file=sys.stderr, flush=True)
            r = run_in_process("sparsegrad.bench.bases:measure_path",
                               {"path": path, "shapes": shapes, "n": n, "vectors": str(out / f"vectors-{name}-{path}.pt")})
            floor = gram_flops(shapes, n) / (r["gflops"] * 1e9)
            row = {"shapes": name, "path": path, "slices": n, "seconds": r["seconds"], "peak_bytes": r["peak_bytes"],
                   "matmul_gflops": r["gflops"], "gram_floor_s": floor, "x_floor": r["seconds"] / floor,
                   "stacked_bytes": sum(4 * n * a * b for a, b in shapes.values()),
                   "gram_bytes": sum(8 * (a * a + b * b) for a, b in shapes.values())}
            found[path] = torch.load(out / f"vectors-{name}-{path}.pt")
            (out / f"vectors-{name}-{path}.pt").unlink()
            rows.append(row)
        if "unfold" in found:  # leading vectors of each path against unfold-and-SVD, up to sign
            for row in rows[-len(found):]:
                row["leading_vectors_min_abs_cos"] = min(
                    float((a[i] * b[i]).sum().abs()) for role in found["unfold"]
                    for a, b in zip(found[row["path"]][role], found["unfold"][role]) for i in range(4))
    by = {(r["shapes"], r["path"]): r for r in rows}
    for r in rows:
        ref = by.get((r["shapes"], "unfold"))
        if ref:
            r["time_vs_unfold"], r["peak_vs_unfold"] = r["seconds"] / ref["seconds"], r["peak_bytes"] / ref["peak_bytes"]
    result = {"meta": machine("cpu"), "rows": kept + rows}
    write_json_atomic(out / "bases.json", result)
    (out / "bases.md").write_text(markdown(result) + "\n")
    return result


def markdown(result: dict) -> str:
    lines = [("| shapes | path | slices/role | seconds | x unfold | peak MB | x unfold | Gram floor s | x floor "
              "| stacked slices MB | Gram sums MB | leading vectors vs unfold (min abs cos) |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['shapes']} | {r['path']} | {r['slices']} | {r['seconds']:.1f} | "
                     f"{r.get('time_vs_unfold', float('nan')):.2f} | {r['peak_bytes'] / 2**20:,.0f} | "
                     f"{r.get('peak_vs_unfold', float('nan')):.2f} | {r['gram_floor_s']:.1f} | {r['x_floor']:.2f} | "
                     f"{r['stacked_bytes'] / 2**20:,.0f} | {r['gram_bytes'] / 2**20:,.0f} | "
                     f"{r.get('leading_vectors_min_abs_cos', float('nan')):.4f} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    print(markdown(run(args)))
    return 0
