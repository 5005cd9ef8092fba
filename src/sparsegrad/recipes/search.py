"""Hyper-parameter search with Optuna: lr and batch size, scored by the validation metric."""
from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

from .config import RunConfig
from .finetune import finetune
from .tasks import TaskData


def optimize(cfg: RunConfig, out: Path, n_trials: int, data: TaskData, bases_file: Path,
             progress: bool) -> dict:
    """Optuna over lr (log-uniform in [1e-6, 1e-1]) and batch size {8, 16, 32}, optimising the
    validation metric of cfg.seed (maximising scores, minimising the chat loss). The study lives in
    out/optuna.db: a killed search resumes, and a trial killed midway is retried with its
    parameters (its run resumes from its checkpoint)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    maximize = data.task.greater_is_better
    study = optuna.create_study(study_name="finetune", storage=f"sqlite:///{out / 'optuna.db'}",
                                direction="maximize" if maximize else "minimize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(stale.params)

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-6, 1e-1, log=True)
        batch_size = trial.suggest_categorical("batch_size", [8, 16, 32])
        run = out / "trials" / f"lr{lr:.4e}-bs{batch_size}"
        result = finetune(replace(cfg, lr=lr, batch_size=batch_size), run, bases_file=bases_file, resume=True,
                          data=data, progress=progress)
        print(f"trial {trial.number}: lr {lr:.3e} batch {batch_size} -> {result.metric} {result.score:.4f}",
              file=sys.stderr)
        if math.isfinite(result.score):
            return result.score
        return float("-inf") if maximize else float("inf")

    done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    if done < n_trials:
        study.optimize(objective, n_trials=n_trials - done)
    trials = [{"number": t.number, "params": t.params, "value": t.value}
              for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
    return {"best_params": study.best_params, "best_value": study.best_value, "trials": trials}
