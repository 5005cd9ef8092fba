"""Layer benchmark: forward + backward + optimizer step of one MLP linear, per method.

    sparsegrad bench layer [--tokens 2048] [--density 0.01] [--output-dir bench-results/layer]
    sparsegrad bench layer --fold        # the fold's cost: float32 in place against bfloat16 rebuilt
    sparsegrad bench layer --fold-7b     # the fold's FLOPs and time at LLaMA-2-7B MLP shapes, beside a forward
    sparsegrad bench layer --fold-role   # a role's layers folded one by one against together

Methods at equal trainable entries k = density * d_in * d_out: nn.Linear full
fine-tuning (torch AdamW), LoRA (peft, rank k / (d_in + d_out)), MeProp, and
SparseGrad `dynamic` / `fixed` (sparsegrad.optimizer). Each method runs in a
fresh process (in interleaved rounds, the fastest round kept) so that its
peak memory is its own: peak RSS above the process's RSS after imports on
CPU, max allocated on CUDA. "state" counts gradients,
optimizer state and the buffers a method adds, exactly; the bases U, V are
listed apart, since a model shares one pair across all blocks of a role.
Times are medians; every figure is also given as a ratio to full FT measured
in the same run.

The fixed mode's support comes from a synthetic energy whose rows and columns
decay like a spectrum (as real energies do, docs/method.md); the table reports how
many distinct rows / columns it touches, which sets the extra rotation cost.

`--fold` times the fold alone (the one that follows each optimizer step), per SparseGrad mode, with a float32
weight (the step's change added in place) and a bfloat16 one (rebuilt: W_0 given back by the weight,
the new sum rounded once; docs/method.md), beside the float32 training step (forward, backward,
optimizer step) it follows, and the share of W_0 entries kept apart after the steps.

`--fold-7b` counts the fold's arithmetic at LLaMA-2-7B's up_proj (4096->11008) and down_proj
(11008->4096), at 1% and at 100,000 entries, and times it once on the device, beside the layer's
forward at 512 and 4,096 tokens. The fold is W += U^T dS V with dS on k entries: a CSR product
over the r distinct indices of the support's cheaper side, then a dense (r x m) @ (m x n), about
2 (k n + r d_in d_out) FLOPs. The fixed support knows its r once and for all; the dynamic mode's
entries change every step, and its fold takes every row of the smaller side (r = min(d_in, d_out)) so
that no count is read back ("r counted": the fold over only the distinct rows the step touched, whose
count the host would have to read back each step).
The supports come from a synthetic spectral energy (bench layer's), so r is indicative.

`--fold-role` folds one step's change into every layer of one role (MiniLM's 6 up-projections, 384->1536;
RoBERTa-base's 12, 768->3072; 1% entries, float32), each layer alone (two products and their index work
per layer) against all together (one sparse and one batched dense product for the role), and counts the
operators each dispatches -- on a GPU each is a kernel launch -- beside the seconds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import sparsegrad
from sparsegrad import folding
from sparsegrad.layer import layer_class
from sparsegrad.util import write_json_atomic

from ..recipes.machine import machine
from ..recipes.memory import current_rss, peak_memory, reset_peak_memory, tensor_bytes
from ..recipes.methods import inject_lora, split_label
from ..recipes.process import run_in_process

METHODS = ("ft", "lora", "meprop", "sparsegrad-dynamic", "sparsegrad-fixed")
SHAPES = ((768, 3072), (3072, 768))  # BERT-base MLP: up and down projections


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=16 * 128, help="tokens per step (batch x sequence; default 2048)")
    p.add_argument("--density", type=float, default=0.01, help="trained share of each layer's entries")
    p.add_argument("--iters", type=int, default=10, help="timed steps per method (after 2 warm-up steps)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the fastest is kept")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fold", action="store_true", help="time the fold in float32 and bfloat16 instead")
    p.add_argument("--fold-7b", action="store_true", help="the fold's FLOPs and time at LLaMA-2-7B MLP shapes")
    p.add_argument("--fold-role", action="store_true", help="a role's layers folded one by one against together")
    p.add_argument("--output-dir", default="bench-results/layer")

def _timed(fn, device) -> float:
    """Seconds `fn` takes, the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _orthogonal(n: int, device) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, device=device))[0]


def _spectral_energy(d_in: int, d_out: int, device) -> torch.Tensor:
    """(d_in, d_out) energy with power-law row / column profiles and log-normal noise."""
    rows = torch.arange(1, d_in + 1, device=device, dtype=torch.float32) ** -1.0
    cols = torch.arange(1, d_out + 1, device=device, dtype=torch.float32) ** -1.0
    return rows[:, None] * cols[None, :] * torch.randn(d_in, d_out, device=device).exp()


