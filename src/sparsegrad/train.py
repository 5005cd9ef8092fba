"""One fine-tuning run: one model, one task, one method, one seed. The same loop for every method
and every task (classification heads and chat decoders).

    data -> tokenizer/model -> [preliminary phase: bases] -> methods.prepare -> train with
    sparsegrad.optimizer + linear schedule, evaluate each epoch (or every eval_steps), keep the best
    model on validation, stop early after `patience` evaluations without improvement -> results.json
    (+ the adapter, and answers to a prompt file for chat)

accelerate places the model, runs mixed precision and data parallelism (launch with `torchrun` or
`accelerate launch`): an optimizer step takes `batch_size * grad_accum * processes` examples, and
its loss is normalised by the loss items (examples, or assistant tokens) of the whole step, so
that 2 processes x batch b equal 1 process x batch 2b and 1 process x batch b x 2 accumulation
steps. Bases are computed once on rank 0 and broadcast. Checkpoints are atomic (see
checkpoint.py) and `resume=True` continues a killed run to the same final metrics.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import platform
import resource
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .adapter import plain_model_bytes, save_adapter
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
from .model import defer_topk, sparsify_gradients, take_row_share
from .optim import optimizer as make_optimizer
from .targets import find_targets
from .tasks import Task, TaskData, compute_metrics, get_task, load_task, majority_baseline


@dataclass
class RunConfig:
    """Everything that defines a run (saved in results.json; a resumed run must match it)."""

    task: str = "bbcnews"
    method: str = "sparsegrad"
    model: str | None = None            # local folder or hub name; None: the embedded MiniLM
    mode: str = "fixed"                 # SparseGrad mode
    density: float | None = None        # None and n_params None: 1%
    n_params: int | None = None         # k per layer
    rest: str | None = None             # "all", "head" or "none"; None: "all" (the paper's GLUE), "none" for chat
    targets: list[str] | None = None
    blocks: str | None = None           # None: all blocks; "0,3,6" or "every:3"
    lora_rank: int | None = None        # None: matched to the sparse budget
    epochs: int | None = None           # None: the task's default (GLUE 20, bbcnews 2)
    max_steps: int | None = None
    batch_size: int = 16                # per process and micro-batch
    grad_accum: int = 1                 # micro-batches per optimizer step
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
    prompts: str | None = None          # chat: a JSONL prompt file answered by the best model
    max_prompts: int | None = None      # answer only the first N prompts
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        self.method = canonical_method(self.method)
        if self.rest is None:
            self.rest = "none" if get_task(self.task).is_causal_lm else "all"

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
    baseline: dict | None = None        # chat: the untrained model's validation metrics
    finished: bool = False
    stopped_early: bool = False
    resumed_at: list = field(default_factory=list)


# ---------------------------------------------------------------- model and data

def default_model(task: Task) -> str:
    """The embedded defaults: SmolLM2-135M-Instruct for chat, all-MiniLM-L6-v2 otherwise."""
    from .assets import minilm_path, smollm2_path

    return str(smollm2_path() if task.is_causal_lm else minilm_path())


def load_model(name: str | None, task: Task):
    """(tokenizer, model): a causal LM for chat, a sequence classifier otherwise; a clear error if
    the folder does not load."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    name = name or default_model(task)
    if Path(name).exists() and not (Path(name) / "config.json").is_file():
        raise ValueError(f"--model {name}: the folder holds no config.json; pass a Hugging Face model folder")
    kwargs: dict = {}
    if task.is_regression:
        kwargs = {"num_labels": 1, "problem_type": "regression"}
    elif not task.is_causal_lm:
        kwargs = {"num_labels": task.num_labels, "id2label": dict(enumerate(task.labels)),
                  "label2id": {label: i for i, label in enumerate(task.labels)}}
    auto = AutoModelForCausalLM if task.is_causal_lm else AutoModelForSequenceClassification
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = auto.from_pretrained(name, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--model {name}: could not load a model ({reason}); pass a local Hugging Face model "
                         "folder, or a hub name with a network") from None
    if tokenizer.pad_token is None:  # decoders: pad with the end-of-sequence token
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if task.is_causal_lm and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"--model {name}: its tokenizer has no chat template; the chat task needs an instruct "
                         "model (or a tokenizer_config.json / chat_template.jinja with one)")
    return tokenizer, model


