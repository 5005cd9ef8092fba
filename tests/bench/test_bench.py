"""The benchmarks on tiny settings: what they count is exact, what they write is complete, and the
results page is generated from their JSON. (Speed itself is never asserted: timings are printed.)"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparsegrad.bench import bases as bases_bench
from sparsegrad.bench import speed
from sparsegrad.recipes.cli import main


def test_speed_counts_training_state_exactly(tmp_path, capsys):
    out = tmp_path / "speed"
    argv = ["bench", "speed", "--models", "bert-tiny", "--batch-sizes", "2", "--seq", "16", "--steps", "1",
            "--warmup", "0", "--fill", "0.5", "--output-dir", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "speed-cpu-fill0.5.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == set(speed.METHODS)
    assert "| bert-tiny | 2 | sparsegrad-fixed |" in capsys.readouterr().out
    assert (out / "speed-cpu-fill0.5.md").is_file()
    ft, lora, fixed, dyn = rows["ft"], rows["lora"], rows["sparsegrad-fixed"], rows["sparsegrad-dynamic"]
    assert ft["step_s_vs_ft"] == 1 and lora["step_s_vs_lora"] == 1
    # bert-tiny: 2 blocks x (64 -> 256, 256 -> 64); k = round(0.01 * 64 * 256) = 164 per layer; head 64*2+2
    k, head = 4 * 164, 64 * 2 + 2
    assert fixed["sparse_budget"] == k and fixed["trainable"] == k + head
    # fixed: values + grad + Adam m, v (4 bytes each) per entry; indices, merge buffer and plan on top
    assert fixed["grad_bytes"] == 4 * (k + head)
    assert fixed["optimizer_mlp_vs_2k"] == pytest.approx(1.0)
    assert fixed["added_bytes"] >= 4 * k + 16 * k  # values and the (rows, cols) support at least
    assert fixed["bases_bytes"] == 4 * 2 * (64 * 64 + 256 * 256)  # one (U, V) pair per role
    # LoRA adds its A and B; full FT adds nothing but trains every MLP weight
    rank = lora["lora_rank"]
    assert lora["added_bytes"] == 4 * rank * 4 * (64 + 256)
    assert ft["added_bytes"] == 0 and ft["grad_bytes"] == 4 * (ft["trainable"])
    assert ft["optimizer_bytes"] >= 8 * ft["trainable"]
    assert fixed["state_bytes"] < 0.1 * ft["state_bytes"]
    # dynamic: S, a sparse gradient and moments only where it trained (the paper: 0.76x full FT)
    assert dyn["state_bytes"] < 0.75 * ft["state_bytes"]
    # its gradient is sparse: k entries per layer (int64 row and column, a float32 value), the head dense
    assert dyn["grad_bytes"] == 4 * head + 4 * 164 * (16 + 4)
    assert fixed["real_tokens"] < 2 * 16  # padded
    assert 0 < fixed["support_rotated_share"] <= 1

    page = tmp_path / "results.md"
    assert main(["bench", "report", "--results", str(out), "--output", str(page)]) == 0
    text = page.read_text()
    assert "## Training speed and memory" in text and "| bert-tiny | 2 | sparsegrad-fixed |" in text
    assert "(speed/speed-cpu-fill0.5.png)" in text and (out / "speed-cpu-fill0.5.png").stat().st_size > 0


def test_streaming_bases_match_unfold_and_svd():
    shapes = {"up": (12, 40), "down": (40, 12)}
    stream = bases_bench.measure("streaming", shapes, n=5)
    stream32 = bases_bench.measure("streaming-eigh32", shapes, n=5)
    unfold = bases_bench.measure("unfold", shapes, n=5)
    for role in shapes:
        for side in (0, 1):
            for other in (stream, stream32):
                cos = (other["vectors"][role][side][:4] * unfold["vectors"][role][side][:4]).sum(1).abs()
                assert torch.all(cos > 0.999), (role, side, cos)
    assert bases_bench.gram_flops(shapes, 5) == 2 * 5 * 12 * 40 * 52 * 2


def test_gram_sums_flush_to_float64():
    from sparsegrad.basis import GramAccumulator

    torch.manual_seed(0)
    slices = [torch.randn(8, 20, dtype=torch.float64) for _ in range(7)]
    acc = GramAccumulator(8, 20, flush_every=3)
    for g in slices:
        acc.add(g)
    acc.bases()
    A = sum(g @ g.t() for g in slices)
    assert torch.allclose(acc.A, A, rtol=1e-5) and acc.A.dtype == torch.float64


def test_glue_bench_searches_each_lr_resumes_from_records_and_reports(glue_dir, tmp_path, capsys):
    out = tmp_path / "glue"
    argv = ["bench", "glue", "--data-dir", str(glue_dir), "--tasks", "wnli", "--settings", "head",
            "--methods", "lora", "--levers", "sparsegrad-warm", "--seeds", "0", "1", "--no-extend",
            "--grid", "lora=1e-3,8e-3", "sparsegrad-warm=1e-3,8e-3",
            "--output-dir", str(out), "--workers", "2", "--max-train-samples", "48", "--epochs", "1",
            "--max-eval-samples", "32", "--max-length", "48", "--bases-steps", "2"]  # finetune's options, for the runs
    assert main(argv) == 0
    runs = out / "runs" / "head" / "wnli"
    records = {p.relative_to(runs).as_posix(): json.loads(p.read_text()) for p in runs.glob("*/*.json")}
    assert len(records) == 2 * 3  # per method: 2 lrs on seed 0, then seed 1 at the chosen one
    result = json.loads((out / "glue.json").read_text())
    assert result["runs"] == 6 and not list((out / "work").rglob("model.safetensors"))  # the runs' models are gone
    assert list(result["devices"]) == [r["device"] for r in records.values()][:1] == ["CPU (1 thread)"]
    for row in result["rows"]:
        mine = {k: r for k, r in records.items() if k.startswith(row["method"] + "/")}
        search = {r["lr"]: r["heldout_score"] for r in mine.values() if r["seed"] == 0}
        assert row["lr"] == max(sorted(search), key=search.get)  # chosen on the held-out split, never on dev
        at_lr = [r for r in mine.values() if r["lr"] == row["lr"]]
        assert sorted(r["seed"] for r in at_lr) == [0, 1]
        assert row["mean"] == pytest.approx(np.mean([r["dev_score"] for r in at_lr]))
    warm_lr = next(row["lr"] for row in result["rows"] if row["method"] == "sparsegrad-warm")
    r = records[f"sparsegrad-warm/lr{warm_lr:.3g}-seed1.json"]
    assert (r["heldout_examples"], r["dev_examples"], r["train_examples"]) == (32, 32, 48)  # 127 held out, 32 scored
    assert 0 < min(r["nonzero_row_share"]) <= 1 and r["config"]["max_length"] == 48 and "data_dir" not in r["config"]
    assert r["config"]["bases_warmup_steps"] == 30
    text = capsys.readouterr().out
    assert "**PEFT setting (rest=head)**" in text and "| sparsegrad-warm |" in text

    # resumed: what has a record does not run again; a lost record runs again, alone
    lost = runs / "lora" / next(k.split("/")[1] for k, r in records.items() if k.startswith("lora/") and r["seed"] == 1)
    lost.unlink()
    before = {p: p.stat().st_mtime_ns for p in runs.glob("*/*.json")}
    assert main(argv[:argv.index("--methods")] + ["--methods", "lora", "--levers"] + argv[argv.index("--seeds"):]) == 0
    assert lost.is_file() and all(p.stat().st_mtime_ns == t for p, t in before.items())
    # records made with other options are not mixed in
    assert main([*argv[:-2], "--bases-steps", "3", "--methods", "lora", "--levers"]) == 2
    assert "made with other options" in capsys.readouterr().err

    results = tmp_path / "results"
    (results / "glue").mkdir(parents=True)
    (results / "glue" / "glue.json").write_text((out / "glue.json").read_text())
    page = tmp_path / "docs" / "results.md"
    assert main(["bench", "report", "--results", str(results), "--glue-runs", str(out), "--output", str(page)]) == 0
    text = page.read_text()
    assert "## GLUE, each method at its own learning rate" in text and "| sparsegrad-warm |" in text
    assert "PEFT setting: best per task: wnli" in text and "6 runs" in text
    assert set(json.loads((results / "row_share.json").read_text())["wnli"]) == {"sparsegrad-warm"}


def test_glue_training_subsets_per_task():
    """CoLA and MRPC take larger subsets than the others by default (at 1000 full FT stays near the majority
    class on both); --max-train-samples, when given, is every task's."""
    from sparsegrad.bench.glue import train_subset

    assert (train_subset("cola", None), train_subset("mrpc", None), train_subset("sst2", None)) == (4000, 2000, 1000)
    assert train_subset("cola", 48) == train_subset("sst2", 48) == 48