def _build(method: str, d_in: int, d_out: int, k: int, device):
    """(module, optimizer, trainable count, extra info) for one method."""
    linear = nn.Linear(d_in, d_out, device=device)
    if method == "ft":
        return linear, torch.optim.AdamW(linear.parameters(), lr=1e-4), linear.weight.numel() + d_out, {}
    linear.bias.requires_grad_(False)  # as in LoRA: only the method's own entries train
    if method == "lora":
        rank = max(1, round(k / (d_in + d_out)))
        holder = nn.Module()
        holder.dense = linear
        inject_lora(holder, ["dense"], rank)
        params = [p for p in holder.parameters() if p.requires_grad]
        return holder.dense, torch.optim.AdamW(params, lr=1e-4), sum(p.numel() for p in params), {"rank": rank}
    options = split_label(method)
    mode = options.get("mode", options["method"])  # "meprop" or a SparseGrad mode
    kwargs = {} if mode == "meprop" else {"U": _orthogonal(d_in, device), "V": _orthogonal(d_out, device)}
    if mode == "fixed":
        kwargs |= {"energy": _spectral_energy(d_in, d_out, device), "structure": options.get("structure", "scattered")}
    layer = layer_class(mode).from_linear(linear, k=k, **kwargs)
    info = {}
    if mode == "fixed":
        info = {"support_rows": int(layer.rows.unique().numel()), "support_cols": int(layer.cols.unique().numel())}
    return layer, sparsegrad.optimizer(layer, lr=1e-4), sparsegrad.trainable_parameters(layer), info


