"""The GPU check: the one prepared command to run first whenever a GPU is at hand (about 8 minutes).

    sparsegrad bench gpu                                  # on a CUDA device; JSON into docs/results/gpu
    sparsegrad bench gpu --tiny --device cpu --output-dir bench-results/gpu-tiny   # the same, tiny shapes (a smoke test)

In order, until `--budget-s` is spent (rows left over are listed as not run, never guessed):
  1. the CUDA tests (`tests/library/test_cuda.py`, among them a training step under
     torch.cuda.set_sync_debug_mode("error")), when the source tree is at hand;
  2. training steps per method, each method alone on the device in a fresh process: full FT, LoRA,
     SparseGrad fixed (scattered and block support) and dynamic, MeProp, at equal trainable MLP
     entries, in three settings --
       `table3`: the paper's Table 3 (RoBERTa-base shapes, batch 32, sequence 128, GLUE-style padding,
                 every non-MLP parameter training),
       `minilm`: the embedded MiniLM, batch 16, otherwise the same,
       `llama7b`: LLaMA-2-7B shapes, 4 blocks, bfloat16 weights, the paper's targets (up and down
                 projections of every third block) with 100,000 entries per layer, sequence 512;
     the median steps/s of `--steps` steps after `--warmup`, the allocator's peak, the host
     read-backs per step (counted by operator) and a torch.profiler table of one step (eager rows);
  3. the same rows under torch.compile (the compiled rows come after every eager row: the budget
     cuts those first).
Every figure beside its ratio to LoRA's and full FT's in the same setting and the same run.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from sparsegrad.util import write_json_atomic

from ..recipes.machine import machine
from ..recipes.process import WorkerError, run_in_process

METHODS = ("ft", "lora", "sparsegrad-fixed", "sparsegrad-block", "sparsegrad-dynamic", "meprop")
SETTINGS = {  # model, batch, sequence, share of real tokens (the rest padding); tiny: the smoke test's shapes
    "table3": {"model": "roberta-base", "batch_size": 32, "seq": 128, "fill": 0.5, "tiny": "bert-tiny"},
    "minilm": {"model": "minilm", "batch_size": 16, "seq": 128, "fill": 0.5, "tiny": "bert-tiny"},
    "llama7b": {"model": "llama2-7b", "batch_size": 1, "seq": 512, "fill": 1.0, "tiny": "tiny"},
}
LLAMA_BLOCKS, LLAMA_TARGETS = 4, "paper"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--compile", nargs="+", default=["off", "on"], choices=("off", "on"),
                   help="eager and / or torch.compile rows (default both; compiled rows run last)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per row (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="steps before timing (compilation happens here)")
    p.add_argument("--budget-s", type=float, default=480, help="start no row after this many seconds (default 480)")
    p.add_argument("--no-tests", action="store_true", help="skip the CUDA tests")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke test of the command")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output-dir", default="docs/results/gpu")


# ---------------------------------------------------------------- one row, in its own process

def _classifier(spec: dict):
    from .speed import build_model, synthetic_batch

    model = build_model(spec["model"])
    batch = synthetic_batch(model, spec["batch_size"], spec["seq"], spec["fill"], seed=0)
    return model, batch


def _prepared(spec: dict):
    """(model, batch) set up for the row's method, on its device."""
    from sparsegrad import Bases
    from sparsegrad.targets import find_targets

    from ..recipes.methods import prepare, split_label
    from .llm import PAPER_N_PARAMS, TARGETS, build_decoder, identity_bases

    options = split_label(spec["method"])
    method = options["method"]
    device = torch.device(spec["device"])
    if spec["setting"] == "llama7b":  # built on the device, in bfloat16 (bench llm's decoder)
        model = build_decoder(LLAMA_BLOCKS, spec["model"], spec["device"])
        blocks, targets = list(range(0, LLAMA_BLOCKS, 3)), TARGETS[LLAMA_TARGETS]
        bases = identity_bases(find_targets(model, targets, blocks=blocks)) if method == "sparsegrad" else None
        prepare(model, **options, rest="all" if method == "ft" else "none", bases=bases,
                n_params=PAPER_N_PARAMS[spec["model"]], targets=targets, blocks=blocks, lora_rank=32)
        ids = torch.randint(0, model.config.vocab_size, (spec["batch_size"], spec["seq"]),
                            generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "labels": ids}
    else:
        model, batch = _classifier(spec)
        bases = Bases.load(spec["bases"]) if method == "sparsegrad" else None
        prepare(model, **options, rest="all", bases=bases, density=0.01)
    model.to(device).train()
    return model, {k: v.to(device) for k, v in batch.items()}


