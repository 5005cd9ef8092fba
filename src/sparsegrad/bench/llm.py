"""LLaMA-2-7B shapes on one device: peak memory and training state per method, projected to 32 blocks.

    sparsegrad bench llm                                   # 1, 2, 4 blocks; every method; checkpointing off and on
    sparsegrad bench llm --blocks 1 2 --checkpointing off  # a shorter run

A decoder with LLaMA-2-7B's shapes (hidden 4096, MLP 11008, 32 heads, vocabulary 32000) and N
blocks, random weights in bfloat16, is built in a fresh process per measurement, which runs
`--steps` training steps on batch 1 of `--seq` random tokens (the last one measured) and reports:
  - peak memory of the training steps: the CUDA allocator's peak, or on CPU the peak RSS (which
    includes the model: every method holds the same frozen weights);
  - training state in bytes, as `bench speed` counts it: gradients, optimizer state and every
    tensor the method adds beyond the frozen model (bases apart);
  - seconds per step (on CPU only a rough guide).
Methods: full FT (every weight trains), LoRA (rank 32, the paper's), SparseGrad fixed and dynamic
with the paper's 100,000 entries per layer and with 1% of each layer. Targets: `paper` = up_proj
and down_proj of every third block (the paper's Table 6), `all` = gate, up and down of every block.
The bases are identity matrices (orthogonal, with the memory and arithmetic of real ones: dense
float32 per role) and the fixed support comes from random energy: what is measured here is cost,
not quality.

Projection to 32 blocks. Each target series is measured with N = 1, 2, 4 blocks, every block a
target; the slope per block of a least-squares line through N gives the cost of one more target
block. For `paper`, a second series converts block 0 only (N = 2, 4) and gives the slope of a
block that is not a target. Then, per method:
    all:   at 32 = at 1 + 31 x slope(target block)
    paper: at 32 = at 1 + 10 x slope(target block) + 21 x slope(other block)    (11 of 32 targets)
and says whether that fits in 24 GB and in 80 GB.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch

from sparsegrad import Bases, optimizer
from sparsegrad.sparse_linear import in_out_features
from sparsegrad.targets import find_targets, role_of
from sparsegrad.util import write_json_atomic

from ..recipes.machine import machine
from ..recipes.memory import peak_memory, reset_peak_memory
from ..recipes.methods import prepare
from ..recipes.process import WorkerError, run_in_process, threads_per_worker
from .speed import training_state

LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096}
SHAPES = {"llama2-7b": LLAMA2_7B,  # and a small one for smoke tests
          "tiny": {"hidden_size": 64, "intermediate_size": 172, "num_attention_heads": 4, "num_key_value_heads": 4,
                   "vocab_size": 1000, "max_position_embeddings": 512}}
PAPER_N_PARAMS = {"llama2-7b": 100_000, "tiny": 1_000}  # the "-100k" methods' entries per layer
FULL_BLOCKS, PAPER_TARGET_BLOCKS = 32, 11  # every third of 32 blocks: 0, 3, ..., 30
METHODS = ("ft", "lora", "fixed-100k", "fixed-1pct", "dynamic-100k", "dynamic-1pct")
TARGETS = {"paper": ["up_proj", "down_proj"], "all": ["gate_proj", "up_proj", "down_proj"]}
GB = 2**30


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 4], help="block counts N (at least two)")
    p.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=("off", "on"))
    p.add_argument("--shapes", default="llama2-7b", choices=SHAPES)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=2, help="training steps per measurement (the last is timed)")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=1,
                   help="measurements at a time, each in its own process: on CUDA each peak stays its own process's "
                        "(the allocator's), only the step times share the device; on CPU keep 1 (peak RSS, threads)")
    p.add_argument("--output-dir", default="bench-results/llm")


# ---------------------------------------------------------------- one measurement, in its own process

def build_decoder(n_blocks: int, shapes: str = "llama2-7b", device: str = "cpu") -> torch.nn.Module:
    """LLaMA-2-7B's shapes with n_blocks blocks, random bfloat16 weights made on `device` in bfloat16 (no float32
    detour; on a GPU the random init takes no CPU time)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=n_blocks, tie_word_embeddings=False, use_cache=False, **SHAPES[shapes])
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)


