"""The fine-tuning recipe: one model, one task, one method, one seed. The same loop for every method
and every kind of task (classification heads and chat decoders).

    recipe = FineTuneRecipe(cfg, run_dir)
    recipe.setup(resume=False)   # data, model, [preliminary phase: bases], method, optimizer, checkpoint
    recipe.train()               # steps; evaluate each epoch (or every eval_steps), keep the best model on
                                 # validation, stop early after `patience` evaluations without improvement
    result = recipe.finish()     # the best model's final metrics -> results.json, the adapter, answers
    recipe.cleanup()

accelerate places the model, runs mixed precision and data parallelism (launch with `torchrun` or
`accelerate launch`): an optimizer step takes `batch_size * grad_accum * processes` examples, and
its loss is normalised by the loss items (examples, or assistant tokens) of the whole step, so that
2 processes x batch b equal 1 process x batch 2b and 1 process x batch b x 2 accumulation steps.
Data parallelism is DDP (a whole model per process), or FSDP2 with `fsdp` (or an accelerate FSDP
config): sparsegrad.shard splits each block's weights, gradients and optimizer state over the
processes; checkpoints then hold the gathered model and each rank's optimizer shard.
Bases are computed once on rank 0 and broadcast. Checkpoints are atomic (checkpoint.py) and
`resume=True` continues a killed run to the same final metrics.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sparsegrad import Bases, SupportRefresh, compute_bases
from sparsegrad import optimizer as make_optimizer
from sparsegrad.adapter import plain_model_bytes, save_adapter
from sparsegrad.model import defer_topk, sparsify_gradients, take_row_share
from sparsegrad.optim import clip_grad_norm_
from sparsegrad.sharding import full_state_dict, shard
from sparsegrad.targets import find_targets
from sparsegrad.util import to_device, write_text_atomic

from .batching import Batcher
from .checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    save_weights,
    set_rng_state,
)
from .config import RunConfig
from .data import encode_task, load_task
from .kinds import kind_of
from .lock import waiting_lock
from .machine import versions
from .memory import peak_memory, reset_peak_memory
from .methods import METHODS, head_parameters, prepare
from .models import default_model, load_model
from .results import RunResult
from .tasks import TaskData


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
    baseline: dict | None = None        # the score to beat, measured before training
    finished: bool = False
    stopped_early: bool = False
    resumed_at: list = field(default_factory=list)
    first_loss: float | None = None     # the first step's loss: what divergence is measured against
    diverged: str | None = None         # why the run stopped as diverged
    warnings: list = field(default_factory=list)


# The run has diverged when its loss is not finite, or has grown this many times over its first step's
# loss; a warning at an evaluation when the loss since the last one has grown WARN_GROWTH times.
DIVERGED_GROWTH = 100.0
WARN_GROWTH = 3.0


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class FineTuneRecipe:
    """One run into `run_dir`. Under torchrun / accelerate launch every process builds one; rank 0
    writes the files. bases_file: where the bases are read from, or computed into (default
    run_dir/bases.safetensors). data: the task's data, when the caller has it loaded already."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, *, bases_file: str | Path | None = None,
                 data: TaskData | None = None, progress: bool = True) -> None:
        self.cfg, self.run_dir = cfg.with_default_lr(), Path(run_dir)
        self.bases_file = Path(bases_file or self.run_dir / "bases.safetensors")
        self.data, self.progress = data, progress
        self.state = LoopState()
        self.peak: tuple[int, str] = (0, "")

    # ---------------------------------------------------------------- setup
    def setup(self, resume: bool = False) -> None:
        self.setup_data()
        self.setup_model()
        self.setup_bases()
        self.setup_method()
        if self.is_main:
            print(self.trainable_story(), file=sys.stderr)
        self.setup_optimizer()
        if resume:
            self.load_checkpoint()
        self.setup_refresh()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.state.baseline is None:
            self.state.baseline = self.kind.baseline(self.task, self.data, lambda: self.evaluate())

    def setup_data(self) -> None:
        cfg = self.cfg
        self.data = self.data or load_task(cfg.task, cfg.data_dir, max_train_samples=cfg.max_train_samples,
                                           max_eval_samples=cfg.max_eval_samples, heldout=cfg.heldout)
        self.task, self.kind = self.data.task, kind_of(self.data.task)

    def setup_model(self) -> None:
        """The model and tokenizer, the accelerator (device, processes), encoded data and the batcher."""
        from accelerate import Accelerator, DistributedDataParallelKwargs
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType, parse_flag_from_env

        cfg = self.cfg
        set_seed(cfg.seed)
        self.tokenizer, self.model = load_model(cfg.model, self.task, cfg.dtype)
        if cfg.gradient_checkpointing:  # transformers recomputes each block in backward (non-reentrant)
            self.model.activation_checkpointing_enable()
        # runs in one process may differ in precision: forget the previous run's settings (not the process group)
        AcceleratorState._reset_state()
        # the bases are shared, frozen buffers that every rank holds alike: DDP need not broadcast them
        # several processes on a machine without a GPU: they run on the CPU (accelerate would otherwise see
        # one process in each, and every rank would run the whole job alone)
        cpu = cfg.cpu or (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available())
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision,
                                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        acc = self.accelerator
        self.device, self.world, self.rank, self.is_main = acc.device, acc.num_processes, acc.process_index, \
            acc.is_main_process
        if cfg.fsdp and self.world == 1:
            raise ValueError("--fsdp shards the model over several processes and this run has one: launch it with "
                             "torchrun --nproc-per-node N -m sparsegrad finetune ... (or accelerate launch), or drop "
                             "--fsdp")
        # sharded: asked for, or launched with an accelerate FSDP config (sparsegrad.shard does the sharding;
        # on CPU accelerate keeps the config's flag but not its FSDP state)
        self.fsdp = self.world > 1 and (cfg.fsdp or acc.distributed_type == DistributedType.FSDP
                                        or parse_flag_from_env("ACCELERATE_USE_FSDP"))
        self.progress = self.progress and self.is_main
        self.model.to(self.device)

        self.train_data, self.eval_data = encode_task(self.data, self.tokenizer, cfg)
        self.select_split = next(iter(self.eval_data))
        self.batcher = Batcher(self.kind.collator(self.tokenizer), self.train_data,
                               cfg.batch_size * cfg.grad_accum * self.world, cfg.seed, chunks=cfg.grad_accum * self.world)
        self.targets = sorted(find_targets(self.model, cfg.targets, blocks=cfg.blocks))

    def setup_bases(self) -> None:
        """The preliminary phase, for methods that need bases: loaded from `bases_file`, or computed on
        the first `bases_steps` training steps' examples and saved there. With several processes, rank
        0 loads or computes them (on the examples a single process would use) and broadcasts them."""
        self.bases, self.bases_info = None, None
        if not METHODS[self.cfg.method].needs_bases:
            return
        warmup = self.warm_up_head() if self.cfg.bases_warmup_steps else None
        result = None
        if self.world == 1 or self.is_main:
            result = self._load_or_compute_bases()
        if self.world > 1:
            result = _broadcast_bases(result, self.is_main)
        self.bases, self.bases_info = result
        self.bases_info["top1pct_energy_share"] = _mean_shares(self.bases)
        if warmup is not None:
            self.bases_info["head_warmup"] = warmup

    def warm_up_head(self) -> dict:
        """The task head alone trains for `bases_warmup_steps` steps (AdamW at the run's lr, constant),
        so that the preliminary phase's gradients, and the fixed support chosen from them, are those of
        a head that has begun to learn rather than of a random one. The steps are the first batches of
        the first epoch; every process takes the same ones, so every rank's head comes out alike."""
        cfg, model = self.cfg, self.model
        head = head_parameters(model)
        trains = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(head, lr=cfg.lr, weight_decay=cfg.weight_decay)
        losses = []
        for i in range(cfg.bases_warmup_steps):
            batch = to_device(self.batcher.batch(0, i % len(self.batcher)), self.device)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        for p, flag in trains.items():
            p.requires_grad_(flag)
        return {"steps": cfg.bases_warmup_steps, "first_loss": losses[0], "last_loss": losses[-1]}

    def _load_or_compute_bases(self) -> tuple[Bases, dict]:
        # runs that share a bases file (a benchmark's, several at a time) compute it once: the others wait
        with waiting_lock(self.bases_file.with_name(self.bases_file.name + ".lock")):
            if self.bases_file.is_file():
                return Bases.load(self.bases_file), {"source": str(self.bases_file), "seconds": 0.0}
            return self._compute_bases()

    def _compute_bases(self) -> tuple[Bases, dict]:
        n = min(self.cfg.bases_steps, len(self.batcher))
        batches = (to_device(self.batcher.batch(0, i), self.device) for i in range(n))
        start = time.perf_counter()
        self.model.eval()  # no dropout: the energy pass replays exactly the gradients the Gram sums saw
        bases = compute_bases(self.model, batches, n_steps=self.cfg.bases_steps, targets=self.targets,
                              progress=self.progress)
        self.model.train()
        seconds = time.perf_counter() - start
        bases.save(self.bases_file)
        return bases, {"source": "computed", "seconds": seconds}

    def setup_method(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the same RNG stream from here on, whether bases were computed or loaded
        self.method_info = prepare(self.model, cfg.method, rest=cfg.rest, bases=self.bases, mode=cfg.mode,
                                   structure=cfg.structure,
                                   density=cfg.density, n_params=cfg.n_params, targets=self.targets,
                                   lora_rank=cfg.lora_rank)
        defer_topk(self.model)  # top-k layers: the top-k of the complete (accumulated, all-reduced) gradient
        self.raw = self.model  # the model itself; `self.model` may become its DDP wrapper
        if self.fsdp:  # sharded in place: the model stays itself
            shard(self.model)
        else:
            with warnings.catch_warnings():  # torch 2.13 renames broadcast_buffers; accelerate has no new name yet
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                self.model = self.accelerator.prepare_model(self.model)
        if cfg.compile:  # the training steps run compiled; evaluation and saving use the model itself
            self.model = torch.compile(self.model)

    def trainable_story(self) -> str:
        """What trains, in one line: the method's entries in the MLP linears, the rest, the share of the model."""
        info = self.method_info
        others = info.trainable - info.trainable_mlp
        return (f"seed {self.cfg.seed}: {info.trainable:,} of {info.total:,} parameters train "
                f"({100 * info.trainable / info.total:.2g}%): {info.trainable_mlp:,} in {info.target_layers} MLP "
                f"linears" + (f" + {others:,} others (--rest {info.rest})" if others else ""))

    def setup_optimizer(self) -> None:
        from transformers import get_linear_schedule_with_warmup

        cfg = self.cfg
        self.epochs = cfg.epochs or self.task.default_epochs
        planned = self.epochs * len(self.batcher)
        self.total_steps = planned if cfg.max_steps is None else min(cfg.max_steps, planned)
        self.optimizer = make_optimizer(self.raw, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, round(cfg.warmup_ratio * self.total_steps),
                                                         self.total_steps)

    def setup_refresh(self) -> None:
        """fixed SparseGrad with refresh_steps: the support re-chosen every N steps (from the energy of the
        4 steps before each refresh, or all N when fewer), counting from where a resumed run stands."""
        n = self.cfg.refresh_steps
        self.refresh = None if n is None else SupportRefresh(self.raw, self.optimizer, every=n, window=min(4, n),
                                                             steps=self.state.step)

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def load_checkpoint(self) -> bool:
        """Continue from the newest checkpoint in run_dir that verifies (a damaged one is named and passed over)."""
        ckpt = latest_checkpoint(self.checkpoint_root)
        if ckpt is None:
            return False
        saved = load_checkpoint(ckpt, self.raw)
        optimizer = saved["optimizer"]
        if self.fsdp != isinstance(optimizer, list) or (self.fsdp and len(optimizer) != self.world):
            written = f"{len(optimizer)} sharded processes" if isinstance(optimizer, list) else "an unsharded run"
            raise CheckpointError(f"{ckpt} was written by {written}: resume it the same way (this is "
                                  f"{f'{self.world} sharded processes' if self.fsdp else 'an unsharded run'})")
        self.optimizer.load_state_dict(optimizer[self.rank] if self.fsdp else optimizer)
        self.scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        self.state = LoopState(**saved["loop"])
        self.state.resumed_at.append(self.state.step)
        return True

    def save_checkpoint(self) -> None:
        weights, optimizer = self._weights(), self.optimizer.state_dict()
        if self.fsdp:  # each rank's shard of the optimizer state, in rank order
            shards = [None] * self.world if self.is_main else None
            torch.distributed.gather_object(optimizer, shards, dst=0)
            optimizer = shards
        if self.is_main:
            save_checkpoint(self.checkpoint_root, self.state.step, weights, {
                "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(), "loop": asdict(self.state)})
        self.accelerator.wait_for_everyone()

    def _weights(self) -> torch.nn.Module | dict:
        """What save_weights writes: the model, or when sharded its gathered state dict (collective)."""
        return full_state_dict(self.raw) if self.fsdp else self.raw

    # ---------------------------------------------------------------- one step, one evaluation
    def _sum_over_processes(self, *values: float) -> list[float]:
        if self.world == 1:
            return list(values)
        return self.accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=self.device), "sum").tolist()

    def train_step(self) -> float:
        """One optimizer step over this process's micro-batches; returns the step's mean loss (all ranks)."""
        state, acc = self.state, self.accelerator
        micro = self.batcher.micro_batches(state.epoch, state.step_in_epoch, first=self.rank, stride=self.world)
        # the step's loss is sum(loss items) / (items of the whole step, every micro-batch and rank);
        # DDP averages over ranks, hence the factor `world`
        counts = [self.kind.loss_items(b) for b in micro]
        (step_items,) = self._sum_over_processes(sum(counts))
        loss_sum = 0.0
        for m, (batch, n) in enumerate(zip(micro, counts)):
            sync = m == len(micro) - 1
            if self.fsdp:  # FSDP2 reduces the gradients after the step's last micro-batch only
                self.model.set_requires_gradient_sync(sync)
            with contextlib.nullcontext() if sync or self.fsdp else acc.no_sync(self.model):
                with acc.autocast():
                    loss = self.model(**to_device(batch, self.device)).loss
                acc.backward(loss * (n * self.world / step_items))
            loss_sum += loss.item() * n
        sparsify_gradients(self.raw)
        share = take_row_share(self.raw)
        if share is not None:
            state.row_share.append(round(share, 4))
        if self.cfg.max_grad_norm:
            acc.unscale_gradients()
            clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)  # the dynamic mode's are sparse
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.refresh is not None:
            self.refresh.step()
        (loss_total,) = self._sum_over_processes(loss_sum)  # also waits for the device: the step time is complete
        return loss_total / step_items

    def evaluate(self, split: str | None = None) -> dict[str, float]:
        """The task's metrics on an evaluation split (default: the selection split). Every rank
        evaluates the same model on the same split, so all take the same decisions."""
        return self.kind.evaluate(self.task, self.raw, self.tokenizer, self.eval_data[split or self.select_split],
                                  self.device, eval_batch_size=self.cfg.eval_batch_size,
                                  train_batch_size=self.cfg.batch_size)

    def _record_evaluation(self) -> str:
        """Evaluate, keep the best weights, count evaluations without improvement; a line for the log."""
        state, task = self.state, self.task
        metrics = self.evaluate()
        score = metrics[task.metric]
        if not math.isfinite(score):  # diverged
            score = float("-inf") if task.greater_is_better else float("inf")
        mean_loss = state.loss_sum / state.loss_steps
        state.history.append({"step": state.step, "epoch": state.step / len(self.batcher),
                              "loss": mean_loss, self.select_split: metrics})
        if state.first_loss is not None and mean_loss > WARN_GROWTH * state.first_loss and not state.warnings:
            state.warnings.append(f"the training loss rose from {state.first_loss:.4g} (first step) to {mean_loss:.4g} "
                                  f"(steps up to {state.step}): --lr {self.cfg.lr:g} may be too high")
            print(f"warning: {state.warnings[-1]}", file=sys.stderr)
        state.loss_sum, state.loss_steps = 0.0, 0
        best = state.best_score
        if best is None or (score > best if task.greater_is_better else score < best):
            state.best_score, state.best_step, state.bad_evals = score, state.step, 0
            weights = self._weights()
            if self.is_main:
                save_weights(weights, self.run_dir / "best")
        else:
            state.bad_evals += 1
        return (f"step {state.step} epoch {state.step / len(self.batcher):.2f}: {self.select_split} "
                + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + (" *" if state.best_step == state.step else ""))

    # ---------------------------------------------------------------- the loop
    def train(self) -> None:
        """Steps until the planned steps or epochs are done, or early stopping; evaluations and
        checkpoints on the way."""
        state, cfg = self.state, self.cfg
        reset_peak_memory(self.device)
        bar = tqdm(total=self.total_steps, initial=state.step, disable=not self.progress, dynamic_ncols=True,
                   desc=f"{self.task.name} {self.method_info.method} seed {cfg.seed}")
        self.model.train()
        while not state.finished:
            if state.step >= self.total_steps or state.epoch >= self.epochs:
                state.finished = True
                break
            start = time.perf_counter()
            loss = self.train_step()
            state.train_seconds += time.perf_counter() - start
            state.loss_sum, state.loss_steps = state.loss_sum + loss, state.loss_steps + 1
            state.step += 1
            state.step_in_epoch += 1
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}")
            if self._diverged(loss):
                state.finished = True
                break
            end_of_epoch = state.step_in_epoch == len(self.batcher)
            if end_of_epoch:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            last = state.step >= self.total_steps or state.epoch >= self.epochs
            if (end_of_epoch if cfg.eval_steps is None else state.step % cfg.eval_steps == 0) or last:
                line = self._record_evaluation()
                if self.progress:
                    bar.write(line, file=sys.stderr)
                state.stopped_early = bool(cfg.patience and state.bad_evals >= cfg.patience)
                state.finished = state.stopped_early or last
                self.save_checkpoint()
            elif cfg.save_steps and state.step % cfg.save_steps == 0:
                self.save_checkpoint()
        bar.close()
        self.peak = peak_memory(self.device)  # (bytes, what it is)

    # ---------------------------------------------------------------- the result
    def _diverged(self, loss: float) -> bool:
        """Whether this step's loss says the run diverged (then the reason is in state.diverged)."""
        state = self.state
        if state.first_loss is None:
            state.first_loss = loss
        if math.isfinite(loss) and loss <= DIVERGED_GROWTH * max(state.first_loss, 1e-3):
            return False
        state.diverged = (f"the training loss reached {loss:.4g} at step {state.step} (first step: "
                          f"{state.first_loss:.4g}): the run diverged at --lr {self.cfg.lr:g}; lower it")
        if self.progress:
            print(f"sparsegrad: {state.diverged}", file=sys.stderr)
        return True

    def finish(self) -> RunResult:
        """Reload the best weights on validation, evaluate every split, answer the prompts, write the
        adapter and results.json (rank 0), and drop the checkpoints: the result marks the run done.
        A diverged run gets no score: its result says why it stopped, and holds no adapter."""
        cfg, state = self.cfg, self.state
        self.accelerator.wait_for_everyone()
        if state.diverged:
            return self._write_result(RunResult(**self._result_fields(), status="diverged", message=state.diverged,
                                                score=None, final={}, best_step=None, adapter=None,
                                                generations=None))
        load_weights(self.raw, self.run_dir / "best")
        final = {name: self.evaluate(name) for name in self.eval_data}
        # sharded, every rank takes part in generating and in gathering the adapter; rank 0 writes
        generations = self._answer_prompts() if cfg.prompts and (self.is_main or self.fsdp) else None
        adapter = None
        if self.is_main or self.fsdp:
            adapter = save_adapter(self.raw, self.run_dir / "adapter", base_model=cfg.model or default_model(self.task))
            adapter["model_bytes"] = plain_model_bytes(self.raw)
        return self._write_result(RunResult(
            **self._result_fields(), score=final[self.select_split][self.task.metric], final=final,
            best_step=state.best_step, adapter=adapter, generations=None if generations is None else "generations.jsonl"))

    def _result_fields(self) -> dict:
        """What every result holds, finished or diverged: the configuration, the history, the cost."""
        cfg, state = self.cfg, self.state
        memory_bytes, memory_kind = self.peak
        return {
            "config": cfg.identity(), "task": self.task.name, "metric": self.task.metric, "split": self.select_split,
            "greater_is_better": self.task.greater_is_better, "baseline": state.baseline,
            "baseline_kind": self.kind.baseline_kind, "method": self.method_info.as_dict(), "targets": self.targets,
            "bases": self.bases_info, "history": state.history, "nonzero_row_share": state.row_share,
            "stopped_early": state.stopped_early, "resumed_at": state.resumed_at, "train_steps": state.step,
            "train_seconds": state.train_seconds,
            "steps_per_s": state.step / state.train_seconds if state.train_seconds else None,
            "peak_memory_mb": memory_bytes / 2**20, "memory_kind": memory_kind, "device": str(self.device),
            "processes": self.world, "sharded": self.fsdp, "examples_per_step": self.batcher.step_size,
            "data": {"source": self.data.source, "train": len(self.data.train),
                     **{k: len(v) for k, v in self.data.eval.items()}},
            "versions": versions(), "command": sys.argv, "warnings": state.warnings}

    def _write_result(self, result: RunResult) -> RunResult:
        """results.json (rank 0), which marks the run done; the checkpoints go (best/ keeps the model)."""
        if self.is_main:
            result.save(self.run_dir / "results.json")
            shutil.rmtree(self.checkpoint_root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return result

    def _answer_prompts(self) -> list[dict]:
        from .chat import generate, read_prompts

        prompts = read_prompts(self.cfg.prompts)[:self.cfg.max_prompts]
        generations = generate(self.raw, self.tokenizer, prompts, self.device, max_new_tokens=self.cfg.max_new_tokens)
        if self.is_main:
            write_text_atomic(self.run_dir / "generations.jsonl",
                              "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in generations))
        return generations

    def cleanup(self) -> None:
        """Let go of the model, the optimizer and the accelerator's references (runs in one process follow)."""
        self.accelerator.free_memory()
        for name in ("model", "raw", "optimizer", "scheduler", "bases"):
            setattr(self, name, None)


def finetune(cfg: RunConfig, run_dir: str | Path, *, bases_file: str | Path | None = None, resume: bool = False,
             data: TaskData | None = None, progress: bool = True) -> RunResult:
    """Fine-tune and evaluate one run into `run_dir`; return its result (also in results.json).
    resume: continue from the last checkpoint in run_dir (or return the result of a finished run)."""
    results_file = Path(run_dir) / "results.json"
    if resume and results_file.is_file():
        try:
            return RunResult.load(results_file)
        except (ValueError, TypeError, KeyError) as err:  # damaged after it was written: run it again
            print(f"warning: {results_file} is damaged ({err}); running {run_dir} again", file=sys.stderr)
    recipe = FineTuneRecipe(cfg, run_dir, bases_file=bases_file, data=data, progress=progress)
    recipe.setup(resume=resume)
    recipe.train()
    result = recipe.finish()
    recipe.cleanup()
    return result


def _broadcast_bases(result: tuple[Bases, dict] | None, is_main: bool) -> tuple[Bases, dict]:
    """Rank 0's bases on every rank, sent as CPU tensors: each rank moves them to its device once per role."""
    import torch.distributed as dist

    if result is not None:
        bases, info = result
        result = dataclasses.replace(bases, U={k: v.cpu() for k, v in bases.U.items()},
                                     V={k: v.cpu() for k, v in bases.V.items()},
                                     energy={k: v.cpu() for k, v in bases.energy.items()}), info
    box = [result]
    dist.broadcast_object_list(box, src=0)
    bases, info = box[0]
    if not is_main:
        info["source"] += " (broadcast from rank 0)"
    return bases, info


def _mean_shares(bases: Bases) -> dict[str, dict[str, float]]:
    """Top-1% energy share (original, transformed) averaged over the layers of each role."""
    shares = bases.info.get("top1pct_energy_share", {})
    out: dict[str, dict[str, list]] = {}
    for name, s in shares.items():
        role = bases.layers[name]
        for k, v in s.items():
            out.setdefault(role, {}).setdefault(k, []).append(v)
    return {role: {k: float(np.mean(v)) for k, v in d.items()} for role, d in out.items()}
