"""One fine-tuning run: one model, one task, one method, one seed. The same loop for every method.

    data -> tokenizer/model -> [preliminary phase: bases] -> methods.prepare -> train with
    sparsegrad.optimizer + linear schedule, evaluate each epoch (or every eval_steps), keep the best
    model on validation, stop early after `patience` evaluations without improvement -> results.json

accelerate places the model and runs mixed precision; checkpoints are atomic (see checkpoint.py)
and `resume=True` continues a killed run to the same final metrics.
"""
from __future__ import annotations

import importlib.metadata
import math
import platform
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .basis import Bases, compute_bases
from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    save_weights,
    set_rng_state,
    write_json_atomic,
)
from .methods import canonical_method, prepare
from .model import take_row_share
from .optim import optimizer as make_optimizer
from .tasks import Task, TaskData, compute_metrics, load_task, majority_baseline


@dataclass
class RunConfig:
    """Everything that defines a run (saved in results.json; a resumed run must match it)."""

    task: str = "bbcnews"
    method: str = "sparsegrad"
    model: str | None = None            # local folder or hub name; None: the embedded MiniLM
    mode: str = "fixed"                 # SparseGrad mode
    density: float | None = None        # None and n_params None: 1%
    n_params: int | None = None         # k per layer
    rest: str = "all"                   # "all" (paper) or "head"
    targets: list[str] | None = None
    lora_rank: int | None = None        # None: matched to the sparse budget
    epochs: int | None = None           # None: the task's default (GLUE 20, bbcnews 2)
    max_steps: int | None = None
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    max_length: int = 128
    patience: int = 3                   # evaluations without improvement before stopping
    eval_steps: int | None = None       # None: evaluate at the end of each epoch
    save_steps: int | None = None       # extra checkpoints between evaluations
    eval_batch_size: int = 64
    seed: int = 0
    data_dir: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    bases_steps: int = 11               # preliminary-phase batches (BERT-base: 11 x 12 blocks = 132 slices)
    mixed_precision: str = "no"         # "no" | "bf16" | "fp16" (accelerate)
    cpu: bool = False                   # force the CPU even where CUDA is there

    def __post_init__(self) -> None:
        self.method = canonical_method(self.method)

    def identity(self) -> dict:
        """The fields that must match for a folder to hold 'the same run'."""
        return asdict(self)


@dataclass
class LoopState:
    """The loop's own state, saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_score: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    history: list = field(default_factory=list)
    train_seconds: float = 0.0
    loss_sum: float = 0.0               # training loss since the last evaluation
    loss_steps: int = 0
    row_share: list = field(default_factory=list)  # per step: non-zero rows of dy in the sparse layers
    finished: bool = False
    stopped_early: bool = False
    resumed_at: list = field(default_factory=list)


# ---------------------------------------------------------------- model and data

def default_model() -> str:
    from .assets import minilm_path

    return str(minilm_path())


def load_model(name: str | None, task: Task):
    """(tokenizer, model) for sequence classification; a clear error if the folder does not load."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    name = name or default_model()
    if Path(name).exists() and not (Path(name) / "config.json").is_file():
        raise ValueError(f"--model {name}: the folder holds no config.json; pass a Hugging Face model folder")
    kwargs = {"num_labels": task.num_labels}
    if task.is_regression:
        kwargs["problem_type"] = "regression"
    else:
        kwargs["id2label"] = dict(enumerate(task.labels))
        kwargs["label2id"] = {label: i for i, label in enumerate(task.labels)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSequenceClassification.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--model {name}: could not load a model ({reason}); pass a local Hugging Face model "
                         "folder, or a hub name with a network") from None
    if tokenizer.pad_token is None:  # decoders: pad with the end-of-sequence token
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def encode(tokenizer, examples: list[dict], max_length: int) -> list[dict]:
    """Tokenize without padding (padding happens per batch); labels under "labels". Token ids are
    kept as int32 arrays: QQP and MNLI hold ~400k examples."""
    texts = [e["text"] for e in examples]
    pairs = [e["text_pair"] for e in examples] if examples[0]["text_pair"] is not None else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    keys = list(enc.keys())
    return [{**{k: np.asarray(enc[k][i], dtype=np.int32) for k in keys}, "labels": e["label"]}
            for i, e in enumerate(examples)]


class Batcher:
    """Pads a list of encoded examples into a batch; the order of an epoch is a fixed
    permutation of (seed, epoch), so a resumed run sees the same batches."""

    def __init__(self, tokenizer, encoded: list[dict], batch_size: int, seed: int):
        from transformers import DataCollatorWithPadding

        self.collate = DataCollatorWithPadding(tokenizer)
        self.encoded, self.batch_size, self.seed = encoded, batch_size, seed
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return (len(self.encoded) + self.batch_size - 1) // self.batch_size

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.encoded))
        return self._order[1]

    def batch(self, epoch: int, i: int) -> dict:
        idx = self.order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        return self.collate([self.encoded[j] for j in idx])