def test_report_errors_and_bad_options(tmp_path, capsys):
    assert main(["bench", "report", "--results", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["bench", "speed", "--fill", "0", "--output-dir", str(tmp_path / "s")]) == 2
    assert "--fill 0.0" in capsys.readouterr().err
    assert main(["bench", "glue", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "g")]) == 2
    assert "no GLUE task folder" in capsys.readouterr().err
    assert main(["bench", "llm", "--workers", "0", "--output-dir", str(tmp_path / "l")]) == 2
    assert "--workers 0: give 1 or more measurements at a time" in capsys.readouterr().err
    assert not (tmp_path / "l").exists()  # refused before anything is written


def test_layer_bench_ratios_against_full_ft_from_the_same_run(tmp_path, capsys):
    out = tmp_path / "layer"
    argv = ["bench", "layer", "--methods", "ft", "sparsegrad-fixed", "--tokens", "64", "--iters", "1",
            "--repeats", "1", "--device", "cpu", "--output-dir", str(out)]
    assert main(argv) == 0
    rows = json.loads((out / "layer.json").read_text())["rows"]
    assert {(r["d_in"], r["d_out"]) for r in rows} == {(768, 3072), (3072, 768)}
    for r in rows:
        k = round(0.01 * r["d_in"] * r["d_out"])
        if r["method"] == "ft":
            assert r["time_vs_ft"] == 1.0 and r["trainable"] == r["d_in"] * r["d_out"] + r["d_out"]
        else:
            assert r["trainable"] == k
    fixed = next(r for r in rows if r["method"] == "sparsegrad-fixed")
    assert fixed["state_vs_ft"] < 0.1  # k values and their state, not a dense weight's
    assert fixed["bases_bytes"] == 4 * (fixed["d_in"] ** 2 + fixed["d_out"] ** 2)  # U and V, counted apart
    assert "| sparsegrad-fixed |" in capsys.readouterr().out