def encode(tokenizer, examples: list[dict], max_length: int, task: Task) -> list[dict]:
    """Tokenize without padding (padding happens per batch); labels under "labels". Token ids are
    kept as int32 arrays: QQP and MNLI hold ~400k examples. Chat: see chat.encode."""
    if task.is_causal_lm:
        from . import chat

        return chat.encode(tokenizer, examples, max_length)
    texts = [e["text"] for e in examples]
    pairs = [e["text_pair"] for e in examples] if examples[0]["text_pair"] is not None else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    keys = list(enc.keys())
    return [{**{k: np.asarray(enc[k][i], dtype=np.int32) for k in keys}, "labels": e["label"]}
            for i, e in enumerate(examples)]


def collator(tokenizer, task: Task):
    """Dynamic padding to the longest example of a batch."""
    if task.is_causal_lm:
        from .chat import Collator

        return Collator(tokenizer)
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


def loss_items(batch: dict, task: Task) -> int:
    """What the model's loss averages over: assistant tokens (chat) or examples."""
    if task.is_causal_lm:
        from .chat import loss_tokens

        return loss_tokens(batch)
    return int(batch["labels"].shape[0])


class Batcher:
    """The examples of each optimizer step, split into `chunks` micro-batches (grad_accum x processes,
    accumulation-major); the order of an epoch is a fixed permutation of (seed, epoch), so a resumed
    run, or one with another number of processes, sees the same steps."""

    def __init__(self, collate, encoded: list[dict], step_size: int, seed: int, chunks: int = 1):
        self.collate, self.encoded, self.step_size, self.seed, self.chunks = collate, encoded, step_size, seed, chunks
        if len(encoded) < chunks:
            raise ValueError(f"{len(encoded)} training examples cannot fill {chunks} micro-batches: "
                             "lower --grad-accum or the number of processes")
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        full, rest = divmod(len(self.encoded), self.step_size)
        return full + (rest >= self.chunks)  # a last step too small to give every micro-batch an example is dropped

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.encoded))
        return self._order[1]

    def _step(self, epoch: int, i: int) -> np.ndarray:
        return self.order(epoch)[i * self.step_size:(i + 1) * self.step_size]

    def micro_batches(self, epoch: int, i: int, first: int = 0, stride: int = 1) -> list[dict]:
        """Micro-batches first, first + stride, ... of step i (a process takes its rank, stride = processes)."""
        parts = np.array_split(self._step(epoch, i), self.chunks)
        return [self.collate([self.encoded[j] for j in part]) for part in parts[first::stride]]

    def batch(self, epoch: int, i: int) -> dict:
        """All the examples of step i as one batch (the preliminary phase)."""
        return self.collate([self.encoded[j] for j in self._step(epoch, i)])


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
    """The task's validation metrics: GLUE's, or loss and perplexity on the assistant tokens (chat)."""
    if task.is_causal_lm:
        from .chat import evaluate_loss

        # the training batch size: a decoder's logits over the vocabulary dwarf everything else
        return evaluate_loss(model, tokenizer, encoded, min(cfg.eval_batch_size, cfg.batch_size), device)
    preds = predict(model, tokenizer, encoded, cfg.eval_batch_size, device, task)
    return compute_metrics(task, preds, np.array([e["labels"] for e in encoded]))


def improved(task: Task, score: float, best: float | None) -> bool:
    if best is None:
        return True
    return score > best if task.greater_is_better else score < best


# ---------------------------------------------------------------- the preliminary phase

def prepare_bases(model, batcher: Batcher, cfg: RunConfig, path: Path, progress: bool, targets: list[str],
                  accelerator=None) -> tuple[Bases, dict]:
    """Load the bases from `path`, or compute them on the first `bases_steps` training steps' examples
    and save them there (atomically). Returns (bases, {"seconds", "source"}).

    With several processes, rank 0 loads or computes them (on the same examples as a single process)
    and broadcasts them: every rank trains in identical bases."""
    distributed = accelerator is not None and accelerator.num_processes > 1
    result = None
    if not distributed or accelerator.is_main_process:
        if path.is_file():
            result = Bases.load(path), {"source": str(path), "seconds": 0.0}
        else:
            device = next(model.parameters()).device
            batches = ({k: v.to(device) for k, v in batcher.batch(0, i).items()}
                       for i in range(min(cfg.bases_steps, len(batcher))))
            start = time.perf_counter()
            model.eval()  # no dropout: the energy pass replays exactly the gradients the Gram sums saw
            bases = compute_bases(model, batches, n_steps=cfg.bases_steps, targets=targets, progress=progress)
            model.train()
            seconds = time.perf_counter() - start
            path.parent.mkdir(parents=True, exist_ok=True)
            bases.save(path)
            result = bases, {"source": "computed", "seconds": seconds}
    if distributed:
        import dataclasses

        import torch.distributed as dist

        if result is not None:  # sent as CPU tensors: each rank moves them to its own device in `apply`
            bases, info = result
            result = dataclasses.replace(bases, U={k: v.cpu() for k, v in bases.U.items()},
                                         V={k: v.cpu() for k, v in bases.V.items()},
                                         energy={k: v.cpu() for k, v in bases.energy.items()}), info
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
        if not accelerator.is_main_process:
            result[1]["source"] += " (broadcast from rank 0)"
    return result