@torch.no_grad()
def predict(model, tokenizer, encoded: list[dict], batch_size: int, device, task: Task) -> np.ndarray:
    """Class ids (or scores) for `encoded`, in order; batches sorted by length to pad less."""
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    model.eval()
    order = np.argsort([len(e["input_ids"]) for e in encoded], kind="stable")
    out = np.empty(len(encoded), dtype=np.float64 if task.is_regression else np.int64)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = collate([{k: v for k, v in encoded[j].items() if k != "labels"} for j in idx])
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
        out[idx] = (logits[:, 0] if task.is_regression else logits.argmax(-1)).cpu().numpy()
    model.train()
    return out


def evaluate(model, tokenizer, encoded: list[dict], cfg: RunConfig, device, task: Task) -> dict[str, float]:
    preds = predict(model, tokenizer, encoded, cfg.eval_batch_size, device, task)
    return compute_metrics(task, preds, np.array([e["labels"] for e in encoded]))


# ---------------------------------------------------------------- the preliminary phase

def prepare_bases(model, batcher: Batcher, cfg: RunConfig, path: Path, progress: bool) -> tuple[Bases, dict]:
    """Load the bases from `path`, or compute them on the first `bases_steps` training batches and
    save them there (atomically). Returns (bases, {"seconds", "source"})."""
    if path.is_file():
        return Bases.load(path), {"source": str(path), "seconds": 0.0}
    device = next(model.parameters()).device
    batches = ({k: v.to(device) for k, v in batcher.batch(0, i).items()}
               for i in range(min(cfg.bases_steps, len(batcher))))
    start = time.perf_counter()
    model.eval()  # no dropout: the energy pass replays exactly the gradients the Gram sums saw
    bases = compute_bases(model, batches, n_steps=cfg.bases_steps, targets=cfg.targets, progress=progress)
    model.train()
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    bases.save(path)
    return bases, {"source": "computed", "seconds": seconds}


# ---------------------------------------------------------------- bookkeeping