def test_sharded_bench_bytes_fall_with_the_processes(tmp_path):
    """`bench sharded` on a tiny LLaMA shape at 1 and 2 processes: the sharded bytes halve (to FSDP's
    rounding of odd rows), what is replicated stays, and the projection is the documented arithmetic."""
    from sparsegrad.bench import llm, sharded

    out = tmp_path / "sharded"
    argv = ["bench", "sharded", "--shapes", "tiny", "--methods", "fixed", "lora", "--processes", "1", "2",
            "--seq", "8", "--steps", "1", "--output-dir", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "sharded-cpu-tiny.json").read_text())
    by = {(r["method"], r["processes"]): r for r in result["rows"]}
    assert set(by) == {("fixed", 1), ("fixed", 2), ("lora", 1), ("lora", 2)}
    for method in ("fixed", "lora"):
        one, two = sharded.per_process(by[(method, 1)]), sharded.per_process(by[(method, 2)])
        assert two["sharded"] == pytest.approx(one["sharded"] / 2, rel=0.02)
        assert (two["replicated"], two["bases"]) == (one["replicated"], one["bases"])
    fixed = by[("fixed", 1)]["ranks"][0]
    h, m = llm.SHAPES["tiny"]["hidden_size"], llm.SHAPES["tiny"]["intermediate_size"]
    assert fixed["bases"] == 2 * (h * h + m * m) * 4  # once per role (up, down), float32, on every process
    assert fixed["replicated"]["block0"] > 0 and "block1" not in fixed["replicated"]
    proj = result["projections"]["fixed"]["7B"]
    assert proj["total_per_gpu"] == pytest.approx(proj["sharded_per_gpu"] + proj["replicated"] + proj["bases"])
    assert "Projected per GPU at 8 GPUs" in (out / "sharded-cpu-tiny.md").read_text()


def test_llm_bench_measures_projects_and_resumes(tmp_path):
    """`bench llm` on a tiny LLaMA shape, two measurements at a time: every series measured once, the 32-block
    projection is the documented arithmetic on those rows, a second run reuses them, and the page shows the section."""
    from sparsegrad.bench import llm

    out = tmp_path / "llm"
    argv = ["bench", "llm", "--shapes", "tiny", "--methods", "ft", "lora", "fixed-100k", "dynamic-100k",
            "--targets", "paper", "--blocks", "1", "2", "--checkpointing", "off", "--seq", "16", "--workers", "2",
            "--output-dir", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "llm-cpu-tiny.json").read_text())
    rows = result["rows"]
    # full FT: N = 1, 2; each other method: N = 1, 2 with every block a target, and N = 2 with block 0 only
    assert len(rows) == 2 + 3 * 3
    by = {(r["method"], r["n_blocks"], r["block0_only"]): r for r in rows}
    assert by[("fixed-100k", 2, False)]["trainable"] == 4 * llm.PAPER_N_PARAMS["tiny"]  # up, down x 2 blocks
    assert by[("fixed-100k", 2, True)]["trainable"] == 2 * llm.PAPER_N_PARAMS["tiny"]
    assert by[("lora", 1, False)]["lora_rank"] == 32
    for r in rows:
        assert r["peak_bytes"] > 0 and r["state_bytes"] > 0
    proj = {p["method"]: p for p in result["projections"]}
    assert set(proj) == {"ft", "lora", "fixed-100k", "dynamic-100k"}
    one, two, other = (by[("fixed-100k", n, b0)]["state_bytes"] for n, b0 in ((1, False), (2, False), (2, True)))
    assert proj["fixed-100k"]["state_bytes_32"] == pytest.approx(one + 10 * (two - one) + 21 * (other - one))
    ft1, ft2 = by[("ft", 1, False)]["peak_bytes"], by[("ft", 2, False)]["peak_bytes"]
    assert proj["ft"]["peak_bytes_32"] == pytest.approx(ft1 + 31 * (ft2 - ft1))
    assert proj["lora"]["peak_bytes_32_vs_lora"] == pytest.approx(1.0)

    assert main(argv) == 0  # resumes: nothing measured again
    assert json.loads((out / "llm-cpu-tiny.json").read_text())["rows"] == rows
    page = tmp_path / "results.md"
    assert main(["bench", "report", "--results", str(out), "--output", str(page)]) == 0
    text = page.read_text()
    assert "## LLaMA-2-7B shapes on one device" in text and "| fixed-100k | paper | off |" in text
    assert "7B shapes, peak, fixed / LoRA <= 1.05" in text


