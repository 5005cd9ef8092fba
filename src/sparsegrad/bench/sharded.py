"""Sharded training (FSDP2) of LLaMA-2-7B shapes: what each process holds at 1, 2 and 4 processes, and
the projected memory per GPU of 7B and 70B at 8 GPUs.

    sparsegrad bench sharded                               # ft, lora, fixed, dynamic, meprop at 1, 2, 4 processes
    sparsegrad bench sharded --processes 1 2 --methods fixed lora

Each measurement runs under torchrun (gloo on CPU, NCCL with --device cuda) in fresh processes: a
decoder with LLaMA-2-7B's shapes and 2 blocks, random bfloat16 weights -- block 0 a target of the
paper's decoder setting (up_proj and down_proj at 1%), block 1 not: one block of each kind --, the
method applied, `sparsegrad.shard`, and `--steps` training steps on batch 1 of `--seq` random tokens
per process. Every rank counts the bytes it holds, by owner (block 0, block 1, the rest) and kind:
  sharded     its shards of the parameters, their gradients and optimizer state (S's tensor included)
  replicated  what FSDP does not shard: the fixed support's indices and last folded values (whole on
              every rank), the kept pretrained entries of its rows of low-precision weights (a few);
              and apart, the bases (a pair per role, whole on every rank)
and its peak RSS and seconds per step (on CPU, with the processes sharing its cores: a rough guide).
The bases are identity matrices with real ones' size, the fixed support comes from random energy:
what is measured is cost, not quality.

Projection per GPU (activations and FSDP's transient all-gather buffers, about two blocks' unsharded
parameters, not included), from the 1-process measurement:
  7B  (32 blocks, 11 targets):  (rest + 11 x target block + 21 x other block) sharded / G + replicated + bases
  70B (80 blocks, 27 targets):  the same, each part scaled by its count at 70B's shapes over 7B's
       (rest: embeddings; other block: its parameters; a target block's extra: its MLP layers' entries;
       bases: their entries) -- an extrapolation, not a measurement.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

from sparsegrad.util import write_json_atomic

from ..recipes.machine import machine
from ..recipes.process import run_in_process
from .llm import LLAMA2_7B, SHAPES, build_decoder, identity_bases

METHODS = ("ft", "lora", "fixed", "dynamic", "meprop")
TARGETS = ["up_proj", "down_proj"]
LLAMA2_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 32000}
MODELS = {"7B": (LLAMA2_7B, 32), "70B": (LLAMA2_70B, 80)}  # shapes, blocks; targets: every third block
GB = 2**30


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=2, help="training steps per measurement (the last is timed)")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--gpus", type=int, default=8, help="the GPU count the projection is for")
    p.add_argument("--shapes", default="llama2-7b", choices=SHAPES, help="tiny: checks the bench itself in seconds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output-dir", default="bench-results/sharded")


# ---------------------------------------------------------------- one measurement, under torchrun

def _owner(name: str) -> str:
    match = re.search(r"layers\.(\d+)\.", name)
    return f"block{match.group(1)}" if match else "rest"


def held_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Bytes this rank holds: {"sharded": {owner: bytes}, "replicated": {owner: bytes}, "bases": bytes}."""
    from torch.distributed.tensor import DTensor

    from sparsegrad import SparseGradLinear, sparse_layers

    out = {"sharded": {}, "replicated": {}}

    def add(name: str, t: torch.Tensor | None, sharded: bool) -> None:
        if t is not None:
            t = t.to_local() if isinstance(t, DTensor) else t
            kind = out["sharded" if sharded else "replicated"]
            kind[_owner(name)] = kind.get(_owner(name), 0) + t.numel() * t.element_size()

    for name, p in model.named_parameters():
        sharded = isinstance(p, DTensor)
        add(name, p, sharded)
        add(name, p.grad, sharded)
        for state in opt.state.get(p, {}).values():
            if torch.is_tensor(state) and state.ndim:
                add(name, state, sharded)
    bases = {id(t) for m in sparse_layers(model).values() if isinstance(m, SparseGradLinear) for t in (m.U, m.V)}
    seen = set()
    out["bases"] = 0
    for name, b in model.named_buffers():
        if id(b) in bases:
            out["bases"] += 0 if id(b) in seen else b.numel() * b.element_size()
            seen.add(id(b))
        elif not name.endswith("rotary_emb.inv_freq"):
            add(name, b, False)
    return out


