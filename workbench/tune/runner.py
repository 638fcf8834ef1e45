"""The Optuna study around the trials: storage, samplers, constraints, progress and the best settings."""
from __future__ import annotations

import json
import math
import shlex
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from rich.console import Console
from rich.markup import escape

from workbench.tune import precheck
from workbench.tune.storage import explain, open_storage
from workbench.tune.study_file import StudyFile
from workbench.tune.trial import TrialFailed, measure, render_flags
from workbench.tune.validate import candidates, validate

console = Console(stderr=True)
FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


@dataclass
class TuneOptions:
    storage: str
    study_name: str
    n_trials: int | None
    timeout: float | None
    launch: str | None
    results_dir: Path
    fresh: bool = False  # delete the stored study of this name first


def make_storage(url: str):
    """SQLite or any SQL URL (heartbeats mark trials of a killed worker failed), or journal:PATH;
    StorageError (one line) when it cannot be opened."""
    import sqlalchemy.exc

    for attempt in range(5):
        try:
            return open_storage(url)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            # Workers started together on an empty database race to create Optuna's tables; the
            # loser sees "already exists". The schema is there now: connect again.
            if attempt == 4:
                raise explain(url, exc) from None
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
    return DefaultsAwareGrid(grid_of(study), seed=seed)


class DefaultsAwareGrid(optuna.samplers.GridSampler):
    """Optuna's grid, except that a trial outside it (the enqueued defaults) does not end it: the
    stock after_trial reads every trial's grid_id."""

    def after_trial(self, study, trial, state, values) -> None:
        if "grid_id" in trial.system_attrs:
            super().after_trial(study, trial, state, values)


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
    storage = make_storage(opts.storage)
    if opts.fresh:
        delete_study(storage, opts.study_name)
    ostudy = optuna.create_study(storage=storage, study_name=opts.study_name,
                                 directions=directions, sampler=make_sampler(study), load_if_exists=True)
    ostudy.set_user_attr("objectives", [o.model_dump() for o in study.objectives])
    ostudy.set_user_attr("constraints", [c.model_dump() for c in study.constraints])
    ostudy.set_user_attr("study_file", study_text)
    ostudy.set_user_attr("model", study.study.model)
    n_trials = opts.n_trials or study.study.n_trials
    done = len(ostudy.get_trials(deepcopy=False, states=FINISHED))
    if n_trials is not None and done >= n_trials:
        console.print(f"study {opts.study_name!r} already has {done} finished trials (of {n_trials}); nothing to run. "
                      f"To start afresh add --fresh (deletes this study from the storage) or --study-name NEW "
                      f"(keeps it); to run more trials, --n-trials {done + n_trials}", soft_wrap=True)
        return ostudy
    if study.study.baseline and not ostudy.get_trials(deepcopy=False):
        # Enqueued, so that whichever worker takes trial 0 runs it, and no sampler spends a point on it.
        ostudy.enqueue_trial({}, user_attrs={"label": "defaults"})
    own_engine = opts.launch is None or study.workload.type == "throughput"
    memory = precheck.device_memory(study.study.device_memory) if own_engine else None
    seeds = [study.workload.seed + i for i in range(study.study.repeats)]

    def objective(trial: optuna.Trial):
        is_defaults = trial.user_attrs.get("label") == "defaults"

        def status(text: str) -> None:
            console.print(f"trial {trial.number}: {text}", markup=False, highlight=False, soft_wrap=True)

        all_flags = study.default_flags() if is_defaults else {**study.server, **suggest(trial, study)}
        trial.set_user_attr("flags", all_flags)
        try:
            if own_engine:  # the pre-check knows this engine's rules and defaults, not another server's
                why, estimate = precheck.refuse(study.study.model, all_flags, memory)
                trial.set_user_attr("memory_estimate", estimate)
                if why:
                    raise TrialFailed(why, "precheck")
            m = measure(study, all_flags, opts.results_dir, opts.launch, f"{opts.study_name}-trial{trial.number}",
                        seeds, after_repeat=lambda i, runs: _maybe_prune(trial, ostudy, study, i, runs),
                        status=status)
        except TrialFailed as exc:
            return _infeasible(trial, study, n_trials, exc)
        except optuna.TrialPruned:
            _report(trial, n_trials, "pruned", "clearly below the best after its first run")
            raise
        except Exception as exc:  # a fault of ours or of the workload, not of the configuration
            reason = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("fail_reason", reason)
            trial.set_user_attr("fail_detail", traceback.format_exc())
            _report(trial, n_trials, "FAILED", reason[:200])
            raise TrialError(reason) from exc
        return _complete(trial, study, n_trials, m, is_defaults)

    callbacks = [MaxTrialsCallback(n_trials, states=FINISHED)] if n_trials else []
    # No n_trials here: MaxTrialsCallback counts the finished trials of every worker sharing the study.
    ostudy.optimize(objective, timeout=opts.timeout or study.study.timeout, catch=(TrialError,),
                    callbacks=callbacks, gc_after_trial=True)
    return ostudy