@pytest.mark.parametrize("mode", ["fixed", "dynamic"])
def test_fold_cost_is_measured_per_dtype(mode):
    from sparsegrad.bench import layer as layer_bench

    spec = {"mode": mode, "d_in": 48, "d_out": 80, "tokens": 32, "density": 0.05, "iters": 2, "device": "cpu"}
    f32 = layer_bench.measure_fold({**spec, "dtype": "float32"})
    bf16 = layer_bench.measure_fold({**spec, "dtype": "bfloat16"})
    assert f32["fold_s"] > 0 and bf16["fold_s"] > 0 and f32["w0_kept_share"] is None
    assert 0 <= bf16["w0_kept_share"] < 0.05


def test_adapter_bench_sizes_and_reproduction(tiny_llama_dir, chat_file, tmp_path, capsys):
    """The peft adapter's sizes against LoRA from the same run, each form read back onto a fresh model."""
    out = tmp_path / "adapter"
    argv = ["bench", "adapter", "--data", str(chat_file), "--model", str(tiny_llama_dir), "--targets", "up_proj",
            "down_proj", "--blocks", "all", "--density", "0.1", "--bases-steps", "1", "--steps", "2",
            "--batch-size", "4", "--output-dir", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "adapter.json").read_text())
    rows = {r["form"]: r for r in result["rows"]}
    lora = next(r for form, r in rows.items() if form.startswith("lora"))
    assert lora["x_lora"] == 1.0
    for mode in ("fixed", "dynamic"):
        embedded = rows[f"sparsegrad-{mode}, bases embedded"]
        reference = rows[f"sparsegrad-{mode}, bases by reference"]
        assert reference["bytes"] < embedded["bytes"]
        assert embedded["max_logit_diff"] < 1e-4 and reference["max_logit_diff"] < 1e-4
        probe = result["probes"][mode]
        assert probe["float16_rows_bytes"] < embedded["bytes"]
        assert all(0 < n <= d for n, d in probe["basis_rows"].values())
    assert "bases by reference" in capsys.readouterr().out


def test_chat_bench_searches_each_lr_by_the_lowest_held_out_loss(tiny_llama_dir, chat_file, tmp_path, capsys):
    out = tmp_path / "chat"
    argv = ["bench", "chat", "--data-dir", str(chat_file), "--model", str(tiny_llama_dir), "--methods", "lora",
            "sparsegrad-fixed", "--bf16-methods", "--seeds", "0", "1", "--grid", "1e-3", "1e-2", "--no-extend",
            "--targets", "up_proj", "down_proj", "--blocks", "all", "--density", "0.1", "--bases-steps", "2",
            "--max-length", "64", "--batch-size", "8", "--heldout", "0.25", "--cpu", "--output-dir", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "chat.json").read_text())
    assert result["runs"] == 6 and {r["method"] for r in result["rows"]} == {"lora", "sparsegrad-fixed"}
    for row in result["rows"]:
        assert row["greater_is_better"] is False and row["seeds"] == [0, 1]
        losses = {float(lr): v for lr, v in row["search"].items()}
        assert row["lr"] == min(losses, key=losses.get)  # the lower held-out loss wins
        assert row["mean"] > 0 and row["dev_baseline"] > row["mean"]  # trained below the untrained model
    assert "| sparsegrad-fixed |" in capsys.readouterr().out

    results = tmp_path / "results"
    (results / "chat").mkdir(parents=True)
    (results / "chat" / "chat.json").write_text((out / "chat.json").read_text())
    page = tmp_path / "results.md"
    assert main(["bench", "report", "--results", str(results), "--output", str(page)]) == 0
    assert "## Instruction tuning (paper Table 6)" in page.read_text()


