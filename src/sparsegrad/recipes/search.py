"""Hyper-parameter search with Optuna: lr and batch size, scored by the validation metric."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from optuna.trial import TrialState

from .config import RunConfig
from .finetune import finetune
from .tasks import TaskData


def optimize(cfg: RunConfig, out: Path, n_trials: int, data: TaskData, bases_file: Path,
             progress: bool) -> dict:
    """Optuna over lr (log-uniform in [1e-6, 1e-1]) and batch size {8, 16, 32}, optimising the
    validation metric of cfg.seed (maximising scores, minimising the chat loss).

    The study lives in out/optuna.db and a killed search resumes to the trials an uninterrupted one
    draws: each trial's sampler is seeded by (seed, trials finished before it), so no random stream
    restarts with the process, and a trial killed midway is retried with its parameters (its run
    resumes from its checkpoint). A trial whose run diverged is recorded as pruned (its status in
    the trial's attributes): TPE counts it among the bad ones, and it has no score."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    maximize = data.task.greater_is_better
    study = optuna.create_study(study_name="finetune", storage=f"sqlite:///{out / 'optuna.db'}",
                                direction="maximize" if maximize else "minimize", load_if_exists=True)
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(stale.number, state=TrialState.FAIL)
        study.enqueue_trial(stale.params)

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-6, 1e-1, log=True)
        batch_size = trial.suggest_categorical("batch_size", [8, 16, 32])
        run = out / "trials" / f"lr{lr:.4e}-bs{batch_size}"
        result = finetune(replace(cfg, lr=lr, batch_size=batch_size), run, bases_file=bases_file, resume=True,
                          data=data, progress=progress)
        if result.status != "finished":
            print(f"trial {trial.number}: lr {lr:.3e} batch {batch_size} -> {result.status}", file=sys.stderr)
            trial.set_user_attr("status", result.status)
            raise optuna.TrialPruned(result.message)
        print(f"trial {trial.number}: lr {lr:.3e} batch {batch_size} -> {result.metric} {result.score:.4f}",
              file=sys.stderr)
        return result.score

    while len(finished := _finished(study)) < n_trials:
        seed = int(np.random.SeedSequence([cfg.seed, len(finished)]).generate_state(1)[0])
        study.sampler = optuna.samplers.TPESampler(seed=seed)
        try:
            study.optimize(objective, n_trials=1)
        except BaseException:  # a full disk, Ctrl-C: Optuna marked the trial failed; it runs again on resume
            last = study.get_trials(deepcopy=False)[-1]
            if last.state == TrialState.FAIL:
                study.enqueue_trial(last.params)
            raise
    trials = [{"number": t.number, "params": t.params, "value": t.value,
               "status": t.user_attrs.get("status", "finished")} for t in _finished(study)]
    if not any(t.state == TrialState.COMPLETE for t in _finished(study)):
        raise ValueError(f"every one of the {n_trials} trials diverged: the search found no learning rate that "
                         "trains; look at trials/*/results.json, and try a smaller model or fewer steps")
    return {"best_params": study.best_params, "best_value": study.best_value, "trials": trials}


def _finished(study) -> list:
    """Trials that ran to their end, scored or diverged, in order."""
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
