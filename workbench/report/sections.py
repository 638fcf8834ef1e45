"""The report's content as data: sections of text, tables and captioned figures. The static export
writes them as PNG + Markdown + HTML; the Streamlit app's offline page renders the same sections."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from workbench.report import data, offline_plots, plots


@dataclass
class Figure:
    file: str  # PNG name in the export
    title: str
    caption: str  # what to look at
    figure: object  # a matplotlib figure


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


def _slug(path: Path) -> str:
    return path.stem.replace(" ", "-")


def offline_sections(results: str | Path | None, runs: list[data.RunFile]) -> list[Section]:
    """The offline measurements: throughput, latency, kernels, the load generator's ceiling."""
    out = []
    tput = data.offline_runs(runs, "throughput")
    if tput:
        s = Section("Offline throughput (`bench throughput`)", "Output tokens/s of each run beside the transformers "
                    "baseline on the same prompts and the roofline ceiling (the output tokens over the roofline floor "
                    "time: weights and KV bytes over measured bandwidth, FLOPs over the measured matmul rate).",
                    tables=[("throughput runs", offline_plots.throughput_table(tput))])
        s.figures.append(Figure("offline-throughput.png", "Throughput vs transformers and the roofline ceiling",
                                "One panel per run, log axis. Look at how far the blue bar (ours) sits above the grey "
                                "one (transformers) and how close it comes to the green one (the hardware limit); "
                                "the panel title gives both ratios.", offline_plots.throughput_vs_floor(tput)))
        if data.has_repeats(tput):
            s.figures.append(Figure("offline-throughput-compare.png", "Throughput runs compared",
                                    "One bar per run, named label · device · commit (name runs with `--label`), one "
                                    "panel per model, one colour per device. A drop between commits on the same "
                                    "device is a regression; across devices it is the hardware.",
                                    offline_plots.compare_across(tput, "output_throughput", "tok/s")))
        out.append(s)
    for run in data.offline_runs(runs, "latency"):
        out.append(Section(f"Latency vs batch size ({data.run_title(run)})",
                           "Per batch size: time to first token, time per output token and their roofline floors "
                           "(one prefill, one decode step of the batch at its mean context).",
                           tables=[("per batch size", offline_plots.latency_table(run))],
                           figures=[Figure(f"{_slug(run.path)}.png", f"Latency vs batch size ({run.path.stem})",
                                           "Solid: measured; dashed: the floor; each point is labelled measured / "
                                           "floor. A ratio that stays flat as the batch grows means per-step "
                                           "overhead; one that grows means per-sequence work.",
                                           offline_plots.latency_vs_batch(run))]))
    others = data.other_files(results)
    for k in (f for f in others if f.kind == "kernels"):
        out.append(Section(f"Kernels ({k.path.name})", f"`{k.data.get('command', '')}` at commit "
                           f"{str(k.data.get('commit', ''))[:7]} on {k.data.get('device', '?')}.",
                           tables=[("paged decode attention", offline_plots.kernels_table(k))],
                           figures=[Figure(f"{_slug(k.path)}.png", "Decode attention bandwidth",
                                           "Bars: the decode kernel's achieved bandwidth per shape; dashed line: the "
                                           "device's measured copy bandwidth, the practical ceiling. Batch-1 shapes "
                                           "move too few bytes to fill the device.",
                                           offline_plots.kernel_bandwidth(k))]))
    ceilings = [f for f in others if f.kind == "ceiling"]
    if ceilings:
        out.append(Section("Load generator ceiling (`bench ceiling`)", "The client's own limit against a server "
                           "that does no compute, on the same cores.",
                           tables=[("medians", offline_plots.ceiling_table(ceilings))],
                           figures=[Figure("loadgen-ceiling.png", "Load generator ceiling",
                                           "Bars: medians; dots: the individual runs. A serving measurement that comes "
                                           "near these numbers measures the client, not the server.",
                                           offline_plots.loadgen_ceiling(ceilings))]))
    return out