def test_glue_reading_names_ties_margins_and_the_majority():
    """The results page's sentence: a tie is named as one, LoRA's win over fixed counts only beyond the
    larger seed spread, and a task where full FT does not beat the majority class is flagged."""
    from sparsegrad.bench.report import glue_reading

    def row(task, method, mean, std, seeds=(0, 1, 2)):
        return {"setting": "head", "task": task, "method": method, "mean": mean, "std": std, "seeds": list(seeds),
                "dev_baseline": {"sst2": 0.509, "wnli": 0.563}[task]}

    rows = [row("sst2", "ft", 0.809, 0.010), row("sst2", "lora", 0.812, 0.006),
            row("sst2", "sparsegrad-fixed", 0.793, 0.011), row("wnli", "ft", 0.563, 0.0),
            row("wnli", "lora", 0.563, 0.0), row("wnli", "sparsegrad-fixed", 0.563, 0.0)]
    text, = glue_reading({"rows": rows})
    assert "best per task: sst2 lora (1 other within the seeds' spread), wnli 3 methods tied." in text
    assert "beats matched LoRA by more than the seeds' spread on no task, and loses by more on sst2; " \
           "the two are within their spread on wnli." in text
    assert "does not beat the majority class on wnli," in text
    rows[1]["std"] = 0.02  # now within the spread
    text, = glue_reading({"rows": rows})
    assert "loses by more on no task; the two are within their spread on sst2, wnli." in text
    assert "sst2 lora (2 others within the seeds' spread)" in text
    rows[1]["std"], rows[0]["mean"] = 0.001, 0.70  # a clear win: nothing said
    assert "best per task: sst2 lora, wnli" in glue_reading({"rows": rows})[0]
    del rows[5]  # a task SparseGrad has not run yet is in neither list
    assert "loses by more on sst2; the two are within their spread on no task." in glue_reading({"rows": rows})[0]
    # a row on fewer seeds than the others is still being built: named, and compared with nothing
    rows.append(row("wnli", "sparsegrad-fixed", 0.70, 0.0, seeds=(0,)))
    text, = glue_reading({"rows": rows})
    assert "Still running, so left out of this reading: wnli sparsegrad-fixed. " in text
    assert "best per task: sst2 lora, wnli ft and lora." in text  # not the unfinished 0.70
    assert "loses by more on sst2; the two are within their spread on no task." in text


def test_chat_reading_names_the_lowest_loss_and_fixed_against_lora():
    """The decoder table's sentence: lower is better; a gap inside the larger seed spread is no win; a row on
    fewer seeds is named as running and compared with nothing."""
    from sparsegrad.bench.report import chat_reading

    def row(method, mean, std, seeds=(0, 1, 2)):
        return {"setting": "fp32", "task": "chat", "method": method, "mean": mean, "std": std, "seeds": list(seeds),
                "dev_baseline": 2.29, "train_examples": 135}

    rows = [row("ft", 1.914, 0.003), row("lora", 1.9215, 0.0016), row("sparsegrad-fixed", 1.9216, 0.0004)]
    text, = chat_reading({"rows": rows})
    assert text.startswith("Lowest validation loss: ft (1.9140), lower than every other method by more than")
    assert "SparseGrad fixed against matched LoRA: +0.0001 (larger spread 0.0016): within the seeds' spread." in text
    rows[2]["mean"] = 1.915  # now lower than LoRA beyond the spread, and within ft's
    text, = chat_reading({"rows": rows + [row("sparsegrad-dynamic", 1.0, 0.0, seeds=(0,))]})
    assert "Lowest validation loss: ft (1.9140), with sparsegrad-fixed within the seeds' spread of it." in text
    assert ": -0.0065 (larger spread 0.0016): lower." in text
    assert "Still running, so left out of this reading: sparsegrad-dynamic." in text


def test_committed_glue_table_is_rebuilt_by_its_committed_records():
    """The results page's GLUE table comes from run records kept in git: every row must come back from them,
    or a clean clone could neither resume the bench nor check the table."""
    from pathlib import Path

    from sparsegrad.bench.glue import KEYS
    from sparsegrad.bench.protocol import read_records, summarize

    glue = Path(__file__).resolve().parents[2] / "docs" / "results" / "glue"
    if not (glue / "glue.json").is_file():
        pytest.skip("no committed GLUE results")
    committed = json.loads((glue / "glue.json").read_text())
    rebuilt = summarize(read_records(glue / "runs"), KEYS)
    assert rebuilt["runs"] == committed["runs"]
    assert json.loads(json.dumps(rebuilt["rows"])) == committed["rows"]


def test_doc_paragraph_keeps_lists_and_formulas_of_a_docstring():
    """The results page quotes bench docstrings: a "- " list stays a list (wrapped lines joined to their item),
    an indented formula a code block, and prose one line."""
    from types import SimpleNamespace

    from sparsegrad.bench.report import doc_paragraph

    doc = SimpleNamespace(__doc__="Title.\n\nIt reports:\n  - peak memory, or on CPU the\n    peak RSS;\n"
                                  "  - seconds.\nMethods: full\nFT. Then:\n    all:  at 32 = a\n"
                                  "    paper: at 32 = b\nand so on.\n")
    assert doc_paragraph(doc, 1) == ("It reports:\n\n- peak memory, or on CPU the peak RSS;\n- seconds.\n\n"
                                     "Methods: full FT. Then:\n\n```\nall:  at 32 = a\npaper: at 32 = b\n```\n\n"
                                     "and so on.")
    assert doc_paragraph(doc, 0) == "Title."


