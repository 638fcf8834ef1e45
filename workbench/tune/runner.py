"""The Optuna study around the trials: storage, samplers, constraints, progress and the best settings."""
from __future__ import annotations

import json
import math
import shlex
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from rich.console import Console

from workbench.tune.study_file import StudyFile
from workbench.tune.trial import TrialFailed, render_flags, run_trial

console = Console(stderr=True)
FINISHED = (TrialState.COMPLETE, TrialState.FAIL)


@dataclass
class TuneOptions:
    storage: str
    study_name: str
    n_trials: int | None
    timeout: float | None
    launch: str | None
    results_dir: Path


def make_storage(url: str):
    """SQLite or any SQL URL (heartbeats mark trials of a killed worker failed), or journal:PATH."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    import sqlalchemy.exc

    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental, and are what we want
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, heartbeat_interval=10, grace_period=60)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Workers started together on an empty database race to create Optuna's tables; the
            # loser sees "already exists". The schema is there now: connect again.
            if attempt == 4:
                raise
            time.sleep(0.5 + attempt)


def make_sampler(study: StudyFile):
    # Constraints reach TPE and NSGA-II through trial.set_constraint (Optuna 5).
    seed = study.study.seed
    if study.study.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                          n_startup_trials=min(5, max(1, (study.study.n_trials or 10) // 3)))
    if study.study.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if study.study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.GridSampler(grid_of(study), seed=seed)


def grid_of(study: StudyFile) -> dict[str, list]:
    grid = {}
    for name, p in study.search_space.items():
        if p.type == "bool":
            grid[name] = [False, True]
        elif p.type == "categorical":
            grid[name] = list(p.choices)
        else:
            step = p.step or 1
            count = int(round((p.high - p.low) / step)) + 1
            values = [p.low + i * step for i in range(count)]
            grid[name] = [int(v) for v in values] if p.type == "int" else values
    return grid


def suggest(trial: optuna.Trial, study: StudyFile) -> dict:
    flags = {}
    for name, p in study.search_space.items():
        if p.type == "float":
            flags[name] = trial.suggest_float(name, p.low, p.high, log=p.log, step=p.step)
        elif p.type == "int":
            flags[name] = trial.suggest_int(name, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        elif p.type == "bool":
            flags[name] = trial.suggest_categorical(name, [False, True])
        else:
            flags[name] = trial.suggest_categorical(name, p.choices)
    return flags


def run_study(study: StudyFile, study_text: str, opts: TuneOptions) -> optuna.Study:
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = [o.direction for o in study.objectives]
    ostudy = optuna.create_study(storage=make_storage(opts.storage), study_name=opts.study_name,
                                 directions=directions, sampler=make_sampler(study), load_if_exists=True)
    ostudy.set_user_attr("objectives", [o.model_dump() for o in study.objectives])
    ostudy.set_user_attr("constraints", [c.model_dump() for c in study.constraints])
    ostudy.set_user_attr("study_file", study_text)
    ostudy.set_user_attr("model", study.study.model)
    n_trials = opts.n_trials or study.study.n_trials
    done = len(ostudy.get_trials(deepcopy=False, states=FINISHED))
    if n_trials is not None and done >= n_trials:
        console.print(f"study {opts.study_name!r} already has {done} finished trials (of {n_trials}); nothing to run")
        return ostudy

    def objective(trial: optuna.Trial):
        flags = suggest(trial, study)
        all_flags = {**study.server, **flags}
        trial.set_user_attr("flags", all_flags)
        label = f"{opts.study_name}-trial{trial.number}"
        try:
            outcome = run_trial(study, all_flags, opts.results_dir, opts.launch, label)
        except Exception as exc:  # any failure is this trial's, recorded; the study goes on
            reason = str(exc) if isinstance(exc, TrialFailed) else f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("fail_reason", reason)
            _report(trial.number, n_trials, "FAILED", reason[:200])
            raise TrialFailed(reason) from exc
        trial.set_user_attr("serve_command", outcome.command)
        trial.set_user_attr("result_file", outcome.result_file)
        trial.set_user_attr("metrics", _json_safe(outcome.metrics))
        violations = [c.violation(outcome.metrics) for c in study.constraints]
        trial.set_user_attr("constraints", violations)
        for c, v in zip(study.constraints, violations):
            trial.set_constraint(f"{c.metric} {c.op} {c.value:g}", v)
        values = []
        for o in study.objectives:
            v = outcome.metrics.get(o.metric)
            if v is None:
                trial.set_user_attr("fail_reason", f"the workload did not report {o.metric!r}")
                raise TrialFailed(f"metric {o.metric!r} missing from the results")
            values.append(float(v))
        feasible = all(v <= 0 for v in trial.user_attrs["constraints"])
        _report(trial.number, n_trials, "ok" if feasible else "infeasible",
                ", ".join(f"{o.metric}={v:,.2f}" for o, v in zip(study.objectives, values)))
        return values[0] if len(values) == 1 else values

    callbacks = [MaxTrialsCallback(n_trials, states=FINISHED)] if n_trials else []
    # No n_trials here: MaxTrialsCallback counts the finished trials of every worker sharing the study.
    ostudy.optimize(objective, timeout=opts.timeout or study.study.timeout, catch=(TrialFailed,),
                    callbacks=callbacks, gc_after_trial=True)
    return ostudy


def _report(number: int, total: int | None, state: str, detail: str) -> None:
    colour = {"ok": "green", "infeasible": "yellow", "FAILED": "red"}.get(state, "white")
    console.print(f"trial {number + 1}{f'/{total}' if total else ''} [{colour}]{state}[/] {detail}")


def _json_safe(metrics: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def feasible_trials(ostudy: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in ostudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if all(v <= 0 for v in t.user_attrs.get("constraints", []))]


def best_trials(ostudy: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The best feasible trial, or the feasible Pareto set for several objectives."""
    trials = feasible_trials(ostudy)
    if not trials:
        return []
    signs = [1 if d == optuna.study.StudyDirection.MAXIMIZE else -1 for d in ostudy.directions]
    if len(signs) == 1:
        return [max(trials, key=lambda t: signs[0] * t.values[0])]

    def dominates(a, b):
        sa = [s * v for s, v in zip(signs, a.values)]
        sb = [s * v for s, v in zip(signs, b.values)]
        return all(x >= y for x, y in zip(sa, sb)) and any(x > y for x, y in zip(sa, sb))

    return [t for t in trials if not any(dominates(o, t) for o in trials if o is not t)]


def serve_command(model: str, flags: dict) -> str:
    return f"workbench serve {shlex.quote(model)} {render_flags(flags)}".strip()


def summarize(ostudy: optuna.Study, study: StudyFile, opts: TuneOptions) -> dict:
    trials = ostudy.get_trials(deepcopy=False)
    best = best_trials(ostudy)
    summary = {"study_name": opts.study_name, "storage": opts.storage, "model": study.study.model,
               "objectives": [o.model_dump() for o in study.objectives],
               "constraints": [c.model_dump() for c in study.constraints],
               "trials": {s.name: sum(t.state == s for t in trials) for s in TrialState},
               "best": [{"trial": t.number, "values": t.values, "flags": t.user_attrs.get("flags", {}),
                         "serve_command": serve_command(study.study.model, t.user_attrs.get("flags", {})),
                         "metrics": t.user_attrs.get("metrics", {})} for t in best]}
    path = opts.results_dir / f"{opts.study_name}-best.json"
    path.write_text(json.dumps(summary, indent=2))
    summary["path"] = str(path)
    return summary
