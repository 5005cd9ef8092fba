"""Training speed and memory of whole models per method (the paper's Tables 3, 7 and 8).

    sparsegrad bench speed                                      # MiniLM, BERT-base, RoBERTa-base; batch 16, 32
    sparsegrad bench speed --models bert-base --batch-sizes 16 --fill 0.25 --profile

For each model, batch size and method (full FT, LoRA, MeProp, SparseGrad fixed and dynamic, at
equal trainable MLP entries: k = density * d_in * d_out per layer, LoRA rank matched to sum k),
one fresh process builds the model, runs `--warmup` then `--steps` timed training steps
(forward, backward, optimizer step; dropout on) on a synthetic batch of `--seq` tokens per
sequence, and reports:
  - step time (median) and steps/s;
  - peak memory of the process: CPU peak RSS (ru_maxrss), CUDA max allocated after a reset;
  - training state, counted exactly in bytes: gradients + optimizer state + every tensor the
    method adds (LoRA's A/B, SparseGrad's values / delta, support indices, merge buffers and
    cached index plans). The bases U, V are listed apart: one pair per layer role serves every block;
  - optimizer state, and the MLP part of it against 2 * sum(k) values;
  - every figure as a ratio to full FT in the same run (and to LoRA).
MiniLM is the real embedded model; BERT-base and RoBERTa-base are built from their configs with
random weights. Token ids are random; `--fill f` pads each sequence after about f * seq tokens
(GLUE-style padding to a fixed length: the paper's setting, where sparse-by-dense skips the
padded rows). Bases (for the SparseGrad modes) come from a short preliminary phase on such
batches, computed once per model in the parent process.
`--rest` sets the policy for the non-MLP parameters, the same for every method (default 'head':
only the classifier trains besides the method's MLP entries).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from sparsegrad import Bases, compute_bases, optimizer, sparse_layers
from sparsegrad.layer import FixedSparseGradLinear, SparseGradLinear
from sparsegrad.util import to_device, write_json_atomic

from ..recipes.machine import machine
from ..recipes.memory import peak_memory, reset_peak_memory, tensor_bytes
from ..recipes.methods import prepare, split_label
from ..recipes.process import run_in_process

METHODS = ("ft", "lora", "meprop", "sparsegrad-fixed", "sparsegrad-dynamic", "sparsegrad-block")
MODELS = ("minilm", "bert-base", "roberta-base", "bert-tiny")  # bert-tiny: 2 small layers, for smoke tests


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=list(MODELS[:3]), choices=MODELS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--fill", type=float, default=1.0,
                   help="share of real tokens per sequence, the rest padding (default 1: no padding)")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--rest", default="head", choices=("head", "all"))
    p.add_argument("--steps", type=int, default=3, help="timed steps per method (default 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1,
                   help="interleaved rounds over the methods; each method's fastest round is kept")
    p.add_argument("--bases-steps", type=int, default=3, help="preliminary-phase batches for the bases")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", action="store_true", help="also write a torch.profiler table per run")
    p.add_argument("--output-dir", default="bench-results/speed")


# ---------------------------------------------------------------- models and batches

def build_model(name: str):
    """A sequence classifier (2 labels): the embedded MiniLM, or BERT-/RoBERTa-base with random weights."""
    from transformers import (
        AutoModelForSequenceClassification,
        BertConfig,
        BertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    torch.manual_seed(0)
    if name == "minilm":
        from ..recipes.assets import minilm_path

        return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    if name == "bert-base":
        return BertForSequenceClassification(BertConfig(num_labels=2))
    if name == "bert-tiny":
        return BertForSequenceClassification(BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                                        num_attention_heads=4, intermediate_size=256, num_labels=2))
    if name == "roberta-base":
        config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                               bos_token_id=0, eos_token_id=2, num_labels=2)
        return RobertaForSequenceClassification(config)
    raise ValueError(f"unknown model {name!r}: choose from {', '.join(MODELS)}")


def synthetic_batch(model, batch_size: int, seq: int, fill: float, seed: int) -> dict[str, torch.Tensor]:
    """Random token ids; with fill < 1 each sequence has ~fill * seq real tokens (0.5x-1.5x), then padding."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    ids = torch.randint(5, cfg.vocab_size, (batch_size, seq), generator=g)
    mask = torch.ones(batch_size, seq, dtype=torch.long)
    if fill < 1:
        lengths = (fill * seq * (0.5 + torch.rand(batch_size, generator=g))).long().clamp(2, seq)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, cfg.pad_token_id or 0)
    labels = torch.randint(0, 2, (batch_size,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_bases(model_name: str, path: Path, batch_size: int, seq: int, fill: float, steps: int) -> Path:
    """The preliminary phase on synthetic batches, saved once per model."""
    if path.is_file():
        return path
    model = build_model(model_name).eval()
    batches = (synthetic_batch(model, batch_size, seq, fill, seed=1000 + i) for i in range(steps))
    bases = compute_bases(model, batches, n_steps=steps, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    bases.save(path)
    return path


# ---------------------------------------------------------------- one method, in its own process

def training_state(model, opt) -> dict[str, int]:
    """Bytes held for training, beyond the frozen model: gradients, optimizer state, the tensors
    the method adds; and the bases apart. Call after backward and step, before zero_grad."""
    layers = sparse_layers(model).values()
    bases = {id(t): t for m in layers if isinstance(m, SparseGradLinear) for t in (m.U, m.V)}
    added = []
    for m in layers:
        added += [b for b in m.buffers() if id(b) not in bases]
        if not m.trains_weight:
            added.append(m.trainable)
        if isinstance(m, FixedSparseGradLinear) and m._plan is not None:
            added += [t for t in vars(m._plan).values() if torch.is_tensor(t)]
    added += [p for n, p in model.named_parameters() if "lora_" in n]
    grads = tensor_bytes(p.grad for p in model.parameters())
    opt_state = tensor_bytes(t for s in opt.state.values() for t in s.values())
    mlp_params = {id(m.trainable) for m in layers} | {id(p) for n, p in model.named_parameters() if "lora_" in n}
    opt_mlp = tensor_bytes(t for p, s in opt.state.items() if id(p) in mlp_params for t in s.values() if torch.is_tensor(t) and t.ndim)
    return {"grad_bytes": grads, "optimizer_bytes": opt_state, "optimizer_mlp_bytes": opt_mlp,
            "added_bytes": tensor_bytes(added), "state_bytes": grads + opt_state + tensor_bytes(added),
            "bases_bytes": tensor_bytes(bases.values())}


def measure(spec: dict) -> dict:
    """One (model, method, batch) measurement in this process; `spec` holds the run options."""
    torch.set_grad_enabled(True)
    device = torch.device(spec["device"])
    options = split_label(spec["method"])
    model = build_model(spec["model"])
    bases = Bases.load(spec["bases"]) if options["method"] == "sparsegrad" else None
    info = prepare(model, **options, rest=spec["rest"], bases=bases, density=spec["density"])
    del bases
    model.to(device).train()
    opt = optimizer(model, lr=1e-5, weight_decay=0.01)
    batch = to_device(synthetic_batch(model, spec["batch_size"], spec["seq"], spec["fill"], seed=0), device)
    reset_peak_memory(device)  # the training loop's peak, not model loading's

    def step(last: bool = False) -> dict | None:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        state = training_state(model, opt) if last else None
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return state

    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        start = time.perf_counter()
        state = step(last=i == spec["warmup"] + spec["steps"] - 1)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    if spec.get("profile"):
        write_profile(step, device, spec["profile"])
    peak, peak_kind = peak_memory(device)
    plans = [(m._support_plan(), m) for m in sparse_layers(model).values() if isinstance(m, FixedSparseGradLinear)]
    # the fixed mode's extra work scales with the distinct indices on the side it rotates
    rotated = [p.uniq_rows.numel() / (m.out_features if p.transposed else m.in_features) for p, m in plans]
    tokens = int(batch["attention_mask"].sum())
    return {**{k: spec[k] for k in ("model", "method", "batch_size", "seq", "fill", "density", "rest")},
            "device": str(device), "step_s": statistics.median(times), "steps_per_s": 1 / statistics.median(times),
            "times": times, "peak_bytes": peak, "peak_kind": peak_kind, "real_tokens": tokens, "trainable": info.trainable,
            "trainable_mlp": info.trainable_mlp, "sparse_budget": info.sparse_budget,
            "lora_rank": info.lora_rank, "support_rotated_share": sum(rotated) / len(rotated) if rotated else None,
            **state}


def write_profile(step, device: torch.device, path: str) -> None:
    """One step under torch.profiler: the operators by time on the device (or the CPU), and SparseGrad's scopes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    scopes = sorted((e for e in events if e.key.startswith("sparsegrad.")), key=lambda e: -e.cpu_time_total)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("one training step, operators by time:\n" + events.table(sort_by=sort, row_limit=30)
                          + "\n\nSparseGrad's own scopes (inclusive CPU time):\n"
                          + "\n".join(f"{e.key:40s} {e.cpu_time_total / 1e3:10.2f} ms  {e.count:5d} calls" for e in scopes)
                          + "\n")


# ---------------------------------------------------------------- the benchmark

def run(args: argparse.Namespace) -> dict:
    if not 0 < args.fill <= 1:
        raise ValueError(f"--fill {args.fill}: the share of real tokens must lie in (0, 1]")
    if not 0 < args.density <= 1:
        raise ValueError(f"--density {args.density}: must lie in (0, 1]")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model_name in args.models:
        bases = None
        if any(m.startswith("sparsegrad") for m in args.methods):
            print(f"{model_name}: preliminary phase ({args.bases_steps} batches)", file=sys.stderr, flush=True)
            bases = make_bases(model_name, out / f"bases-{model_name}-fill{args.fill:g}.safetensors",
                               16, args.seq, args.fill, args.bases_steps)
        for batch_size in args.batch_sizes:
            best: dict[str, dict] = {}
            for round_ in range(args.repeats):
                for method in args.methods:
                    tag = f"{model_name}-b{batch_size}-fill{args.fill:g}-{method}"
                    spec = {"model": model_name, "method": method, "batch_size": batch_size, "seq": args.seq,
                            "fill": args.fill, "density": args.density, "rest": args.rest, "steps": args.steps,
                            "warmup": args.warmup, "device": args.device, "bases": str(bases) if bases else None,
                            "profile": str(out / f"profile-{tag}.txt") if args.profile and round_ == 0 else None}
                    row = run_in_process("sparsegrad.bench.speed:measure", spec)
                    if method not in best or row["step_s"] < best[method]["step_s"]:
                        best[method] = row
                    print(f"  {tag} (round {round_ + 1}/{args.repeats}): {row['step_s']:.3f} s/step, "
                          f"peak {row['peak_bytes'] / 2**20:,.0f} MB, state {row['state_bytes'] / 2**20:,.2f} MB",
                          file=sys.stderr, flush=True)
            rows += best.values()
    add_ratios(rows)
    result = {"meta": machine(args.device) | {"seq": args.seq, "fill": args.fill, "density": args.density,
                                              "rest": args.rest, "steps": args.steps, "warmup": args.warmup,
                                              "repeats": args.repeats},
              "rows": rows}
    name = (f"speed-{args.device}" + ("" if args.fill == 1 else f"-fill{args.fill:g}")
            + ("" if args.rest == "head" else f"-rest-{args.rest}"))
    write_json_atomic(out / f"{name}.json", result)
    (out / f"{name}.md").write_text(markdown(result) + "\n")
    return result


def add_ratios(rows: list[dict]) -> None:
    """x full FT and x LoRA of step time, peak and state, within each (model, batch, fill, device)."""
    def key(r):
        return (r["model"], r["batch_size"], r["fill"], r["device"])

    ref = {(key(r), r["method"]): r for r in rows}
    for r in rows:
        for base in ("ft", "lora"):
            b = ref.get((key(r), base))
            if b:
                for f in ("step_s", "peak_bytes", "state_bytes"):
                    r[f"{f}_vs_{base}"] = r[f] / b[f] if b[f] else None
        k = r["sparse_budget"] or 1
        r["optimizer_mlp_vs_2k"] = r["optimizer_mlp_bytes"] / (2 * k * 4) if r["method"] != "ft" else None


def _ratio(r: dict, field: str, base: str) -> str:
    v = r.get(f"{field}_vs_{base}")
    return f"{v:.2f}" if v is not None else ""


def markdown(result: dict) -> str:
    head = ("| model | batch | method | trainable | steps/s | step x FT | step x LoRA | peak MB | peak x FT "
            "| peak x LoRA | state MB | state x FT | state x LoRA | optim MB | optim MLP / 2k | bases MB |")
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        name = r["method"] + (f" (r={r['lora_rank']})" if r.get("lora_rank") else "")
        o2k = f"{r['optimizer_mlp_vs_2k']:.2f}" if r.get("optimizer_mlp_vs_2k") is not None else ""
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {name} | {r['trainable']:,} | {r['steps_per_s']:.3f} "
            f"| {_ratio(r, 'step_s', 'ft')} | {_ratio(r, 'step_s', 'lora')} | {r['peak_bytes'] / 2**20:,.0f} "
            f"| {_ratio(r, 'peak_bytes', 'ft')} | {_ratio(r, 'peak_bytes', 'lora')} | {r['state_bytes'] / 2**20:,.2f} "
            f"| {_ratio(r, 'state_bytes', 'ft')} | {_ratio(r, 'state_bytes', 'lora')} "
            f"| {r['optimizer_bytes'] / 2**20:,.2f} | {o2k} | {r['bases_bytes'] / 2**20:,.1f} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    print(markdown(result))
    return 0