def test_llm_reading_states_the_projections_it_reads():
    """The 7B-shape section's sentence quotes the projected ratios of the committed GPU run, and says nothing
    where a series it needs is missing."""
    from pathlib import Path

    from sparsegrad.bench.report import _llm_reading

    path = Path(__file__).resolve().parents[2] / "docs" / "results" / "llm-cuda.json"
    if not path.is_file():
        pytest.skip("no committed 7B-shape results")
    result = json.loads(path.read_text())
    proj = {(p["method"], p["targets"], p["checkpointing"]): p for p in result["projections"]}
    off, on = proj[("fixed-100k", "paper", False)], proj[("fixed-100k", "paper", True)]
    text = _llm_reading(result)[0]
    assert f"needs {off['peak_bytes_32_vs_lora']:.2f}x LoRA's peak without checkpointing" in text
    assert f"{on['peak_bytes_32_vs_lora']:.2f}x with it, and {off['state_bytes_32_vs_lora']:.2f}x" in text
    partial = {**result, "projections": [p for p in result["projections"] if p["method"] != "dynamic-100k"]}
    assert _llm_reading(partial) == []


def test_default_lrs_take_the_best_mean_over_the_tasks_that_measure_something():
    """A task where full FT does not beat the majority class, or a row still being built, chooses nothing; the
    others' held-out scores are averaged per lr tried on all of them."""
    from sparsegrad.bench.glue import default_lrs

    def row(task, method, search, mean=0.8, seeds=(0, 1, 2)):
        return {"setting": "head", "task": task, "method": method, "mean": mean, "std": 0.01, "seeds": list(seeds),
                "dev_baseline": {"sst2": 0.5, "mrpc": 0.81, "wnli": 0.56}[task], "search": search}

    rows = [row("sst2", "ft", {"0.0001": 0.8}), row("mrpc", "ft", {"0.0001": 0.83}, mean=0.84),
            row("wnli", "ft", {"0.0001": 0.5}, mean=0.56),  # at the majority: measures nothing
            row("sst2", "lora", {"0.0005": 0.80, "0.002": 0.82}),
            row("mrpc", "lora", {"0.000125": 0.9, "0.0005": 0.83, "0.002": 0.80}),  # 1.25e-4 not tried on sst2
            row("wnli", "lora", {"0.0005": 0.0, "0.002": 0.9}),
            row("sst2", "meprop", {"0.0004": 0.8}, seeds=(0,))]  # still being built
    lrs = default_lrs({"rows": rows}, "head")
    assert set(lrs) == {"ft", "lora"}
    assert lrs["lora"]["tasks"] == ["mrpc", "sst2"] and lrs["lora"]["lr"] == 5e-4  # 81.5 against 81.0
    assert lrs["lora"]["means"] == pytest.approx({5e-4: 81.5, 2e-3: 81.0})
    rows[4]["search"]["0.002"] = 0.85  # now 2e-3 leads the mean
    assert default_lrs({"rows": rows}, "head")["lora"]["lr"] == 2e-3


def test_recipes_default_lrs_are_the_committed_benches_choices():
    """The recipes' DEFAULT_LR must say what the committed GLUE and chat records choose: classification per
    setting by the best mean held-out score over the tasks that measure something, chat by the chat bench's lr."""
    from pathlib import Path

    from sparsegrad.bench.glue import default_lrs
    from sparsegrad.recipes.methods import DEFAULT_LR

    results = Path(__file__).resolve().parents[2] / "docs" / "results"
    if not (results / "glue" / "glue.json").is_file() or not (results / "chat" / "chat.json").is_file():
        pytest.skip("no committed GLUE and chat results")
    glue = json.loads((results / "glue" / "glue.json").read_text())
    checked = 0
    for setting in ("head", "all"):
        for method, choice in default_lrs(glue, setting).items():
            if ("classification", setting, method) in DEFAULT_LR:
                assert DEFAULT_LR[("classification", setting, method)] == choice["lr"], (setting, method, choice)
                checked += 1
    chat = json.loads((results / "chat" / "chat.json").read_text())
    for row in (r for r in chat["rows"] if r["setting"] == "fp32"):
        assert DEFAULT_LR[("causal_lm", "none", row["method"])] == row["lr"], row["method"]
        checked += 1
    assert checked >= 10


def test_fold_7b_counts_r_and_flops():
    """The fold's arithmetic from r: the fixed support's r is its own; the dynamic fold takes the smaller side."""
    from sparsegrad.bench import layer as layer_bench

    row = layer_bench.measure_fold_7b({"layer": "up_proj", "d_in": 32, "d_out": 86, "entries": "1%", "k": 28,
                                       "device": "cpu"})
    assert 1 <= row["fixed_r"] <= 28 and row["dynamic_r"] == 32
    r = row["fixed_r"]  # the CSR product costs k x (its columns), then r x d_in x d_out in either orientation
    assert row["fixed_flops"] in (2 * (28 * 86 + r * 32 * 86), 2 * (28 * 32 + r * 32 * 86))
    assert row["dynamic_flops"] == 2 * (28 * 86 + 32 * 32 * 86)
    assert row["forward_512_flops"] == 2 * 512 * 32 * 86 and row["dynamic_s"] > 0
    assert "| up_proj (32->86) | 1% (28) | dynamic, static | 32 |" in layer_bench.fold_7b_table([row])