def identity_bases(layers: dict[str, torch.nn.Module]) -> Bases:
    """Orthogonal bases with real ones' size and arithmetic (one float32 pair per role), random energy."""
    g = torch.Generator().manual_seed(0)
    U, V, names, energy = {}, {}, {}, {}
    for name, module in layers.items():
        d_in, d_out = in_out_features(module)
        role = names[name] = role_of(name)
        U.setdefault(role, torch.eye(d_in))
        V.setdefault(role, torch.eye(d_out))
        energy[name] = torch.rand(d_in, d_out, generator=g)
    return Bases(U, V, names, energy, {"n_steps": 0, "kind": "identity"})


def measure(spec: dict) -> dict:
    """One (method, targets, blocks, checkpointing) measurement in this process."""
    torch.set_grad_enabled(True)
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    device = torch.device(spec["device"])
    method, _, size = spec["method"].partition("-")
    model = build_decoder(spec["n_blocks"], spec["shapes"], spec["device"])
    blocks = [0] if spec["block0_only"] else None
    kwargs = {}
    if method in ("fixed", "dynamic"):
        kwargs = {"bases": identity_bases(find_targets(model, TARGETS[spec["targets"]], blocks=blocks)),
                  "mode": method, **({"n_params": PAPER_N_PARAMS[spec["shapes"]]} if size == "100k" else {"density": 0.01})}
    info = prepare(model, "sparsegrad" if method in ("fixed", "dynamic") else method, rest="all" if method == "ft" else "none",
                   targets=TARGETS[spec["targets"]], blocks=blocks, lora_rank=spec["lora_rank"], **kwargs)
    kwargs.clear()  # the energy goes: only the chosen support stays
    if spec["checkpointing"]:
        # transformers 5's name; its older releases have only the alias gradient_checkpointing_enable
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model.to(device).train()
    opt = optimizer(model, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, spec["seq"]), generator=g).to(device)
    reset_peak_memory(device)
    for step in range(spec["steps"]):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        if step == spec["steps"] - 1:
            state = training_state(model, opt)
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            model(input_ids=ids[:, :1])  # a forward: the step's fold is done before the peak is read
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peak, peak_kind = peak_memory(device)
    w0_kept = [(int(m.w0_index.numel()), m.weight.numel()) for m in model.modules() if getattr(m, "w0_index", None) is not None]
    return {**{k: spec[k] for k in ("method", "targets", "n_blocks", "block0_only", "checkpointing", "seq", "shapes")},
            "device": str(device), "peak_bytes": peak, "peak_kind": peak_kind, "step_s": seconds,
            "trainable": info.trainable, "target_layers": info.target_layers, "lora_rank": info.lora_rank,
            "w0_kept_share": sum(a for a, _ in w0_kept) / max(1, sum(b for _, b in w0_kept)), **state}


# ---------------------------------------------------------------- the benchmark