def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("sparsegrad", "torch", "transformers", "peft", "accelerate", "safetensors"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(MB, what it is): the CUDA allocator's peak since reset, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss_process"


def set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- the run

def finetune(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    bases_file: str | Path | None = None,
    resume: bool = False,
    data: TaskData | None = None,
    progress: bool = True,
) -> dict:
    """Fine-tune and evaluate one run into `run_dir`; return its results (also in results.json).

    bases_file: where the bases are read from, or computed into (default run_dir/bases.safetensors).
    resume: continue from the last checkpoint in run_dir (or return the results of a finished run).
    """
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    run_dir = Path(run_dir)
    results_file = run_dir / "results.json"
    if resume and results_file.is_file():
        import json

        return json.loads(results_file.read_text())

    data = data or load_task(cfg.task, cfg.data_dir, max_train_samples=cfg.max_train_samples,
                             max_eval_samples=cfg.max_eval_samples)
    task = data.task
    set_seed(cfg.seed)
    tokenizer, model = load_model(cfg.model, task)
    accelerator = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision)
    device = accelerator.device
    model.to(device)

    train = encode(tokenizer, data.train, cfg.max_length)
    evals = {name: encode(tokenizer, split, cfg.max_length) for name, split in data.eval.items()}
    select_split = next(iter(evals))
    batcher = Batcher(tokenizer, train, cfg.batch_size, cfg.seed)

    bases, bases_info = None, None
    if cfg.method == "sparsegrad":
        bases, bases_info = prepare_bases(model, batcher, cfg, Path(bases_file or run_dir / "bases.safetensors"),
                                          progress)
        bases_info["top1pct_energy_share"] = _mean_shares(bases)
    torch.manual_seed(cfg.seed)  # the same RNG stream from here on, whether bases were computed or loaded
    info = prepare(model, cfg.method, rest=cfg.rest, bases=bases, mode=cfg.mode, density=cfg.density,
                   n_params=cfg.n_params, targets=cfg.targets, lora_rank=cfg.lora_rank)
    model = accelerator.prepare_model(model)

    epochs = cfg.epochs or task.default_epochs
    total_steps = epochs * len(batcher) if cfg.max_steps is None else min(cfg.max_steps, epochs * len(batcher))
    opt = make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(opt, round(cfg.warmup_ratio * total_steps), total_steps)

    state = LoopState()
    ckpt_root = run_dir / "checkpoints"
    ckpt = latest_checkpoint(ckpt_root) if resume else None
    if ckpt is not None:
        saved = load_checkpoint(ckpt, model)
        opt.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        state = LoopState(**saved["loop"])
        state.resumed_at.append(state.step)
    run_dir.mkdir(parents=True, exist_ok=True)

    def checkpoint() -> None:
        save_checkpoint(ckpt_root, state.step, model, {
            "optimizer": opt.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
            "loop": asdict(state)})

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=total_steps, initial=state.step, desc=f"{task.name} {info.method} seed {cfg.seed}",
               disable=not progress, dynamic_ncols=True)
    model.train()
    while not state.finished:
        if state.step >= total_steps or state.epoch >= epochs:
            state.finished = True
            break
        batch = {k: v.to(device) for k, v in batcher.batch(state.epoch, state.step_in_epoch).items()}
        start = time.perf_counter()
        with accelerator.autocast():
            loss = model(**batch).loss
        accelerator.backward(loss)
        share = take_row_share(model)
        if share is not None:
            state.row_share.append(round(share, 4))
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        scheduler.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()  # also waits for the device, so the step time is complete
        state.train_seconds += time.perf_counter() - start
        state.loss_sum, state.loss_steps = state.loss_sum + loss_value, state.loss_steps + 1
        state.step += 1
        state.step_in_epoch += 1
        bar.update()
        bar.set_postfix(loss=f"{loss_value:.4f}")
        end_of_epoch = state.step_in_epoch == len(batcher)
        if end_of_epoch:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        last = state.step >= total_steps or state.epoch >= epochs
        if (end_of_epoch if cfg.eval_steps is None else state.step % cfg.eval_steps == 0) or last:
            metrics = evaluate(model, tokenizer, evals[select_split], cfg, device, task)
            score = metrics[task.metric] if math.isfinite(metrics[task.metric]) else float("-inf")  # diverged
            state.history.append({"step": state.step, "epoch": state.step / len(batcher),
                                  "loss": state.loss_sum / state.loss_steps, select_split: metrics})
            state.loss_sum, state.loss_steps = 0.0, 0
            if state.best_score is None or score > state.best_score:
                state.best_score, state.best_step, state.bad_evals = score, state.step, 0
                save_weights(model, run_dir / "best")
            else:
                state.bad_evals += 1
            bar.write(f"step {state.step} epoch {state.step / len(batcher):.2f}: {select_split} "
                      + " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                      + (" *" if state.best_step == state.step else ""), file=sys.stderr)
            if cfg.patience and state.bad_evals >= cfg.patience:
                state.finished = state.stopped_early = True
            state.finished = state.finished or last
            checkpoint()
        elif cfg.save_steps and state.step % cfg.save_steps == 0:
            checkpoint()
    bar.close()
    memory_mb, memory_kind = peak_memory(device)

    # best-on-validation: reload the best weights and evaluate every split
    load_weights(accelerator.unwrap_model(model), run_dir / "best")
    final = {name: evaluate(model, tokenizer, enc, cfg, device, task) for name, enc in evals.items()}
    results = {
        "config": cfg.identity(),
        "task": task.name, "metric": task.metric, "score": final[select_split][task.metric],
        "final": final, "best_step": state.best_step,
        "majority_baseline": majority_baseline(task, data.train, data.eval[select_split]),
        "method": info.as_dict(), "bases": bases_info,
        "history": state.history, "nonzero_row_share": state.row_share,
        "stopped_early": state.stopped_early, "resumed_at": state.resumed_at,
        "train_steps": state.step, "train_seconds": state.train_seconds,
        "steps_per_s": state.step / state.train_seconds if state.train_seconds else None,
        "peak_memory_mb": memory_mb, "memory_kind": memory_kind, "device": str(device),
        "data": {"source": data.source, "train": len(data.train), **{k: len(v) for k, v in data.eval.items()}},
        "versions": versions(), "command": sys.argv,
    }
    write_json_atomic(results_file, results)
    shutil.rmtree(ckpt_root, ignore_errors=True)  # results.json marks the run done; best/ keeps the model
    return results


def _mean_shares(bases: Bases) -> dict[str, dict[str, float]]:
    """Top-1% energy share (original, transformed) averaged over the layers of each role."""
    shares = bases.info.get("top1pct_energy_share", {})
    out: dict[str, dict[str, list]] = {}
    for name, s in shares.items():
        role = bases.layers[name]
        for k, v in s.items():
            out.setdefault(role, {}).setdefault(k, []).append(v)
    return {role: {k: float(np.mean(v)) for k, v in d.items()} for role, d in out.items()}