def measure(spec: dict) -> dict:
    """One (setting, method, compile) row in this process: steps/s, peak memory, read-backs per step."""
    import sparsegrad
    from sparsegrad.readbacks import ReadBackCounter

    from ..recipes.memory import peak_memory, reset_peak_memory

    torch.set_grad_enabled(True)
    device = torch.device(spec["device"])
    model, batch = _prepared(spec)
    opt = sparsegrad.optimizer(model, lr=1e-5)
    run = torch.compile(model) if spec["compile"] else model

    def step():
        run(**batch).loss.backward()
        sparsegrad.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    for _ in range(spec["warmup"]):
        step()
    synchronize()
    warmup_s = time.perf_counter() - start
    reset_peak_memory(device)
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    peak, peak_kind = peak_memory(device)
    read_backs = None
    if not spec["compile"]:  # a dispatch mode would change what a compiled graph runs
        counted = 5
        with ReadBackCounter() as counter:
            for _ in range(counted):
                step()
        read_backs = {"per_step": counter.total / counted, "ops": dict(counter.counts),
                      "operators_per_step": counter.operators / counted}
        if spec.get("profile"):
            from .speed import write_profile

            write_profile(step, device, spec["profile"])
    median = statistics.median(times)
    return {**{k: spec[k] for k in ("setting", "model", "method", "compile", "batch_size", "seq", "fill")},
            "device": str(device), "step_s": median, "steps_per_s": 1 / median, "times": times,
            "warmup_s": warmup_s, "peak_bytes": peak, "peak_kind": peak_kind, "read_backs": read_backs}


# ---------------------------------------------------------------- the command

def run_cuda_tests(device: str) -> dict:
    """The CUDA tests from the source tree, if it is here (an installed package carries no tests)."""
    tests = Path(__file__).resolve().parents[3] / "tests" / "library" / "test_cuda.py"
    if not tests.is_file():
        return {"status": "not run: no source tree (tests/library/test_cuda.py) beside this installation"}
    env = None
    if device != "cuda":
        import os

        env = {**os.environ, "SPARSEGRAD_TEST_DEVICE": device}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
                          capture_output=True, text=True, check=False, env=env, cwd=tests.parents[2])
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    return {"status": "passed" if done.returncode == 0 else "failed", "summary": summary,
            "seconds": time.perf_counter() - start, **({"output": done.stdout[-4000:]} if done.returncode else {})}


def _specs(args: argparse.Namespace, bases: dict[str, str]) -> list[dict]:
    specs = []
    for compiled in [c == "on" for c in args.compile]:  # every eager row first
        for setting in args.settings:
            shape = SETTINGS[setting]
            model = shape["tiny"] if args.tiny else shape["model"]
            for method in args.methods:
                specs.append({"setting": setting, "model": model, "method": method, "compile": compiled,
                              "batch_size": 2 if args.tiny else shape["batch_size"],
                              "seq": 16 if args.tiny else shape["seq"], "fill": shape["fill"],
                              "steps": args.steps, "warmup": args.warmup, "device": args.device,
                              "bases": bases.get(model),
                              "profile": None if compiled else str(Path(args.output_dir) / "profiles"
                                                                   / f"{setting}-{method}.txt")})
    return specs


def _bases(args: argparse.Namespace, out: Path) -> dict[str, str]:
    """The classifiers' bases, from a short preliminary phase on padded synthetic batches (once per model)."""
    from .speed import make_bases

    found = {}
    for setting in args.settings:
        shape = SETTINGS[setting]
        if setting == "llama7b" or not any(m.startswith("sparsegrad") for m in args.methods):
            continue
        model = shape["tiny"] if args.tiny else shape["model"]
        if model not in found:
            print(f"{model}: preliminary phase", file=sys.stderr, flush=True)
            found[model] = str(make_bases(model, out / f"bases-{model}.safetensors", 16, shape["seq"], shape["fill"], 3))
    return found