def study_sections(storage: str | None) -> list[Section]:
    out = []
    for name in data.study_names(storage):
        study = data.load_study(storage, name)
        df = data.trials_frame(study)
        objectives = study.user_attrs.get("objectives", [{"metric": "output_throughput", "direction": "maximize"}])
        main = objectives[0]["metric"]
        cols = [c for c in ("trial", "state", "feasible", main) if c in df] + \
               [c for c in df.columns if c.startswith("param:")]
        out.append(Section(f"Study {name}", f"{len(df)} trials, {int(df['feasible'].sum()) if len(df) else 0} "
                           "feasible.", tables=[("trials", df[cols])] if len(df) else [],
                           figures=[Figure(f"study-{name}-pareto.png", f"Pareto front ({name})",
                                           "Grey: trials that broke a constraint; red: the feasible trials no other "
                                           "beats on both axes. Pick from the red line.", plots.pareto_front(df)),
                                    Figure(f"study-{name}-history.png", f"Optimization history ({name})",
                                           "Each trial's objective; the red step is the best feasible so far. A "
                                           "flat step near the end means more trials will not help much.",
                                           plots.optimization_history(df, main,
                                                                      objectives[0]["direction"] == "maximize"))]))
    return out


def serve_sections(results: str | Path | None, runs: list[data.RunFile]) -> list[Section]:
    serve = data.serve_runs(runs)
    out = []
    if serve:
        s = Section("Serving runs (`bench serve`)", tables=[("percentiles (ms)", plots.percentile_table(serve))])
        for kind in plots.LATENCIES:
            s.figures.append(Figure(f"runs-{kind}.png", f"{kind} distribution",
                                    f"{plots.LATENCIES[kind].capitalize()} of every request, on shared bins; p50 and "
                                    f"p99 in the legend. Up to {plots.OVERLAY_MAX} runs are overlaid in distinct "
                                    "colours, more get one panel each.", plots.latency_distributions(serve, kind)))
        if data.has_repeats(serve):
            s.figures.append(Figure("runs-compare.png", "Serving runs compared",
                                    "Output tokens/s per run (label · device · commit), one panel per model, one "
                                    "colour per device.", offline_plots.compare_across(serve, "output_throughput",
                                                                                       "tok/s")))
        s.figures += [Figure(*f) for f in plots.workload_figures(serve)]
        out.append(s)
    for name, points in data.sweeps(results, runs).items():
        out.append(Section(f"Sweep {name}", figures=[Figure(
            f"{name}-ttft.png", f"Throughput vs TTFT ({name})", "Median and p99 TTFT at each offered load (labelled); "
            "the knee is where latency climbs while throughput stops growing.", plots.sweep_curve(points, "ttft"))]))
    return out


def gate_sections(results: str | Path | None, runs: list[data.RunFile]) -> list[Section]:
    out = []
    history = data.history_frame(results)
    if len(history):
        out.append(Section("Gate history file", "The lines `workbench gate --history FILE` appended: each metric's "
                           "median per run, per device and commit.",
                           figures=[Figure("gate-trend.png", "Gate history file",
                                           "One panel per metric, one colour per device; red crosses are runs the "
                                           "gate failed. A lasting step (not one outlier) is what the consecutive-"
                                           "violation rule flags.", plots.history_trend(history))]))
    gates = data.gate_runs(runs)
    if not gates:
        return out
    latest = gates[-1].result
    return out + [Section("Gate", f"Latest verdict: **{latest.extra.get('verdict')}** ({latest.created}).",
                    tables=[("latest gate run", pd.DataFrame(latest.extra.get("rows", [])))],
                    figures=[Figure("gate-history.png", "Gate history",
                                    "Each gated metric's change against the baseline, one point per gate run, oldest "
                                    "first; red lines mark failed runs.", plots.gate_history(gates))])]


def all_sections(storage: str | None, results: str | Path | None) -> list[Section]:
    runs = data.load_results(results)
    return offline_sections(results, runs) + study_sections(storage) + serve_sections(results, runs) + \
        gate_sections(results, runs)