def _slope(rows: list[dict], field: str) -> tuple[float, float]:
    """(value at the smallest N, least-squares slope per block) through the rows' (n_blocks, field)."""
    xs = [r["n_blocks"] for r in rows]
    ys = [r[field] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    first = min(rows, key=lambda r: r["n_blocks"])
    return first[field] + slope * (1 - first["n_blocks"]), slope


def project(rows: list[dict]) -> list[dict]:
    """Each (method, targets, checkpointing) projected to 32 blocks (see the module's notes)."""
    out = []
    keys = dict.fromkeys((r["method"], r["targets"], r["checkpointing"]) for r in rows)
    for method, targets, ckpt in keys:
        series = [r for r in rows if (r["method"], r["targets"], r["checkpointing"]) == (method, targets, ckpt)]
        every = [r for r in series if not r["block0_only"]]
        if len({r["n_blocks"] for r in every}) < 2:
            continue
        proj = {"method": method, "targets": targets, "checkpointing": ckpt}
        for field in ("peak_bytes", "state_bytes"):
            at1, per_target = _slope(every, field)
            if targets == "paper" and method != "ft":
                others = [r for r in series if r["block0_only"] or r["n_blocks"] == 1]
                if len({r["n_blocks"] for r in others}) < 2:
                    break
                _, per_other = _slope(others, field)
                value = at1 + (PAPER_TARGET_BLOCKS - 1) * per_target + (FULL_BLOCKS - PAPER_TARGET_BLOCKS) * per_other
                proj[f"{field}_per_other_block"] = per_other
            else:
                value = at1 + (FULL_BLOCKS - 1) * per_target
            proj[f"{field}_per_target_block"] = per_target
            proj[f"{field}_32"] = value
        else:
            proj["fits_24gb"], proj["fits_80gb"] = proj["peak_bytes_32"] <= 24 * GB, proj["peak_bytes_32"] <= 80 * GB
            out.append(proj)
    for p in out:  # ratios to LoRA on the same targets and checkpointing
        lora = next((q for q in out if q["method"] == "lora" and q["targets"] == p["targets"]
                     and q["checkpointing"] == p["checkpointing"]), None)
        for field in ("peak_bytes_32", "state_bytes_32"):
            p[f"{field}_vs_lora"] = p[field] / lora[field] if lora and lora[field] else None
    return out


def _specs(args: argparse.Namespace):
    threads = threads_per_worker(args.workers, "measurements")
    for targets in args.targets:
        for method in args.methods:
            if method == "ft" and targets != args.targets[0]:
                continue  # full FT trains every weight: one series serves both target sets
            for ckpt in args.checkpointing:
                series = [(n, False) for n in args.blocks]
                if targets == "paper" and method != "ft":
                    series += [(n, True) for n in args.blocks if n > 1]
                for n, block0_only in series:
                    yield {"method": method, "targets": "all" if method == "ft" else targets, "n_blocks": n,
                           "block0_only": block0_only, "checkpointing": ckpt == "on", "seq": args.seq,
                           "steps": args.steps, "lora_rank": args.lora_rank, "device": args.device,
                           "shapes": args.shapes, "threads": threads}


def run(args: argparse.Namespace) -> dict:
    if len(set(args.blocks)) < 2 or min(args.blocks) < 1:
        raise ValueError(f"--blocks {args.blocks}: give at least two different block counts >= 1 for the slope")
    specs = list(_specs(args))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"llm-{args.device}" + ("" if args.shapes == "llama2-7b" else f"-{args.shapes}")
    path = out / f"{name}.json"
    done = json.loads(path.read_text())["rows"] if path.is_file() else []  # resumes: finished rows are kept

    def key(s):
        return tuple(s[k] for k in ("method", "targets", "n_blocks", "block0_only", "checkpointing", "seq", "device",
                                    "shapes"))

    have = {key(r) for r in done}
    rows = list(done)
    todo = [s for s in specs if key(s) not in have]
    failed = []
    with ThreadPoolExecutor(max_workers=args.workers) as pool:  # threads only wait: each measurement is a process
        futures = [pool.submit(run_in_process, "sparsegrad.bench.llm:measure", s) for s in todo]
        for future in as_completed(futures):
            try:
                row = future.result()
            except WorkerError as e:  # one failed measurement (say, out of memory) leaves the others standing
                failed.append(str(e))
                print(f"  failed: {e}", file=sys.stderr, flush=True)
                continue
            rows.append(row)
            print(f"  [{len(rows)}/{len(specs)}] {row['method']} {row['targets']} N={row['n_blocks']}"
                  f"{' (block 0 only)' if row['block0_only'] else ''} ckpt={'on' if row['checkpointing'] else 'off'}: "
                  f"peak {row['peak_bytes'] / GB:.2f} GB, state {row['state_bytes'] / GB:.3f} GB, "
                  f"{row['step_s']:.2f} s/step", file=sys.stderr, flush=True)
            write_json_atomic(path, _result(args, rows))  # after every row: an interrupted run resumes
    order = {key(s): i for i, s in enumerate(specs)}
    rows.sort(key=lambda r: order.get(key(r), -1))  # the table in the specs' order, whatever finished first
    if failed:
        raise WorkerError(f"{len(failed)} of {len(todo)} measurements failed (the others are kept in {path}; a rerun "
                          f"measures only the missing ones); the first:\n{failed[0]}")
    result = _result(args, rows)
    write_json_atomic(path, result)
    (out / f"{name}.md").write_text(markdown(result) + "\n")
    return result


def _result(args: argparse.Namespace, rows: list[dict]) -> dict:
    meta = {"seq": args.seq, "steps": args.steps, "lora_rank": args.lora_rank, "shapes": args.shapes,
            "workers": args.workers,
            "config": SHAPES[args.shapes], "blocks": sorted({r["n_blocks"] for r in rows})}
    return {"meta": machine(args.device) | meta, "rows": rows, "projections": project(rows)}


def targets_met(result: dict) -> list[tuple[str, float, bool]]:
    """The memory targets on the projections at 32 blocks (paper targets), per checkpointing setting."""
    out = []
    for p in result["projections"]:
        if p["method"] == "fixed-100k" and p["targets"] == "paper" and p.get("peak_bytes_32_vs_lora"):
            ckpt = "on" if p["checkpointing"] else "off"
            out += [(f"7B shapes, peak, fixed / LoRA <= 1.05 (paper targets, checkpointing {ckpt})",
                     p["peak_bytes_32_vs_lora"], p["peak_bytes_32_vs_lora"] <= 1.05),
                    (f"7B shapes, training state, fixed / LoRA <= 1.5 (paper targets, checkpointing {ckpt})",
                     p["state_bytes_32_vs_lora"], p["state_bytes_32_vs_lora"] <= 1.5)]
    return out


def markdown(result: dict) -> str:
    lines = [("| method | targets | checkpointing | peak GB at 32 blocks | x LoRA | state GB at 32 blocks | x LoRA "
              "| fits 24 GB | fits 80 GB |"), "|---|---|---|---:|---:|---:|---:|---|---|"]

    def ratio(p, f):
        return f"{p[f]:.2f}" if p.get(f) is not None else ""

    for p in result["projections"]:
        lines.append(f"| {p['method']} | {p['targets']} | {'on' if p['checkpointing'] else 'off'} "
                     f"| {p['peak_bytes_32'] / GB:.1f} | {ratio(p, 'peak_bytes_32_vs_lora')} "
                     f"| {p['state_bytes_32'] / GB:.2f} | {ratio(p, 'state_bytes_32_vs_lora')} "
                     f"| {'yes' if p['fits_24gb'] else 'no'} | {'yes' if p['fits_80gb'] else 'no'} |")
    lines += ["", "Measured (the rows the projections come from):", "",
              "| method | targets | blocks | checkpointing | peak GB | state GB | trainable | s/step | W_0 kept apart |",
              "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        blocks = f"{r['n_blocks']}" + (" (block 0 a target)" if r["block0_only"] else "")
        kept = f"{100 * r['w0_kept_share']:.2f}%" if r.get("w0_kept_share") else ""
        lines.append(f"| {r['method']} | {r['targets']} | {blocks} | {'on' if r['checkpointing'] else 'off'} "
                     f"| {r['peak_bytes'] / GB:.2f} | {r['state_bytes'] / GB:.3f} | {r['trainable']:,} "
                     f"| {r['step_s']:.1f} | {kept} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    print(markdown(result))
    return 0