# ---------------------------------------------------------------- bookkeeping

def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("sparsegrad", "torch", "transformers", "peft", "accelerate", "safetensors"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def reset_peak_rss() -> None:
    """Restart the kernel's high-water mark of this process's RSS (Linux; elsewhere a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Peak RSS in bytes since the last reset_peak_rss (VmHWM), else since the process began."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_memory(device: torch.device) -> None:
    """Measure the peak from here on (the training loop's, not model loading's)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(MB, what it is): the CUDA allocator's peak, or the process's peak RSS, since reset_peak_memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return peak_rss() / 2**20, "cpu_peak_rss_training"


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
    Under torchrun / accelerate launch every process calls this; rank 0 writes the files.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState
    from transformers import get_linear_schedule_with_warmup

    run_dir = Path(run_dir)
    results_file = run_dir / "results.json"
    if resume and results_file.is_file():
        return json.loads(results_file.read_text())

    data = data or load_task(cfg.task, cfg.data_dir, max_train_samples=cfg.max_train_samples,
                             max_eval_samples=cfg.max_eval_samples)
    task = data.task
    set_seed(cfg.seed)
    tokenizer, model = load_model(cfg.model, task)
    # runs in one process may differ in precision: forget the previous run's settings (not the process group)
    AcceleratorState._reset_state()
    # the bases are shared, frozen buffers that every rank holds alike: DDP need not broadcast them
    accelerator = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision,
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    main = accelerator.is_main_process
    progress = progress and main
    model.to(device)

    train = encode(tokenizer, data.train, cfg.max_length, task)
    evals = {name: encode(tokenizer, split, cfg.max_length, task) for name, split in data.eval.items()}
    select_split = next(iter(evals))
    batcher = Batcher(collator(tokenizer, task), train, cfg.batch_size * cfg.grad_accum * world, cfg.seed,
                      chunks=cfg.grad_accum * world)
    targets = sorted(find_targets(model, cfg.targets, blocks=cfg.blocks))

    bases, bases_info = None, None
    if cfg.method == "sparsegrad":
        bases, bases_info = prepare_bases(model, batcher, cfg, Path(bases_file or run_dir / "bases.safetensors"),
                                          progress, targets, accelerator)
        bases_info["top1pct_energy_share"] = _mean_shares(bases)
    torch.manual_seed(cfg.seed)  # the same RNG stream from here on, whether bases were computed or loaded
    info = prepare(model, cfg.method, rest=cfg.rest, bases=bases, mode=cfg.mode, density=cfg.density,
                   n_params=cfg.n_params, targets=targets, lora_rank=cfg.lora_rank)
    defer_topk(model)  # dynamic / meprop: top-k of the complete (accumulated, all-reduced) gradient
    raw = model  # the model itself; `model` may become its DDP wrapper
    with warnings.catch_warnings():  # torch 2.13 renames broadcast_buffers; accelerate has no new name yet
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        model = accelerator.prepare_model(model)

    epochs = cfg.epochs or task.default_epochs
    total_steps = epochs * len(batcher) if cfg.max_steps is None else min(cfg.max_steps, epochs * len(batcher))
    opt = make_optimizer(raw, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(opt, round(cfg.warmup_ratio * total_steps), total_steps)

    state = LoopState()
    ckpt_root = run_dir / "checkpoints"
    ckpt = latest_checkpoint(ckpt_root) if resume else None
    if ckpt is not None:
        saved = load_checkpoint(ckpt, raw)
        opt.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        state = LoopState(**saved["loop"])
        state.resumed_at.append(state.step)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)

    def checkpoint() -> None:
        if main:
            save_checkpoint(ckpt_root, state.step, raw, {
                "optimizer": opt.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                "loop": asdict(state)})
        accelerator.wait_for_everyone()

    def total(*values: float) -> list[float]:
        """Sums over the processes."""
        if world == 1:
            return list(values)
        return accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=device), "sum").tolist()

    if task.is_causal_lm and state.baseline is None:  # the untrained model's validation loss
        state.baseline = evaluate(raw, tokenizer, evals[select_split], cfg, device, task)
    reset_peak_memory(device)
    bar = tqdm(total=total_steps, initial=state.step, desc=f"{task.name} {info.method} seed {cfg.seed}",
               disable=not progress, dynamic_ncols=True)
    model.train()
    while not state.finished:
        if state.step >= total_steps or state.epoch >= epochs:
            state.finished = True
            break
        micro = batcher.micro_batches(state.epoch, state.step_in_epoch, first=rank, stride=world)
        start = time.perf_counter()
        # the step's loss is sum(loss items) / (items of the whole step, every micro-batch and rank);
        # DDP averages over ranks, hence the factor `world`
        counts = [loss_items(b, task) for b in micro]
        (step_items,) = total(sum(counts))
        loss_sum = 0.0
        for m, (batch, n) in enumerate(zip(micro, counts)):
            batch = {k: v.to(device) for k, v in batch.items()}
            sync = m == len(micro) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                with accelerator.autocast():
                    loss = model(**batch).loss
                accelerator.backward(loss * (n * world / step_items))
            loss_sum += loss.item() * n
        sparsify_gradients(raw)
        share = take_row_share(raw)
        if share is not None:
            state.row_share.append(round(share, 4))
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        scheduler.step()
        opt.zero_grad(set_to_none=True)
        (loss_total,) = total(loss_sum)  # also waits for the device, so the step time is complete
        loss_value = loss_total / step_items
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
            # every rank evaluates the same model on the same split, so all take the same decisions
            metrics = evaluate(raw, tokenizer, evals[select_split], cfg, device, task)
            score = metrics[task.metric]
            if not math.isfinite(score):  # diverged
                score = float("-inf") if task.greater_is_better else float("inf")
            state.history.append({"step": state.step, "epoch": state.step / len(batcher),
                                  "loss": state.loss_sum / state.loss_steps, select_split: metrics})
            state.loss_sum, state.loss_steps = 0.0, 0
            if improved(task, score, state.best_score):
                state.best_score, state.best_step, state.bad_evals = score, state.step, 0
                if main:
                    save_weights(raw, run_dir / "best")
            else:
                state.bad_evals += 1
            if progress:
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
    accelerator.wait_for_everyone()
    load_weights(raw, run_dir / "best")
    final = {name: evaluate(raw, tokenizer, enc, cfg, device, task) for name, enc in evals.items()}
    generations = None
    if cfg.prompts and main:
        from .chat import generate, read_prompts

        prompts = read_prompts(cfg.prompts)[:cfg.max_prompts]
        generations = generate(raw, tokenizer, prompts, device, max_new_tokens=cfg.max_new_tokens)
        with open(run_dir / "generations.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(g, ensure_ascii=False) + "\n" for g in generations)
    adapter = None
    if main:
        adapter = save_adapter(raw, run_dir / "adapter", base_model=cfg.model or default_model(task))
        adapter["model_bytes"] = plain_model_bytes(raw)
    baseline = state.baseline if task.is_causal_lm else majority_baseline(task, data.train, data.eval[select_split])
    results = {
        "config": cfg.identity(),
        "task": task.name, "metric": task.metric, "greater_is_better": task.greater_is_better,
        "score": final[select_split][task.metric], "final": final, "best_step": state.best_step,
        "baseline": baseline, "baseline_kind": "untrained model" if task.is_causal_lm else "majority class",
        "method": info.as_dict(), "targets": targets, "bases": bases_info,
        "history": state.history, "nonzero_row_share": state.row_share,
        "stopped_early": state.stopped_early, "resumed_at": state.resumed_at,
        "train_steps": state.step, "train_seconds": state.train_seconds,
        "steps_per_s": state.step / state.train_seconds if state.train_seconds else None,
        "peak_memory_mb": memory_mb, "memory_kind": memory_kind, "device": str(device),
        "processes": world, "examples_per_step": batcher.step_size, "adapter": adapter,
        "generations": None if generations is None else "generations.jsonl",
        "data": {"source": data.source, "train": len(data.train), **{k: len(v) for k, v in data.eval.items()}},
        "versions": versions(), "command": sys.argv,
    }
    if main:
        write_json_atomic(results_file, results)
        shutil.rmtree(ckpt_root, ignore_errors=True)  # results.json marks the run done; best/ keeps the model
    accelerator.wait_for_everyone()
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