class TrialError(Exception):
    """A trial that broke for a reason other than its configuration: an Optuna FAIL."""


def _complete(trial: optuna.Trial, study: StudyFile, n_trials: int | None, m, is_defaults: bool):
    trial.set_user_attr("serve_command", m.command)
    trial.set_user_attr("result_file", m.result_files[0] if m.result_files else "")
    trial.set_user_attr("result_files", m.result_files)
    trial.set_user_attr("metrics", _json_safe(m.metrics))
    trial.set_user_attr("samples", {o.metric: m.samples.get(o.metric) for o in study.objectives})
    if any(m.probes):
        trial.set_user_attr("probes", m.probes)
    violations = [c.violation(m.metrics) for c in study.constraints]
    trial.set_user_attr("constraints", violations)
    trial.set_constraint("runs", 0.0)
    for c, v in zip(study.constraints, violations):
        trial.set_constraint(f"{c.metric} {c.op} {c.value:g}", v)
    values = []
    for o in study.objectives:
        v = m.metrics.get(o.metric)
        if v is None:
            trial.set_user_attr("fail_reason", f"the workload did not report {o.metric!r}")
            raise TrialError(f"metric {o.metric!r} missing from the results")
        values.append(float(v))
    feasible = all(v <= 0 for v in violations)
    spread = "; ".join(f"{o.metric} {_spread(m.samples.get(o.metric))}" for o in study.objectives
                       if len(m.samples.get(o.metric) or []) > 1)
    _report(trial, n_trials, "ok" if feasible else "infeasible",
            ("defaults: " if is_defaults else "") + ", ".join(f"{o.metric}={v:,.2f}" for o, v in
                                                              zip(study.objectives, values))
            + (f" (repeats: {spread})" if spread else ""))
    return values[0] if len(values) == 1 else values


def _infeasible(trial: optuna.Trial, study: StudyFile, n_trials: int | None, exc: TrialFailed):
    """A configuration that cannot run is a result: COMPLETE, with a violated 'runs' constraint (so
    constrained TPE and NSGA-II learn the region), and the worst value of each objective."""
    trial.set_user_attr("fail_reason", str(exc))
    trial.set_user_attr("fail_kind", exc.kind)
    if exc.detail:
        trial.set_user_attr("fail_detail", exc.detail)
    trial.set_user_attr("constraints", [1.0] * max(1, len(study.constraints)))
    trial.set_constraint("runs", 1.0)
    for c in study.constraints:
        trial.set_constraint(f"{c.metric} {c.op} {c.value:g}", 1.0)
    _report(trial, n_trials, "FAILED", f"{exc.kind}: {str(exc)[:200]}")
    values = [0.0 if o.direction == "maximize" else math.inf for o in study.objectives]
    return values[0] if len(values) == 1 else values


def _maybe_prune(trial: optuna.Trial, ostudy: optuna.Study, study: StudyFile, i: int, runs: list[dict]) -> None:
    """After the first repeat: a trial far below the best so far will not win on its median."""
    if study.study.prune is None or i != 0 or study.study.repeats < 2 or len(study.objectives) > 1:
        return
    o = study.objectives[0]
    value = runs[0].get(o.metric)
    best = [t.values[0] for t in feasible_trials(ostudy)]
    if value is None or not best:
        return
    trial.report(float(value), 0)
    if o.direction == "maximize" and value < study.study.prune * max(best) or \
            o.direction == "minimize" and value * study.study.prune > min(best):
        raise optuna.TrialPruned()


def _spread(samples: list[float] | None) -> str:
    return f"{min(samples):,.2f}..{max(samples):,.2f}" if samples else "-"


def _report(trial: optuna.Trial, total: int | None, state: str, detail: str) -> None:
    """One line per finished trial: its number (Optuna's, from 0: as in the table, the files and the
    report), then how many of the study's trials are done (all workers'), this one included."""
    colour = {"ok": "green", "infeasible": "yellow", "FAILED": "red", "pruned": "yellow"}.get(state, "white")
    done = len(trial.study.get_trials(deepcopy=False, states=FINISHED)) + 1
    of = f" of {total}" if total else ""
    console.print(f"trial {trial.number} [{colour}]{state}[/] {escape(detail)} [dim]({done}{of} trials done)[/]",
                  soft_wrap=True)


def delete_study(storage, name: str) -> None:
    """--fresh: the stored study of this name goes (its result files stay, overwritten as trials rerun)."""
    try:
        count = len(optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False))
    except KeyError:
        console.print(f"--fresh: no study {name!r} in the storage yet")
        return
    optuna.delete_study(study_name=name, storage=storage)
    console.print(f"--fresh: deleted study {name!r} ({count} trials) from the storage")


