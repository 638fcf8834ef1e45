"""After the search: the best configurations and the defaults re-run interleaved (A B C A B C ...), so
that drift in the machine hits every configuration alike, and each compared with the defaults."""
from __future__ import annotations

import statistics

import optuna
from rich.console import Console

from workbench.tune.stats import compare
from workbench.tune.trial import TrialFailed, measure

console = Console(stderr=True)
SEED_OFFSET = 10_000  # validation runs draw prompts the search never saw


def candidates(trials: list[optuna.trial.FrozenTrial], top: int, maximize: bool) -> list[optuna.trial.FrozenTrial]:
    """The best feasible searched trials, one per distinct set of flags, the defaults excluded."""
    ranked = sorted((t for t in trials if t.user_attrs.get("label") != "defaults"),
                    key=lambda t: t.values[0], reverse=maximize)
    out, seen = [], set()
    for t in ranked:
        key = repr(sorted(t.user_attrs.get("flags", {}).items()))
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out[:top]


def validate(study, opts, chosen: list[optuna.trial.FrozenTrial], maximize: bool) -> dict:
    metric = study.objectives[0].metric
    configs = [("defaults", study.default_flags())] + [(t.number, t.user_attrs["flags"]) for t in chosen]
    samples: dict = {name: [] for name, _ in configs}
    failures: dict = {}
    rounds = study.study.validate_rounds
    for r in range(rounds):
        for name, flags in configs:
            label = f"{opts.study_name}-validate-{'defaults' if name == 'defaults' else f'trial{name}'}-v{r}"
            who = f"validate round {r + 1}/{rounds} {'defaults' if name == 'defaults' else f'trial {name}'}"
            try:
                m = measure(study, flags, opts.results_dir, opts.launch, label, [study.workload.seed + SEED_OFFSET + r],
                            status=lambda text: console.print(f"{who}: {text}", markup=False, highlight=False,
                                                              soft_wrap=True))
                value = m.metrics.get(metric)
            except TrialFailed as exc:
                failures.setdefault(str(name), []).append(str(exc)[:300])
                value = None
            if value is not None:
                samples[name].append(float(value))
            console.print(f"{who}: {metric}={value if value is None else f'{value:,.2f}'}")
    base = samples["defaults"]
    rows = []
    for t in chosen:
        row = {"trial": t.number, "flags": t.user_attrs["flags"], "samples": samples[t.number],
               "median": statistics.median(samples[t.number]) if samples[t.number] else None}
        try:
            row["comparison"] = compare(samples[t.number], base, maximize).as_dict()
        except ValueError as exc:  # too few successful runs, or a zero baseline
            row["comparison"] = {"significant": False, "verdict": f"not compared: {exc}"}
        rows.append(row)
    winners = [r for r in rows if r["comparison"]["significant"]]
    best = max(winners, key=lambda r: r["median"] * (1 if maximize else -1)) if winners else None
    return {"metric": metric, "rounds": rounds, "order": [str(n) for n, _ in configs],
            "defaults": {"flags": study.default_flags(), "samples": base,
                         "median": statistics.median(base) if base else None},
            "candidates": rows, "failures": failures, "winner": best["trial"] if best else "defaults",
            "verdict": best["comparison"]["verdict"] if best else "no significant gain over defaults"}