def measure(spec: dict) -> dict | None:
    """One (method, processes) measurement; every rank measures, rank 0 returns them all."""
    import torch.distributed as dist

    from sparsegrad import optimizer, shard, sparsify_gradients
    from sparsegrad.targets import find_targets

    from ..recipes.memory import peak_memory, reset_peak_memory
    from ..recipes.methods import prepare

    device = torch.device(spec["device"])
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    if device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    torch.set_grad_enabled(True)
    method = spec["method"]
    model = build_decoder(2, spec.get("shapes", "llama2-7b"))
    kwargs = {"targets": TARGETS, "blocks": [0], "lora_rank": spec["lora_rank"]}
    if method in ("fixed", "dynamic"):
        kwargs |= {"bases": identity_bases(find_targets(model, TARGETS, blocks=[0])), "mode": method, "density": 0.01}
    elif method == "meprop":
        kwargs |= {"density": 0.01}
    info = prepare(model, "sparsegrad" if method in ("fixed", "dynamic") else method,
                   rest="all" if method == "ft" else "none", **kwargs)
    kwargs.clear()  # the energy goes: only the chosen support stays
    model.to(device).train()
    shard(model)
    opt = optimizer(model, lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (1, spec["seq"]), generator=torch.Generator().manual_seed(rank))
    ids = ids.to(device)
    reset_peak_memory(device)
    for step in range(spec["steps"]):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        sparsify_gradients(model)
        opt.step()  # and the fold
        if step == spec["steps"] - 1:
            held = held_bytes(model, opt)
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        seconds = time.perf_counter() - start
    peak, peak_kind = peak_memory(device)
    mine = {"rank": rank, **held, "peak_bytes": peak, "peak_kind": peak_kind, "step_s": seconds}
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    # The sharded model and its optimizer hold the process group: free them before the group goes. Left
    # to interpreter exit, gloo's threads were torn down out of order and the process aborted (about 1 run
    # in 10) after its result was already printed.
    del model, opt
    gc.collect()
    dist.destroy_process_group()
    if rank != 0:
        return None
    return {"method": method, "processes": len(ranks), "seq": spec["seq"], "device": spec["device"],
            "shapes": spec.get("shapes", "llama2-7b"), "trainable": info.trainable, "lora_rank": info.lora_rank,
            "ranks": ranks}


# ---------------------------------------------------------------- the benchmark

def per_process(row: dict) -> dict:
    """The largest rank's bytes of a measurement: sharded, replicated, bases, their total; peak and step time."""
    def total(r):
        return sum(r["sharded"].values()) + sum(r["replicated"].values()) + r["bases"]

    big = max(row["ranks"], key=total)
    return {"sharded": sum(big["sharded"].values()), "replicated": sum(big["replicated"].values()),
            "bases": big["bases"], "total": total(big), "peak_bytes": max(r["peak_bytes"] for r in row["ranks"]),
            "step_s": max(r["step_s"] for r in row["ranks"])}


def _counts(shapes: dict, n_blocks: int) -> dict:
    """Parameter counts of a LLaMA decoder of these shapes (untied head) and its MLP / bases sizes."""
    h, m = shapes["hidden_size"], shapes["intermediate_size"]
    kv = h // shapes["num_attention_heads"] * shapes["num_key_value_heads"]
    block = 2 * h * h + 2 * h * kv + 3 * h * m + 2 * h
    return {"block": block, "mlp_layer": h * m, "bases": 2 * (h * h + m * m), "rest": 2 * shapes["vocab_size"] * h + h,
            "blocks": n_blocks, "targets": math.ceil(n_blocks / 3)}


