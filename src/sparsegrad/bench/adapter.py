"""Adapter sizes: the peft adapter folder of SparseGrad, its bases embedded or by reference, against LoRA.

    sparsegrad bench adapter --data ../shared/chat/oasst1_en_validation_top1_conversations.jsonl

The paper's decoder setting on the embedded SmolLM2-135M-Instruct (up and down projections of
every third block, 1% density); the bases from `--bases-steps` batches, then `--steps` training
steps per mode (the values, and in `dynamic` the entries, then exist). Each adapter is written with
``save_pretrained`` and read back with ``PeftModel.from_pretrained`` onto a fresh model; the table
gives its bytes, the ratio to a LoRA adapter of the matched rank written in the same run, and the
largest logit difference between the reloaded and the trained model.

It also measures what would make the embedded form smaller: how many basis rows it holds per role
(of d), how far generic lossless compression (zlib, and zlib over the float32 byte planes) takes the
file, and what storing the basis rows in float16 would save and cost in reproduction.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import sparsegrad
from sparsegrad.util import write_json_atomic, write_text_atomic

from ..recipes.chat import Collator, encode, read_jsonl
from ..recipes.machine import machine, versions


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="a JSONL file of {\"messages\": [...]} conversations")
    p.add_argument("--model", default=None, help="a causal LM folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--targets", nargs="+", default=["up_proj", "down_proj"])
    p.add_argument("--blocks", default="every:3")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--modes", nargs="+", default=["fixed", "dynamic"], choices=["fixed", "dynamic"])
    p.add_argument("--bases-steps", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=9e-4)
    p.add_argument("--output-dir", default="bench-results/adapter")


def _bytes(folder: Path) -> int:
    return (folder / "adapter_model.safetensors").stat().st_size


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _byte_planes(t: torch.Tensor) -> bytes:
    """The bytes of a float32 tensor regrouped by position in the float (exponent bytes together)."""
    return t.float().contiguous().view(torch.uint8).view(-1, 4).t().contiguous().numpy().tobytes()


def _reload_error(folder: Path, load, expected: torch.Tensor, batch) -> float:
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(load(), folder)
    return float((_logits(loaded, batch) - expected).abs().max())


def _float16_rows(folder: Path, out: Path) -> None:
    """A copy of an embedded adapter folder with its basis rows stored in float16."""
    import shutil

    shutil.copytree(folder, out)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors = {k: (v.half() if ".sparsegrad_basis." in k and v.is_floating_point() else v) for k, v in tensors.items()}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def run(args: argparse.Namespace) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsegrad.recipes.assets import smollm2_path
    from sparsegrad.recipes.methods.lora import lora_rank_for
    from sparsegrad.targets import find_targets
    from sparsegrad.tuner import SparseGradConfig

    start = time.time()
    folder = Path(args.model) if args.model else smollm2_path()

    def load():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

    tok = AutoTokenizer.from_pretrained(folder)
    examples = encode(tok, read_jsonl(args.data), args.max_length)
    collate = Collator(tok)
    n_batches = args.bases_steps + args.steps
    batches = [collate(examples[i * args.batch_size:(i + 1) * args.batch_size]) for i in range(n_batches)]
    if len(examples) < n_batches * args.batch_size:
        raise SystemExit(f"--data holds {len(examples)} usable conversations; this run needs "
                         f"{n_batches * args.batch_size} (--bases-steps + --steps batches)")
    probe = batches[0]
    model = load()
    layers = find_targets(model, args.targets, blocks=args.blocks)
    print(f"bases from {args.bases_steps} batches on {len(layers)} layers ...", file=sys.stderr)
    bases = sparsegrad.compute_bases(model, batches[:args.bases_steps], args.bases_steps, targets=args.targets,
                                     blocks=args.blocks, progress=False)
    out_dir = Path(args.output_dir)
    rows, probes = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bases_file = tmp / "bases.safetensors"
        bases.save(bases_file)
        k_total = 0
        for mode in args.modes:
            print(f"{mode}: {args.steps} steps ...", file=sys.stderr)
            # the Bases object: the embedded adapter then names no file, and loads from its own rows
            config = SparseGradConfig(bases=bases, density=args.density, mode=mode,
                                      target_modules=args.targets, blocks=args.blocks)
            peft_model = get_peft_model(load(), config)
            opt = sparsegrad.optimizer(peft_model, lr=args.lr)
            peft_model.train()
            for batch in batches[args.bases_steps:]:
                peft_model(**batch).loss.backward()
                opt.step()
                opt.zero_grad()
            expected = _logits(peft_model, probe)
            k_total = sum(m.k for m in sparsegrad.sparse_layers(peft_model).values())
            for embed in (True, False):
                if not embed:
                    peft_model.peft_config["default"].bases = str(bases_file)
                    peft_model.peft_config["default"].embed_bases = False
                path = tmp / f"{mode}-{'embedded' if embed else 'reference'}"
                peft_model.save_pretrained(path)
                rows.append({"form": f"sparsegrad-{mode}, bases {'embedded' if embed else 'by reference'}",
                             "bytes": _bytes(path), "max_logit_diff": _reload_error(path, load, expected, probe)})
            embedded = tmp / f"{mode}-embedded"
            tensors = load_file(str(embedded / "adapter_model.safetensors"))
            raw = (embedded / "adapter_model.safetensors").read_bytes()
            floats = b"".join(_byte_planes(t) for t in tensors.values() if t.dtype == torch.float32)
            rest = sum(t.numel() * t.element_size() for t in tensors.values() if t.dtype != torch.float32)
            held = {k.removeprefix("base_model.sparsegrad_basis."): list(t.shape)  # (rows held, d)
                    for k, t in tensors.items() if ".sparsegrad_basis." in k and k.endswith((".U", ".V"))}
            basis_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if ".sparsegrad_basis." in k)
            half = tmp / f"{mode}-float16"
            _float16_rows(embedded, half)
            probes[mode] = {
                "entries": int(sum(t.numel() for k, t in tensors.items() if k.endswith(".sparsegrad_values"))),
                "basis_rows": held,
                "basis_bytes": basis_bytes,
                "zlib_bytes": len(zlib.compress(raw, 9)),
                "zlib_byte_planes_bytes": len(zlib.compress(floats, 9)) + rest,
                "float16_rows_bytes": _bytes(half),
                "float16_rows_max_logit_diff": _reload_error(half, load, expected, probe),
            }
            del peft_model, opt
        rank = lora_rank_for(k_total, layers)
        lora = get_peft_model(load(), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=sorted(layers)))
        lora.save_pretrained(tmp / "lora")
        lora_bytes = _bytes(tmp / "lora")
    rows.append({"form": f"lora (r={rank})", "bytes": lora_bytes, "max_logit_diff": None})
    for row in rows:
        row["x_lora"] = row["bytes"] / lora_bytes
    result = {"meta": {"model": Path(args.model).name if args.model else "SmolLM2-135M-Instruct (embedded)",
                       "data": Path(args.data).name, "targets": args.targets,
                       "blocks": args.blocks, "layers": len(layers), "density": args.density, "steps": args.steps,
                       "trainable_per_mode": k_total, "machine": machine(), "versions": versions(),
                       "wall_seconds": round(time.time() - start, 1)},
              "rows": rows, "probes": probes}
    write_json_atomic(out_dir / "adapter.json", result)
    write_text_atomic(out_dir / "adapter.md", markdown(result) + "\n")
    return result


def markdown(result: dict) -> str:
    lines = ["| adapter | MB | x LoRA | max abs logit difference, reloaded vs trained |", "|---|---:|---:|---:|"]
    for r in result["rows"]:
        diff = "" if r["max_logit_diff"] is None else f"{r['max_logit_diff']:.1e}"
        lines.append(f"| {r['form']} | {r['bytes'] / 2**20:.2f} | {r['x_lora']:.2f} | {diff} |")
    lora = result["rows"][-1]["bytes"]
    lines += ["", ("| mode | entries | basis rows held (of d) | basis MB | zlib | zlib, byte planes | "
              "float16 rows (x LoRA) | float16 rows: max logit difference |"), "|---|---:|---|---:|---:|---:|---:|---:|"]
    for mode, p in result["probes"].items():
        held = ", ".join(f"{k} {n}/{d}" for k, (n, d) in p["basis_rows"].items())
        embedded = next(r["bytes"] for r in result["rows"] if r["form"] == f"sparsegrad-{mode}, bases embedded")
        lines.append(f"| {mode} | {p['entries']:,} | {held} | {p['basis_bytes'] / 2**20:.2f} "
                     f"| {p['zlib_bytes'] / embedded:.3f} | {p['zlib_byte_planes_bytes'] / embedded:.3f} "
                     f"| {p['float16_rows_bytes'] / 2**20:.2f} MB ({p['float16_rows_bytes'] / lora:.2f}) "
                     f"| {p['float16_rows_max_logit_diff']:.1e} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    print(markdown(result))
    print(f"\nresults: {Path(args.output_dir) / 'adapter.json'}, {Path(args.output_dir) / 'adapter.md'}")
    return 0