def add_ratios(rows: list[dict]) -> None:
    """steps/s and peak as ratios to LoRA's and full FT's in the same setting and compile mode."""
    by = {(r["setting"], r["compile"], r["method"]): r for r in rows}
    for r in rows:
        for base in ("ft", "lora"):
            b = by.get((r["setting"], r["compile"], base))
            r[f"speed_vs_{base}"] = r["steps_per_s"] / b["steps_per_s"] if b else None
            r[f"peak_vs_{base}"] = r["peak_bytes"] / b["peak_bytes"] if b and b["peak_bytes"] else None
        eager = by.get((r["setting"], False, r["method"]))
        r["compile_speedup"] = r["steps_per_s"] / eager["steps_per_s"] if r["compile"] and eager else None


def run(args: argparse.Namespace) -> dict:
    if args.steps < 1 or args.warmup < 1:
        raise ValueError(f"--steps {args.steps}, --warmup {args.warmup}: give at least 1 of each")
    began = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"gpu-{args.device}" + ("-tiny" if args.tiny else "")
    tests = {"status": "skipped (--no-tests)"} if args.no_tests else run_cuda_tests(args.device)
    print(f"CUDA tests: {tests['status']} {tests.get('summary', '')}", file=sys.stderr, flush=True)
    specs = _specs(args, _bases(args, out))
    rows, not_run, failed = [], [], []
    for i, spec in enumerate(specs, 1):
        label = f"{spec['setting']} {spec['method']}{' compiled' if spec['compile'] else ''}"
        if time.perf_counter() - began > args.budget_s:
            not_run.append(label)
            continue
        try:
            row = run_in_process("sparsegrad.bench.gpu:measure", spec)
        except WorkerError as e:  # one failed row (out of memory, a compile error) leaves the others standing
            failed.append({"row": label, "error": str(e)[-2000:]})
            print(f"  [{i}/{len(specs)}] {label}: failed", file=sys.stderr, flush=True)
            continue
        rows.append(row)
        reads = f", {row['read_backs']['per_step']:.1f} read-backs/step" if row["read_backs"] else ""
        print(f"  [{i}/{len(specs)}] {label}: {row['steps_per_s']:.2f} steps/s, peak {row['peak_bytes'] / 2**20:,.0f} MB"
              f"{reads}", file=sys.stderr, flush=True)
    add_ratios(rows)
    result = {"meta": machine(args.device) | {"steps": args.steps, "warmup": args.warmup, "tiny": args.tiny,
                                              "seconds": time.perf_counter() - began, "budget_s": args.budget_s},
              "tests": tests, "rows": rows, "not_run": not_run, "failed": failed}
    write_json_atomic(out / f"{name}.json", result)
    (out / f"{name}.md").write_text(markdown(result) + "\n")
    return result


def _x(v) -> str:
    return f"{v:.2f}" if v is not None else ""


def markdown(result: dict) -> str:
    lines = [("| setting | method | compiled | steps/s | x LoRA | x FT | peak MB | peak x LoRA | read-backs/step "
              "| operators/step | x eager |"), "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        reads = f"{r['read_backs']['per_step']:.1f}" if r.get("read_backs") else ""
        operators = r["read_backs"].get("operators_per_step") if r.get("read_backs") else None
        reads += f" | {operators:,.0f}" if operators is not None else " | "
        lines.append(f"| {r['setting']} ({r['model']}, batch {r['batch_size']}, seq {r['seq']}) | {r['method']} "
                     f"| {'yes' if r['compile'] else 'no'} | {r['steps_per_s']:.2f} | {_x(r['speed_vs_lora'])} "
                     f"| {_x(r['speed_vs_ft'])} | {r['peak_bytes'] / 2**20:,.0f} | {_x(r['peak_vs_lora'])} | {reads} "
                     f"| {_x(r.get('compile_speedup'))} |")
    tests = result["tests"]
    lines += ["", f"CUDA tests: {tests['status']}" + (f" ({tests['summary']})" if tests.get("summary") else "") + "."]
    if result["not_run"]:
        lines.append(f"Not run within the {result['meta']['budget_s']:g} s budget: {', '.join(result['not_run'])}.")
    if result["failed"]:
        lines.append("Failed: " + "; ".join(f"{f['row']}" for f in result["failed"]) + " (errors in the JSON).")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    print(markdown(result))
    return 1 if result["failed"] or result["tests"]["status"] == "failed" else 0
