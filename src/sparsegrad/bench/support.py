"""The fixed mode's two supports, scattered and block: their arithmetic, CPU step time and the energy they keep.

    sparsegrad bench support                     # FLOPs at three shapes, energy on MiniLM (BBC News), CPU speed
    sparsegrad bench support --chat-data ../shared/chat/oasst1_en_validation_top1_conversations.jsonl
    sparsegrad bench support --parts speed       # one part again; the others kept from support.json

FLOPs per MLP linear and training step (2 per multiply-add), counted from the kernels' own choices
(support.py: which side is rotated, activations or the dense gradient, both sides for a block): the
forward and the input gradient (every method: nn.Linear's), the trained part's gradient (full FT: the
weight's; LoRA: its rank-r path, 3 t r (d_in + d_out); SparseGrad: the support's) and the fold after the
optimizer step (SparseGrad: S's r rows times the n-wide basis, then r rows of the weight update, k n + r m n).
Shapes: the up projections of MiniLM, RoBERTa-base and LLaMA-2-7B (the down projections are their
transposes, at the same counts) at 2,048 tokens (batch 16 x 128) for the encoders and 512 for 7B; 1% of
each layer's entries, and at 7B also the paper's 100,000; LoRA at the matched rank, r=32 at 7B (the
paper's), and at 100,000 entries a block of at most 16 rows beside the default (at most 64). The supports come from
a synthetic energy with power-law row and column profiles (bench layer's), so r is indicative; the real
bases' shapes are in the energy table.

Energy kept: per MLP linear of the real embedded models, the preliminary phase's energy (the sum of
(U G V^T)^2 over its batches): the share of the whole that the top-k entries hold, the block's shape
(r x c) and the share of the top-k's energy the block keeps. MiniLM on BBC News (10 batches of 16),
SmolLM2-135M-Instruct on the conversations of --chat-data (10 batches of 4), every MLP linear.

Speed: steps/s of BERT-base (random weights), batch 16, sequence 128, only the head besides the
method, full FT, LoRA, SparseGrad scattered and block in one run (bench speed's measurement: a fresh
process per method, --repeats interleaved rounds, the fastest kept).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sparsegrad.support import SupportPlan, _rotate_activations, _rotate_both, block_support, topk_support
from sparsegrad.util import write_json_atomic, write_text_atomic

from ..recipes.machine import machine
from .protocol import cell, finished, margin

SHAPES = {"MiniLM": (384, 1536, 2048), "RoBERTa-base": (768, 3072, 2048), "LLaMA-2-7B": (4096, 11008, 512)}
PAPER_ENTRIES_7B = 100_000  # per layer, the paper's LLaMA-2 setting (Table 6)
LORA_RANK_7B = 32
NARROW_ROWS = 16  # the narrower block at 7B shapes (support.block_support's max_rows)
SPEED_METHODS = ("ft", "lora", "sparsegrad-fixed", "sparsegrad-block")
PARTS = ("flops", "energy", "speed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-data", help="a JSONL file of conversations: also SmolLM2's energy (default: MiniLM only)")
    p.add_argument("--parts", nargs="+", default=["flops", "energy", "speed"], choices=PARTS,
                   help="what to measure (speed: about 10 min alone on 2 cores); the others are kept from the "
                        "output folder's support.json")
    p.add_argument("--repeats", type=int, default=2, help="speed: interleaved rounds, the fastest kept")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--output-dir", default="bench-results/support")


# ---------------------------------------------------------------- arithmetic, as the kernels choose it

def _plan_sides(plan: SupportPlan, d_in: int, d_out: int) -> tuple[int, int, int, int]:
    """(m, n, r, k) in plan orientation: the plan matrix is (m, n), its support spans r rows."""
    m, n = (d_out, d_in) if plan.transposed else (d_in, d_out)
    return m, n, plan.uniq_rows.numel(), plan.cols.numel()


def gradient_macs(plan: SupportPlan, d_in: int, d_out: int, t: int) -> int:
    """Multiply-adds of S's gradient at the support for t tokens (SupportPlan.gather's path)."""
    m, n, r, k = _plan_sides(plan, d_in, d_out)
    rows = t * r * (m + n) if _rotate_activations(t, r, m, n) else t * m * n + r * m * n
    if plan.block_cols is None:
        return rows + k * n  # sampled product: k dot products of length n
    c = plan.block_cols.numel()
    return t * (r * m + c * n + r * c) if _rotate_both(t, r, c, m, n) else rows + r * n * c


def fold_macs(plan: SupportPlan, d_in: int, d_out: int) -> int:
    """Multiply-adds of one fold (support.fold): (r, n) = S_csr @ b, then r rows of a into the weight."""
    m, n, r, k = _plan_sides(plan, d_in, d_out)
    return k * n + r * m * n


def _spectral_energy(d_in: int, d_out: int, seed: int = 0) -> torch.Tensor:
    from .layer import _spectral_energy as energy

    torch.manual_seed(seed)
    return energy(d_in, d_out, "cpu")


def flops_rows(density: float) -> list[dict]:
    rows = []
    for model, (d_in, d_out, t) in SHAPES.items():
        energy = _spectral_energy(d_in, d_out)
        counts = [("1%", max(1, round(density * d_in * d_out)))]
        if model == "LLaMA-2-7B":
            counts.append(("100k", PAPER_ENTRIES_7B))
        for label, k in counts:
            rank = LORA_RANK_7B if model == "LLaMA-2-7B" else max(1, round(k / (d_in + d_out)))
            forward = t * d_in * d_out
            base = {"model": model, "d_in": d_in, "d_out": d_out, "tokens": t, "entries": label, "k": k,
                    "forward": 2 * forward, "input_grad": 2 * forward}
            rows.append(base | {"method": "ft", "trained_grad": 2 * forward, "fold": 0})
            rows.append(base | {"method": f"lora (r={rank})", "trained_grad": 2 * 3 * t * rank * (d_in + d_out),
                                "fold": 0, "lora_rank": rank})
            supports = [("sparsegrad-fixed", topk_support(energy, k)), ("sparsegrad-block", block_support(energy, k))]
            if label == "100k":  # a narrower block (the fold costs about r / tokens of a forward); at 1% none fits
                supports.append((f"sparsegrad-block (r <= {NARROW_ROWS})", block_support(energy, k, NARROW_ROWS)))
            for method, support in supports:
                plan = SupportPlan.build(*support, d_in, d_out)
                r = plan.uniq_rows.numel()
                c = plan.block_cols.numel() if plan.block_cols is not None else None
                rows.append(base | {"method": method, "trained_grad": 2 * gradient_macs(plan, d_in, d_out, t),
                                    "fold": 2 * fold_macs(plan, d_in, d_out), "r": r, "c": c})
    for row in rows:
        row["total"] = row["forward"] + row["input_grad"] + row["trained_grad"] + row["fold"]
        lora = next(q for q in rows if (q["model"], q["entries"]) == (row["model"], row["entries"])
                    and q["method"].startswith("lora"))
        row["total_vs_lora"] = row["total"] / (lora["forward"] + lora["input_grad"] + lora["trained_grad"])
        row["fold_vs_forward"] = row["fold"] / row["forward"]
    return rows


# ---------------------------------------------------------------- energy of the real bases

def bbc_batches(tok, steps: int, batch_size: int = 16, max_length: int = 128) -> list[dict]:
    """`steps` batches of BBC News articles (the embedded data), shuffled with seed 0."""
    from ..recipes.assets import bbc_news

    texts, labels, _ = bbc_news()
    order = np.random.default_rng(0).permutation(len(texts))
    batches = []
    for i in range(steps):
        idx = order[i * batch_size:(i + 1) * batch_size]
        enc = tok([texts[j] for j in idx], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        batches.append({**enc, "labels": torch.tensor([labels[j] for j in idx])})
    return batches


def _minilm_bases(steps: int):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sparsegrad.basis import compute_bases

    from ..recipes.assets import minilm_path

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=5).eval()
    return compute_bases(model, bbc_batches(tok, steps), n_steps=steps, progress=False)


def _smollm2_bases(data: str, steps: int, batch_size: int = 4, max_length: int = 256):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsegrad.basis import compute_bases

    from ..recipes.assets import smollm2_path
    from ..recipes.chat import Collator, encode, read_jsonl

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    examples = encode(tok, read_jsonl(data), max_length)
    if len(examples) < steps * batch_size:
        raise SystemExit(f"--chat-data holds {len(examples)} usable conversations; {steps * batch_size} are needed")
    collate = Collator(tok)
    batches = [collate(examples[i * batch_size:(i + 1) * batch_size]) for i in range(steps)]
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).eval()
    return compute_bases(model, batches, n_steps=steps, progress=False)


def energy_rows(model: str, bases, density: float) -> list[dict]:
    rows = []
    for name in sorted(bases.energy, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)]):
        e = bases.energy[name].double()
        d_in, d_out = e.shape
        k = max(1, round(density * d_in * d_out))
        top = float(e.flatten().topk(k).values.sum())
        rows_, cols_ = block_support(e, k)
        plan = SupportPlan.build(rows_, cols_, d_in, d_out)
        shape = (plan.uniq_rows.numel(), plan.block_cols.numel())
        r, c = shape[::-1] if plan.transposed else shape  # in S's orientation: rows of d_in, columns of d_out
        scattered = SupportPlan.build(*topk_support(e, k), d_in, d_out)
        rows.append({"model": model, "layer": name, "d_in": d_in, "d_out": d_out, "k": k,
                     "topk_share": top / float(e.sum()), "block": f"{r}x{c}",
                     "block_kept": float(e[rows_, cols_].sum()) / top,
                     "scattered_r": scattered.uniq_rows.numel(), "block_r": min(r, c)})
    return rows


# ---------------------------------------------------------------- the run

def run(args: argparse.Namespace) -> dict:
    start = time.time()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "support.json"
    result = json.loads(saved.read_text()) if saved.is_file() else {}
    if result.get("meta", {}).get("density", args.density) != args.density:
        raise ValueError(f"{saved} holds parts measured at density {result['meta']['density']}: give that "
                         "--density, or another --output-dir")
    missing = [part for part in ("flops", "energy") if part not in result and part not in args.parts]
    if missing:
        raise ValueError(f"{saved} has no {' or '.join(missing)} yet: add --parts {' '.join(missing)}")
    result["meta"] = machine("cpu") | {"density": args.density, "seconds": result.get("meta", {}).get("seconds", 0.0)}
    if "flops" in args.parts:
        print("FLOPs at three shapes ...", file=sys.stderr, flush=True)
        result["flops"] = flops_rows(args.density)
    if "energy" in args.parts:
        print("energy: MiniLM on BBC News ...", file=sys.stderr, flush=True)
        energy = energy_rows("MiniLM", _minilm_bases(10), args.density)
        if args.chat_data:
            print("energy: SmolLM2 on the conversations ...", file=sys.stderr, flush=True)
            energy += energy_rows("SmolLM2", _smollm2_bases(args.chat_data, 10), args.density)
        result["energy"] = energy
    if "speed" in args.parts:
        from . import speed

        print("CPU step time, BERT-base batch 16 ...", file=sys.stderr, flush=True)
        speed_args = argparse.Namespace(models=["bert-base"], methods=list(SPEED_METHODS), batch_sizes=[16], seq=128,
                                        fill=1.0, density=args.density, rest="head", steps=3, warmup=1,
                                        repeats=args.repeats, bases_steps=3, device="cpu", profile=False,
                                        output_dir=str(out / "speed"))
        result["speed"] = speed.run(speed_args)
    result["meta"]["seconds"] += time.time() - start  # every sitting's
    write_json_atomic(saved, result)
    write_text_atomic(out / "support.md", markdown(result) + "\n")
    return result


# ---------------------------------------------------------------- tables

def flops_table(rows: list[dict]) -> str:
    lines = [("| shape (tokens) | entries | method | r x c | forward | input grad | trained grad | fold | total GFLOP "
              "| x LoRA | fold x forward |"),
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        shape = f"{r['model']} {r['d_in']}->{r['d_out']} ({r['tokens']:,})"
        support = "" if "r" not in r else (f"{r['r']} x {r['c']}" if r["c"] else f"{r['r']} rows")
        g = [f"{r[f] / 1e9:,.3f}" for f in ("forward", "input_grad", "trained_grad", "fold", "total")]
        fold = f"{r['fold_vs_forward']:.3f}" if r["fold"] else ""
        lines.append(f"| {shape} | {r['entries']} ({r['k']:,}) | {r['method']} | {support} | "
                     + " | ".join(g) + f" | {r['total_vs_lora']:.2f} | {fold} |")
    return "\n".join(lines)


def energy_table(rows: list[dict]) -> str:
    """Per layer for MiniLM; per role (min / median / max over the blocks) for bigger models."""
    lines = [("| model | layer | k | top-k share of all energy | block r x c | block keeps of top-k's energy "
              "| scattered support: rows it rotates |"),
             "|---|---|---:|---:|---|---:|---:|"]
    by_model: dict[str, list[dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    for model, group in by_model.items():
        if len(group) <= 12:
            for r in group:
                lines.append(f"| {model} | {r['layer']} | {r['k']:,} | {100 * r['topk_share']:.1f}% | {r['block']} "
                             f"| {100 * r['block_kept']:.1f}% | {r['scattered_r']:,} |")
            continue
        roles: dict[str, list[dict]] = {}
        for r in group:
            roles.setdefault(r["layer"].rsplit(".", 1)[-1], []).append(r)
        for role, members in roles.items():
            shapes = sorted({m["block"] for m in members}, key=lambda s: int(s.split("x")[0]))
            lines.append(f"| {model} | {role} ({len(members)} blocks: min / median / max) | {members[0]['k']:,} "
                         f"| {_spread(members, 'topk_share')} | {', '.join(shapes[:3])}"
                         f"{' ...' if len(shapes) > 3 else ''} | {_spread(members, 'block_kept')} "
                         f"| {_spread(members, 'scattered_r', 1.0, ',.0f', '')} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- quality, from the GLUE and chat benches' records

QUALITY_TASKS = (("head", "cola"), ("head", "mrpc"), ("head", "sst2"), ("fp32", "chat"))
QUALITY_METHODS = ("lora", "sparsegrad-fixed", "sparsegrad-block")


def quality_rows(glue: dict | None, chat: dict | None) -> list[dict]:
    """Per task of the comparison (the PEFT setting's CoLA, MRPC, SST-2; chat): the summary rows of LoRA, the
    scattered and the block support, each finished (every seed scored) or None."""
    found = {}
    for result, setting in ((glue, "head"), (chat, "fp32")):
        for r in finished(result, setting) if result else []:
            found[r["setting"], r["task"], r["method"]] = r
    out = []
    for setting, task in QUALITY_TASKS:
        rows = {m: found.get((setting, task, m)) for m in QUALITY_METHODS}
        some = next((r for r in rows.values() if r), None)
        out.append({"task": task, "metric": some["metric"] if some else "",
                    "greater_is_better": some["greater_is_better"] if some else True, **rows})
    return out


def compare(row: dict | None, base: dict | None, greater_is_better: bool) -> tuple[float, float, str] | None:
    """(row - base, the larger seed spread, "better" | "within" | "worse") -- better or worse beyond the spread."""
    gap = margin(row, base)
    if gap is None:
        return None
    diff, spread = gap
    ahead = diff if greater_is_better else -diff
    return diff, spread, "better" if ahead > spread else "worse" if ahead < -spread else "within"


def decision(quality: list[dict], cheaper: bool) -> dict:
    """The rule: the block support becomes the default where, on every task compared, it scores within the seeds'
    spread of the scattered support or better, and it is cheaper; otherwise it stays an option."""
    verdicts = {q["task"]: compare(q["sparsegrad-block"], q["sparsegrad-fixed"], q["greater_is_better"])
                for q in quality}
    missing = [t for t, v in verdicts.items() if v is None]
    worse = [t for t, v in verdicts.items() if v is not None and v[2] == "worse"]
    below_lora = {m: [q["task"] for q in quality if (v := compare(q[m], q["lora"], q["greater_is_better"]))
                      and v[2] == "worse"] for m in ("sparsegrad-fixed", "sparsegrad-block")}
    default = not missing and not worse and cheaper
    decided = default or bool(worse) or not cheaper  # a task still to come cannot change a "no"
    return {"default": default, "decided": decided, "missing": missing, "worse": worse, "cheaper": cheaper,
            "below_lora": below_lora}


def quality_table(quality: list[dict]) -> str:
    lines = ["| task | lora | sparsegrad-fixed (scattered) | sparsegrad-block | block vs scattered | block vs lora |",
             "|---|---:|---:|---:|---:|---:|"]
    for q in quality:
        loss = not q["greater_is_better"]
        scale, digits = (1.0, 4) if loss else (100.0, 1)
        cells = [cell(q[m], scale, digits) for m in QUALITY_METHODS]
        for base in ("sparsegrad-fixed", "lora"):
            v = compare(q["sparsegrad-block"], q[base], q["greater_is_better"])
            cells.append("" if v is None else f"{scale * v[0]:+.{digits}f} (spread {scale * v[1]:.{digits}f}): {v[2]}")
        lines.append(f"| {q['task']} ({'validation loss' if loss else q['metric']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _spread(rows: list[dict], field: str, scale: float = 100.0, fmt: str = ".1f", unit: str = "%") -> str:
    v = np.array([r[field] for r in rows]) * scale
    return f"{v.min():{fmt}}{unit} / {np.median(v):{fmt}}{unit} / {v.max():{fmt}}{unit}"


def markdown(result: dict) -> str:
    from . import speed

    parts = [flops_table(result["flops"]), "", energy_table(result["energy"])]
    if "speed" in result:
        parts += ["", speed.markdown(result["speed"])]
    return "\n".join(parts)


def main(args: argparse.Namespace) -> int:
    print(markdown(run(args)))
    return 0