def first_failure(ostudy: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """When no trial measured anything (each failed or was refused), the first of them; else None."""
    trials = ostudy.get_trials(deepcopy=False)
    measured = [t for t in trials if t.state == TrialState.PRUNED
                or t.state == TrialState.COMPLETE and "fail_kind" not in t.user_attrs]
    failed = [t for t in trials if t.state == TrialState.FAIL or "fail_kind" in t.user_attrs]
    return failed[0] if failed and not measured else None


def failure_text(t: optuna.trial.FrozenTrial) -> str:
    """A failed trial's reason and, where there is one, the whole detail (server log, traceback)."""
    head = f"trial {t.number} ({t.user_attrs.get('fail_kind', 'error')}): {t.user_attrs.get('fail_reason', '?')}"
    detail = t.user_attrs.get("fail_detail")
    return head + (f"\n{detail}" if detail else "")


def _json_safe(metrics: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def feasible_trials(ostudy: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in ostudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "fail_kind" not in t.user_attrs and all(v <= 0 for v in t.user_attrs.get("constraints", []))]


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


def run_validation(ostudy: optuna.Study, study: StudyFile, opts: TuneOptions) -> dict | None:
    """Re-run the top configurations and the defaults interleaved; stored in the study (a resumed study
    with the same candidates reuses it)."""
    if not study.study.validate_rounds:
        return None
    if len(study.objectives) > 1:
        console.print("[yellow]validation needs a single objective[/]; the Pareto set is not validated")
        return None
    maximize = study.objectives[0].direction == "maximize"
    chosen = candidates(feasible_trials(ostudy), study.study.validate_top, maximize)
    if not chosen:
        return None
    key = {"trials": [t.number for t in chosen], "rounds": study.study.validate_rounds}
    previous = ostudy.user_attrs.get("validation")
    if previous and all(previous.get(k) == v for k, v in key.items()):
        return previous
    console.print(f"validating trials {key['trials']} against the defaults: {study.study.validate_rounds} "
                  "interleaved rounds")
    result = validate(study, opts, chosen, maximize) | key
    ostudy.set_user_attr("validation", result)
    return result


def _search_ratio(trial: optuna.trial.FrozenTrial, defaults: optuna.trial.FrozenTrial | None) -> str:
    if defaults is None or trial.number == defaults.number:
        return "the defaults" if defaults is not None else "no defaults trial"
    if not defaults.values or not defaults.values[0]:
        return "defaults gave 0"
    return f"{trial.values[0] / defaults.values[0] - 1:+.1%} vs defaults in the search (not validated)"


def _why_not_validated(study: StudyFile, best: list) -> str:
    if not study.study.validate_rounds:
        return "not validated (validate = 0)"
    if len(study.objectives) > 1:
        return "not validated (validation needs a single objective)"
    return "not validated: no feasible searched trial to re-run against the defaults"


def summarize(ostudy: optuna.Study, study: StudyFile, opts: TuneOptions, validation: dict | None = None) -> dict:
    trials = ostudy.get_trials(deepcopy=False)
    best = best_trials(ostudy)
    defaults = next((t for t in trials if t.user_attrs.get("label") == "defaults" and t.state == TrialState.COMPLETE),
                    None)
    checked = {c["trial"]: c["comparison"]["verdict"] for c in (validation or {}).get("candidates", [])}
    model = study.study.model
    entry = lambda t: {"trial": t.number, "label": t.user_attrs.get("label", ""), "values": t.values,  # noqa: E731
                       "samples": t.user_attrs.get("samples", {}), "flags": t.user_attrs.get("flags", {}),
                       "serve_command": serve_command(model, t.user_attrs.get("flags", {})),
                       "metrics": t.user_attrs.get("metrics", {})}
    summary = {"study_name": opts.study_name, "storage": opts.storage, "model": model,
               "objectives": [o.model_dump() for o in study.objectives],
               "constraints": [c.model_dump() for c in study.constraints],
               "trials": {s.name: sum(t.state == s for t in trials) for s in TrialState},
               "defaults": entry(defaults) if defaults else None,
               "best": [entry(t) | {"vs_defaults": checked.get(t.number) or _search_ratio(t, defaults)} for t in best],
               "validation": validation,
               "verdict": validation["verdict"] if validation else _why_not_validated(study, best)}
    for c in (validation or {}).get("candidates", []):
        c["serve_command"] = serve_command(model, c["flags"])
    if validation:
        winner = next((t for t in trials if t.number == validation["winner"]), None)
        flags = winner.user_attrs["flags"] if winner else study.default_flags()
        summary["recommended"] = {"trial": validation["winner"], "serve_command": serve_command(model, flags),
                                  "verdict": validation["verdict"]}
    path = opts.results_dir / f"{opts.study_name}-best.json"
    path.write_text(json.dumps(summary, indent=2))
    summary["path"] = str(path)
    return summary