@pytest.mark.parametrize("mode", ["fixed", "dynamic"])
def test_a_role_folds_together_in_fewer_operators(mode):
    """Folding a role's layers alone dispatches several operators per layer, together at most one more per
    layer (the dynamic mode's index offsets); neither reads the device back."""
    from sparsegrad.bench import layer as layer_bench

    spec = {"role": "tiny", "d_in": 24, "d_out": 40, "mode": mode, "device": "cpu", "iters": 2}
    rows = [layer_bench.measure_fold_role({**spec, "layers": n}) for n in (2, 5)]
    assert rows[1]["alone_ops"] - rows[0]["alone_ops"] >= 3 * 4
    assert rows[1]["together_ops"] - rows[0]["together_ops"] <= 3
    assert rows[1]["together_ops"] < rows[1]["alone_ops"]
    assert all(r["alone_read_backs"] == r["together_read_backs"] == 0 for r in rows)
    assert "| tiny (24->40) | 5 |" in layer_bench.fold_role_table(rows)


def test_gpu_bench_runs_every_setting_and_keeps_to_its_budget(tmp_path, capsys):
    """`bench gpu` end to end on tiny shapes on the CPU: every method in every setting, ratios from the same
    run, read-backs counted, a compiled row, the JSON and the results page; a spent budget runs nothing."""
    out, page = tmp_path / "results", tmp_path / "results.md"
    argv = ["bench", "gpu", "--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--no-tests",
            "--output-dir", str(out / "gpu")]
    assert main([*argv, "--settings", "table3", "llama7b", "--compile", "off"]) == 0
    result = json.loads((out / "gpu" / "gpu-cpu-tiny.json").read_text())
    from sparsegrad.bench.gpu import METHODS, SETTINGS

    assert "sparsegrad-block" in METHODS
    assert {(r["setting"], r["method"]) for r in result["rows"]} == {(s, m) for s in ("table3", "llama7b") for m in METHODS}
    for r in result["rows"]:
        assert r["steps_per_s"] > 0 and r["read_backs"]["per_step"] >= 0 and len(r["times"]) == 2
        assert "operators by time" in (out / "gpu" / "profiles" / f"{r['setting']}-{r['method']}.txt").read_text()
        if r["method"] == "lora":
            assert r["speed_vs_lora"] == 1.0
    assert main([*argv, "--settings", "minilm", "--methods", "lora", "sparsegrad-fixed", "--compile", "on"]) == 0
    compiled = json.loads((out / "gpu" / "gpu-cpu-tiny.json").read_text())["rows"]
    assert [r["compile"] for r in compiled] == [True, True] and compiled[1]["read_backs"] is None
    assert main([*argv, "--budget-s", "0"]) == 0
    spent = json.loads((out / "gpu" / "gpu-cpu-tiny.json").read_text())
    assert spent["rows"] == [] and len(spent["not_run"]) == 2 * len(SETTINGS) * len(METHODS)  # eager, compiled
    assert "Not run within the 0 s budget" in capsys.readouterr().out
    assert main(["bench", "report", "--results", str(out), "--output", str(page)]) == 0
    assert "## The GPU check" in page.read_text()


@pytest.mark.parametrize("shape,tokens,k", [((48, 160), 64, 77), ((160, 48), 64, 77), ((48, 160), 2, 77),
                                            ((8, 160), 512, 1280)])
def test_support_bench_counts_the_flops_the_kernels_run(shape, tokens, k):
    """bench support's arithmetic for a block support's gradient is what torch counts the kernel doing (every path:
    rotated activations, dense gradient, both sides rotated), and the block costs a fraction of the scattered
    support's and of full FT's weight gradient; the table's ratios come from one count."""
    from torch.utils.flop_counter import FlopCounterMode

    from sparsegrad.bench.support import flops_rows, flops_table, gradient_macs
    from sparsegrad.support import SupportPlan, block_support

    d_in, d_out = shape
    energy = torch.rand(d_in, d_out, generator=torch.Generator().manual_seed(0)) ** 8
    plan = SupportPlan.build(*block_support(energy, k), d_in, d_out)
    assert plan.block_cols is not None
    U, V = torch.linalg.qr(torch.randn(d_in, d_in))[0], torch.linalg.qr(torch.randn(d_out, d_out))[0]
    x, dy = torch.randn(tokens, d_in), torch.randn(tokens, d_out)
    with FlopCounterMode(display=False) as counter:
        plan.gather(*plan.sides(x, dy), *plan.sides(U, V))
    assert counter.get_total_flops() == 2 * gradient_macs(plan, d_in, d_out, tokens)

    rows = flops_rows(0.01)
    by = {(r["model"], r["entries"], r["method"].split(" ")[0]): r for r in rows}
    for model in ("MiniLM", "RoBERTa-base"):
        block, fixed, ft = (by[model, "1%", m] for m in ("sparsegrad-block", "sparsegrad-fixed", "ft"))
        assert block["trained_grad"] < fixed["trained_grad"] / 2 and block["trained_grad"] < ft["trained_grad"] / 2
        assert block["fold"] < fixed["fold"] / 2
        assert by[model, "1%", "lora"]["total_vs_lora"] == 1.0
    assert "| LLaMA-2-7B 4096->11008 (512) | 100k (100,000) | sparsegrad-block |" in flops_table(rows)