def _state_bytes(module: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(gradients + optimizer state + buffers the method adds, the bases U and V), counted exactly.

    The bases are given apart: in a model one pair serves every block of a role.
    """
    bases = [getattr(module, name, None) for name in ("U", "V")]
    grads = tensor_bytes(p.grad for p in module.parameters())
    state = tensor_bytes(t for s in opt.state.values() for t in s.values())
    buffers = tensor_bytes(b for b in module.buffers() if not any(b is x for x in bases))
    return grads + state + buffers, tensor_bytes(bases)


def measure(spec: dict) -> dict:
    """In a fresh process: one (shape, method); peak memory above what the process held before."""
    import peft  # noqa: F401  (imports count before the baseline, not against a method)

    method, d_in, d_out = spec["method"], spec["d_in"], spec["d_out"]
    tokens, density, iters = spec["tokens"], spec["density"], spec["iters"]
    torch.manual_seed(0)
    dev = torch.device(spec["device"])
    reset_peak_memory(dev)
    base = current_rss() if dev.type == "cpu" else torch.cuda.memory_allocated(dev)
    k = max(1, round(density * d_in * d_out))
    module, opt, trainable, info = _build(method, d_in, d_out, k, dev)
    x = torch.randn(tokens, d_in, device=dev, requires_grad=True)
    dy = torch.randn(tokens, d_out, device=dev)

    def step() -> None:
        y = module(x)
        y.backward(dy)
        opt.step()
        opt.zero_grad(set_to_none=True)
        x.grad = None

    times = []
    for i in range(iters + 2):  # two warm-up steps
        seconds = _timed(step, dev)
        if i >= 2:
            times.append(seconds)
    y = module(x)  # state of a step in flight, for the exact count
    y.backward(dy)
    state, bases = _state_bytes(module, opt)
    peak = peak_memory(dev)[0] - base
    return {"method": method, "d_in": d_in, "d_out": d_out, "tokens": tokens, "k": k, "trainable": trainable,
            "step_s": statistics.median(times), "peak_bytes": peak, "state_bytes": state, "bases_bytes": bases,
            **info}


def run(args: argparse.Namespace) -> list[dict]:
    """Every (shape, method) in a fresh process, `repeats` interleaved rounds; best round kept."""
    if "ft" not in args.methods:
        raise ValueError("--methods: include ft, the baseline every ratio is taken against")
    best: dict[tuple, dict] = {}
    for round_ in range(args.repeats):
        for d_in, d_out in SHAPES:
            for method in args.methods:
                spec = {"method": method, "d_in": d_in, "d_out": d_out, "tokens": args.tokens,
                        "density": args.density, "iters": args.iters, "device": args.device}
                row = run_in_process("sparsegrad.bench.layer:measure", spec)
                key = (d_in, d_out, method)
                if key not in best or row["step_s"] < best[key]["step_s"]:
                    best[key] = row
                print(f"  round {round_ + 1}/{args.repeats} {d_in}->{d_out} {method}: {row['step_s'] * 1e3:.1f} ms",
                      file=sys.stderr, flush=True)
    rows = list(best.values())
    for row in rows:
        ref = best[(row["d_in"], row["d_out"], "ft")]
        row["time_vs_ft"] = row["step_s"] / ref["step_s"]
        row["peak_vs_ft"] = row["peak_bytes"] / ref["peak_bytes"] if ref["peak_bytes"] > 0 else None
        row["state_vs_ft"] = row["state_bytes"] / ref["state_bytes"]
    return rows


def table(rows: list[dict]) -> str:
    header = ("| shape | method | trainable | step ms | x full FT | peak MB | x full FT | state MB | x full FT "
              "| bases MB | note |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        note = f"rank {r['rank']}" if "rank" in r else (
            f"support {r['support_rows']} rows x {r['support_cols']} cols" if "support_rows" in r else "")
        peak_ratio = f"{r['peak_vs_ft']:.2f}" if r["peak_vs_ft"] is not None else ""
        lines.append(
            f"| {r['d_in']}->{r['d_out']} | {r['method']} | {r['trainable']:,} | {r['step_s'] * 1e3:.1f} | "
            f"{r['time_vs_ft']:.2f} | {r['peak_bytes'] / 2**20:.1f} | {peak_ratio} | "
            f"{r['state_bytes'] / 2**20:.2f} | {r['state_vs_ft']:.3f} | {r['bases_bytes'] / 2**20:.1f} | {note} |"
        )
    return "\n".join(lines)


def measure_fold(spec: dict) -> dict:
    """In a fresh process: one (shape, mode, dtype); median seconds of the fold and of the step before it."""
    torch.manual_seed(0)
    mode, d_in, d_out, dtype = spec["mode"], spec["d_in"], spec["d_out"], getattr(torch, spec["dtype"])
    dev = torch.device(spec["device"])
    k = max(1, round(spec["density"] * d_in * d_out))
    linear = nn.Linear(d_in, d_out, device=dev, dtype=dtype).requires_grad_(False)
    kwargs = {"U": _orthogonal(d_in, dev), "V": _orthogonal(d_out, dev)}
    if mode == "fixed":
        kwargs["energy"] = _spectral_energy(d_in, d_out, dev)
    layer = layer_class(mode).from_linear(linear, k=k, **kwargs)
    opt = sparsegrad.optimizer(layer, lr=1e-3)
    x = torch.randn(spec["tokens"], d_in, device=dev).to(dtype)
    dy = torch.randn(spec["tokens"], d_out, device=dev).to(dtype)
    steps, folds = [], []
    fold_layers = folding.fold_layers

    def timed_fold(*args, **kwargs):  # the fold the optimizer step's hook runs, timed apart from the step
        folds.append(_timed(lambda: fold_layers(*args, **kwargs), dev))

    folding.fold_layers = timed_fold
    try:
        for i in range(spec["iters"] + 1):
            start = time.perf_counter()
            layer(x).backward(dy)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            steps.append(time.perf_counter() - start - folds[-1])
    finally:
        folding.fold_layers = fold_layers  # (the tests call this in their own process)
    steps, folds = steps[1:], folds[1:]  # the first step warms up
    kept = layer.w0_index.numel() / layer.weight.numel() if layer.w0_index is not None else None
    return {"mode": mode, "dtype": spec["dtype"], "d_in": d_in, "d_out": d_out, "k": k,
            "fold_s": statistics.median(folds), "step_s": statistics.median(steps), "w0_kept_share": kept}


def run_fold(args: argparse.Namespace) -> list[dict]:
    rows = []
    for d_in, d_out in SHAPES:
        for mode in ("fixed", "dynamic"):
            for dtype in ("float32", "bfloat16"):
                spec = {"mode": mode, "dtype": dtype, "d_in": d_in, "d_out": d_out, "tokens": args.tokens,
                        "density": args.density, "iters": args.iters, "device": args.device}
                rows.append(run_in_process("sparsegrad.bench.layer:measure_fold", spec))
    for r in rows:
        ref = next(q for q in rows if (q["mode"], q["d_in"], q["dtype"]) == (r["mode"], r["d_in"], "float32"))
        r["fold_vs_float32_fold"] = r["fold_s"] / ref["fold_s"]
        r["fold_vs_float32_step"] = r["fold_s"] / ref["step_s"]
    return rows


def fold_table(rows: list[dict]) -> str:
    lines = ["| shape | mode | weight | fold ms | x float32 fold | x float32 step | W_0 kept apart |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        kept = f"{100 * r['w0_kept_share']:.2f}%" if r["w0_kept_share"] is not None else ""
        lines.append(f"| {r['d_in']}->{r['d_out']} | {r['mode']} | {r['dtype']} | {r['fold_s'] * 1e3:.1f} "
                     f"| {r['fold_vs_float32_fold']:.2f} | {r['fold_vs_float32_step']:.2f} | {kept} |")
    return "\n".join(lines)


LLAMA_MLP = (("up_proj", 4096, 11008), ("down_proj", 11008, 4096))


def measure_fold_7b(spec: dict) -> dict:
    """In a fresh process: one 7B-shape layer at one k; the fold's r, FLOPs and seconds per mode."""
    from sparsegrad.support import SupportPlan, fold, topk_support

    torch.manual_seed(0)
    dev = torch.device(spec["device"])
    d_in, d_out, k = spec["d_in"], spec["d_out"], spec["k"]
    U, V = _orthogonal(d_in, dev), _orthogonal(d_out, dev)
    weight = torch.zeros(d_out, d_in, device=dev)
    values = torch.randn(k, device=dev)
    row = {**spec}
    fixed = topk_support(_spectral_energy(d_in, d_out, dev), k)  # from the preliminary phase's energy
    step = topk_support(_spectral_energy(d_in, d_out, dev), k)  # a dynamic step's top-k of |U G V^T|
    for name, (rows, cols) in (("fixed", fixed), ("dynamic_counted", step)):
        plan = SupportPlan.build(rows, cols, d_in, d_out)
        r, (m, n) = plan.uniq_rows.numel(), ((d_out, d_in) if plan.transposed else (d_in, d_out))
        a, b = plan.sides(U, V)
        fold([weight], plan, values, a, b)  # warm-up
        row[f"{name}_r"], row[f"{name}_flops"] = r, 2 * (k * n + r * m * n)
        row[f"{name}_s"] = _timed(lambda plan=plan, a=a, b=b: fold([weight], plan, values, a, b), dev)
    flat = step[0] * d_out + step[1]
    every = SupportPlan.every_row(flat, d_in, d_out)
    a, b = every.sides(U, V)
    fold([weight], every, values, a, b)
    side = min(d_in, d_out)
    row["dynamic_r"] = side
    row["dynamic_flops"] = 2 * (k * max(d_in, d_out) + side * d_in * d_out)
    row["dynamic_s"] = _timed(lambda: fold([weight], every, values, a, b), dev)
    for t in (512, 4096):
        row[f"forward_{t}_flops"] = 2 * t * d_in * d_out
    x = torch.randn(512, d_in, device=dev)
    torch.nn.functional.linear(x, weight)
    row["forward_512_s"] = _timed(lambda: torch.nn.functional.linear(x, weight), dev)
    return row


def run_fold_7b(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, d_in, d_out in LLAMA_MLP:
        for label, k in (("1%", round(0.01 * d_in * d_out)), ("100k", 100_000)):
            spec = {"layer": name, "d_in": d_in, "d_out": d_out, "entries": label, "k": k, "device": args.device}
            rows.append(run_in_process("sparsegrad.bench.layer:measure_fold_7b", spec))
            print(f"  {name} {label}: fixed r={rows[-1]['fixed_r']}, dynamic r counted={rows[-1]['dynamic_counted_r']}",
                  file=sys.stderr, flush=True)
    return rows


def fold_7b_table(rows: list[dict]) -> str:
    lines = ["| layer | entries | mode | r | fold GFLOP | x forward at 512 | x forward at 4096 | fold s | x forward s at 512 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for mode, label in (("fixed", "fixed"), ("dynamic_counted", "dynamic, r counted"), ("dynamic", "dynamic, static")):
            flops = r[f"{mode}_flops"]
            lines.append(f"| {r['layer']} ({r['d_in']}->{r['d_out']}) | {r['entries']} ({r['k']:,}) | {label} "
                         f"| {r[f'{mode}_r']:,} | {flops / 1e9:,.1f} | {flops / r['forward_512_flops']:.2f} "
                         f"| {flops / r['forward_4096_flops']:.2f} | {r[f'{mode}_s']:.2f} "
                         f"| {r[f'{mode}_s'] / r['forward_512_s']:.1f} |")
    return "\n".join(lines)


ROLES = (("MiniLM up", 384, 1536, 6), ("RoBERTa-base up", 768, 3072, 12))


def measure_fold_role(spec: dict) -> dict:
    """In a fresh process: one role's layers and one mode; operators and seconds of folding them alone and together."""
    from sparsegrad.readbacks import ReadBackCounter
    from sparsegrad.support import SupportPlan, fold, topk_support

    torch.manual_seed(0)
    dev = torch.device(spec["device"])
    d_in, d_out, n, mode = spec["d_in"], spec["d_out"], spec["layers"], spec["mode"]
    k = round(0.01 * d_in * d_out)
    U, V = _orthogonal(d_in, dev), _orthogonal(d_out, dev)
    weights = [torch.zeros(d_out, d_in, device=dev) for _ in range(n)]
    values = [torch.randn(k, device=dev) for _ in range(n)]
    if mode == "fixed":  # each layer its own support (the energy's rows and columns shuffled), planned once
        energy = _spectral_energy(d_in, d_out, dev)
        plans = [SupportPlan.build(*topk_support(energy[torch.randperm(d_in)][:, torch.randperm(d_out)], k),
                                   d_in, d_out) for _ in range(n)]
        stacked = SupportPlan.stack(plans)  # kept while the supports are (folding.py)

        def alone():
            for w, p, v in zip(weights, plans, values):
                fold([w], p, v, *p.sides(U, V))

        def together():
            fold(weights, stacked, torch.cat(values), *stacked.sides(U, V))
    else:  # a step's top-k entries per layer, planned over every row at each fold
        flats = [torch.randperm(d_in * d_out, device=dev)[:k].sort().values for _ in range(n)]

        def alone():
            for w, f, v in zip(weights, flats, values):
                p = SupportPlan.every_row(f, d_in, d_out)
                fold([w], p, v, *p.sides(U, V))

        def together():
            p = SupportPlan.every_row(torch.cat([f + i * d_in * d_out for i, f in enumerate(flats)]), d_in, d_out, n)
            fold(weights, p, torch.cat(values), *p.sides(U, V))
    row = {key: spec[key] for key in ("role", "d_in", "d_out", "layers", "mode")} | {"k": k}
    for name, fn in (("alone", alone), ("together", together)):
        fn()  # warm-up
        with ReadBackCounter() as ops:
            fn()
        row[f"{name}_ops"], row[f"{name}_read_backs"] = ops.operators, ops.total
        row[f"{name}_s"] = statistics.median(_timed(fn, dev) for _ in range(spec["iters"]))
    return row


def run_fold_role(args: argparse.Namespace) -> list[dict]:
    rows = []
    for role, d_in, d_out, n in ROLES:
        for mode in ("fixed", "dynamic"):
            spec = {"role": role, "d_in": d_in, "d_out": d_out, "layers": n, "mode": mode, "device": args.device,
                    "iters": args.iters}
            rows.append(run_in_process("sparsegrad.bench.layer:measure_fold_role", spec))
            r = rows[-1]
            print(f"  {role} {mode}: {r['alone_ops']} -> {r['together_ops']} operators", file=sys.stderr, flush=True)
    return rows


def fold_role_table(rows: list[dict]) -> str:
    lines = ["| role | layers | mode | operators alone | operators together | s alone | s together | x faster |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['role']} ({r['d_in']}->{r['d_out']}) | {r['layers']} | {r['mode']} | {r['alone_ops']} "
                     f"| {r['together_ops']} | {r['alone_s'] * 1e3:.1f} ms | {r['together_s'] * 1e3:.1f} ms "
                     f"| {r['alone_s'] / r['together_s']:.2f} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.fold_role:
        rows = run_fold_role(args)
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "fold-role.json", {"meta": machine(args.device) | {"iters": args.iters}, "rows": rows})
        print(fold_role_table(rows))
        return 0
    if args.fold_7b:
        rows = run_fold_7b(args)
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "fold-7b.json", {"meta": machine(args.device), "rows": rows})
        print(fold_7b_table(rows))
        return 0
    if args.fold:
        rows = run_fold(args)
        meta = machine(args.device) | {"tokens": args.tokens, "density": args.density, "iters": args.iters}
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "fold.json", {"meta": meta, "rows": rows})
        print(fold_table(rows))
        return 0
    rows = run(args)
    meta = machine(args.device) | {"tokens": args.tokens, "density": args.density, "iters": args.iters,
                                    "repeats": args.repeats}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "layer.json", {"meta": meta, "rows": rows})
    (out / "layer.md").write_text(table(rows) + "\n")
    print(table(rows))
    return 0