def project(row: dict, gpus: int) -> dict:
    """Bytes per GPU at `gpus` GPUs for 7B and 70B (see the module's notes), from a 1-process measurement."""
    rank = row["ranks"][0]
    s, r = rank["sharded"], rank["replicated"]
    other_s, target_s = s.get("block1", 0), s.get("block0", 0)
    other_r, target_r = r.get("block1", 0), r.get("block0", 0)
    base = _counts(SHAPES[row.get("shapes", "llama2-7b")], 2)  # what was measured
    out = {}
    for name, (shapes, n) in MODELS.items():
        c = _counts(shapes, n)
        block, layer = c["block"] / base["block"], c["mlp_layer"] / base["mlp_layer"]
        # a target block: an other block's bytes (scaled by its parameters) and the method's extra (by its entries)
        per_target_s = other_s * block + (target_s - other_s) * (layer if row["method"] != "ft" else block)
        sharded = (s.get("rest", 0) * c["rest"] / base["rest"] + c["targets"] * per_target_s
                   + (c["blocks"] - c["targets"]) * other_s * block)
        replicated = (r.get("rest", 0) + c["targets"] * (other_r * block + (target_r - other_r) * layer)
                      + (c["blocks"] - c["targets"]) * other_r * block)
        bases = rank["bases"] * c["bases"] / base["bases"]
        out[name] = {"sharded_per_gpu": sharded / gpus, "replicated": replicated, "bases": bases,
                     "total_per_gpu": sharded / gpus + replicated + bases}
    return out


def run(args: argparse.Namespace) -> dict:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"sharded-{args.device}" + ("" if args.shapes == "llama2-7b" else f"-{args.shapes}")
    path = out / f"{name}.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []  # resumes: finished rows are kept
    have = {(r["method"], r["processes"], r["seq"]) for r in rows}
    specs = [{"method": m, "processes": n, "seq": args.seq, "steps": args.steps, "lora_rank": args.lora_rank,
              "device": args.device, "shapes": args.shapes} for m in args.methods for n in args.processes]
    for i, spec in enumerate(specs, 1):
        if (spec["method"], spec["processes"], spec["seq"]) in have:
            continue
        row = run_in_process("sparsegrad.bench.sharded:measure", spec, processes=spec["processes"])
        rows.append(row)
        p = per_process(row)
        print(f"  [{i}/{len(specs)}] {row['method']} x{row['processes']}: {p['total'] / GB:.2f} GB per process "
              f"(sharded {p['sharded'] / GB:.2f}, replicated {p['replicated'] / GB:.3f}, bases {p['bases'] / GB:.2f}), "
              f"peak {p['peak_bytes'] / GB:.2f} GB, {p['step_s']:.1f} s/step", file=sys.stderr, flush=True)
        write_json_atomic(path, _result(args, rows))  # after every row: an interrupted run resumes
    result = _result(args, rows)
    write_json_atomic(path, result)
    (out / f"{name}.md").write_text(markdown(result) + "\n")
    return result


def _result(args: argparse.Namespace, rows: list[dict]) -> dict:
    projections = {r["method"]: project(r, args.gpus) for r in rows if r["processes"] == 1}
    meta = {"seq": args.seq, "steps": args.steps, "lora_rank": args.lora_rank, "gpus": args.gpus,
            "shapes": args.shapes, "config": SHAPES[args.shapes], "blocks": 2,
            "targets": "up_proj, down_proj of block 0 (1%)"}
    return {"meta": machine(args.device) | meta, "rows": rows, "projections": projections}


def markdown(result: dict) -> str:
    rows = sorted(result["rows"], key=lambda r: (METHODS.index(r["method"]), r["processes"]))
    lines = ["| method | processes | GB per process | sharded | replicated | bases | x 1 process | peak GB | s/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = per_process(r)
        one = next((per_process(q) for q in rows if q["method"] == r["method"] and q["processes"] == 1), None)
        ratio = f"{p['total'] / one['total']:.2f}" if one else ""
        lines.append(f"| {r['method']} | {r['processes']} | {p['total'] / GB:.3f} | {p['sharded'] / GB:.3f} "
                     f"| {p['replicated'] / GB:.4f} | {p['bases'] / GB:.2f} | {ratio} | {p['peak_bytes'] / GB:.2f} "
                     f"| {p['step_s']:.1f} |")
    gpus = result["meta"]["gpus"]
    lines += ["", (f"Projected per GPU at {gpus} GPUs (parameters, gradients, optimizer state, method state; "
                   "activations and FSDP's all-gather buffers apart):"), "",
              "| method | 7B: GB per GPU | sharded | replicated | bases | 70B: GB per GPU | sharded | replicated | bases |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method in sorted(result["projections"], key=METHODS.index):
        cells = []
        for model in MODELS:
            p = result["projections"][method][model]
            cells += [f"{p['total_per_gpu'] / GB:.2f}", f"{p['sharded_per_gpu'] / GB:.2f}",
                      f"{p['replicated'] / GB:.3f}", f"{p['bases'] / GB:.2f}"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    print(markdown(result))
    return 0