def test_support_decision_follows_its_stated_rule():
    """The block support becomes the default only when it is within the seeds' spread of the scattered support (or
    better) on every task compared and cheaper; a loss counts lower as better; unfinished tasks decide nothing."""
    from sparsegrad.bench.support import decision, quality_rows, quality_table

    def row(setting, task, method, mean, std, greater=True):
        return {"setting": setting, "task": task, "method": method, "mean": mean, "std": std, "seeds": [0, 1, 2],
                "lr": 1e-3, "metric": "loss" if not greater else "accuracy", "greater_is_better": greater}

    def results(block_sst2, block_chat):
        glue = {"rows": [row("head", t, m, 0.80, 0.01) for t in ("cola", "mrpc", "sst2")
                         for m in ("lora", "sparsegrad-fixed")]
                + [row("head", "cola", "sparsegrad-block", 0.80, 0.01), row("head", "mrpc", "sparsegrad-block", 0.81, 0.01),
                   row("head", "sst2", "sparsegrad-block", block_sst2, 0.01)]}
        chat = {"rows": [row("fp32", "chat", "lora", 1.90, 0.002, False), row("fp32", "chat", "sparsegrad-fixed", 1.90, 0.002, False),
                         row("fp32", "chat", "sparsegrad-block", block_chat, 0.002, False)]}
        return quality_rows(glue, chat)

    assert decision(results(0.795, 1.901), cheaper=True)["default"]  # within on every task
    assert not decision(results(0.795, 1.901), cheaper=False)["default"]
    worse = decision(results(0.77, 1.901), cheaper=True)
    assert not worse["default"] and worse["worse"] == ["sst2"] and worse["below_lora"]["sparsegrad-block"] == ["sst2"]
    assert decision(results(0.795, 1.905), cheaper=True)["worse"] == ["chat"]  # a higher loss is worse
    assert decision(results(0.795, 1.895), cheaper=True)["default"]  # a lower loss is better
    unfinished = results(0.795, 1.901)
    unfinished[0]["sparsegrad-block"] = None
    assert decision(unfinished, cheaper=True)["missing"] == ["cola"] and not decision(unfinished, True)["decided"]
    unfinished = results(0.77, 1.901)
    unfinished[0]["sparsegrad-block"] = None  # worse on sst2 already: decided whatever cola brings
    assert decision(unfinished, cheaper=True)["decided"] and not decision(unfinished, cheaper=True)["default"]
    assert "| sst2 (accuracy) | 80.0 ± 1.0 (lr 0.001) | 80.0 ± 1.0 (lr 0.001) | 77.0 ± 1.0 (lr 0.001) | -3.0 (spread 1.0): worse |" \
        in quality_table(results(0.77, 1.901))


def test_support_bench_parts_and_energy_table(tmp_path):
    """bench support measures the parts asked for and keeps the others from its support.json (refusing a folder
    where a needed part was never measured); the energy rows say what share of the top-k's energy the block keeps."""
    import argparse

    from sparsegrad.basis import Bases
    from sparsegrad.bench import support

    args = argparse.Namespace(parts=["flops"], density=0.01, output_dir=str(tmp_path), chat_data=None, repeats=1)
    with pytest.raises(ValueError, match="has no energy yet: add --parts energy"):
        support.run(args)
    g = torch.Generator().manual_seed(0)
    energy = {f"model.layers.{i}.mlp.up_proj": torch.rand(16, 40, generator=g) ** 6 for i in (10, 2)}
    rows = support.energy_rows("tiny", Bases({}, {}, {}, energy, {}), 0.05)
    assert [r["layer"] for r in rows] == ["model.layers.2.mlp.up_proj", "model.layers.10.mlp.up_proj"]  # block order
    for r in rows:
        assert r["k"] == 32 and 0 < r["block_kept"] <= 1.0 + 1e-12 and 0 < r["topk_share"] < 1
        rr, cc = (int(v) for v in r["block"].split("x"))
        assert min(rr, cc) == r["block_r"] and (rr - 1) * cc < r["k"] <= rr * cc
    (tmp_path / "support.json").write_text(json.dumps({"meta": {"density": 0.01, "seconds": 1.0}, "energy": rows}))
    result = support.run(args)
    assert result["energy"] == rows and result["flops"] and result["meta"]["seconds"] > 1.0
    assert "| tiny | model.layers.2.mlp.up_proj | 32 |" in support.markdown(result)
    with pytest.raises(ValueError, match="measured at density 0.01"):
        support.run(argparse.Namespace(**{**vars(args), "density": 0.02}))
