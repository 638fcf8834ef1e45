"""Every figure of the report, as matplotlib figures: the Streamlit app shows them and
`workbench report --export` saves them as PNG, so both always show the same thing."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from workbench.report.data import RunFile, itl_values_ms, request_frame  # noqa: E402

LATENCIES = {"ttft": "time to first token", "tpot": "time per output token", "itl": "inter-token latency",
             "e2el": "end-to-end latency"}


OVERLAY_MAX = 4  # beyond this many runs a histogram becomes small multiples instead of an overlay


def colours(n: int) -> list:
    """n visibly distinct colours: tab10, then tab20, then evenly spaced on a perceptual map."""
    if n <= 10:
        return list(plt.get_cmap("tab10").colors[:n])
    if n <= 20:
        return list(plt.get_cmap("tab20").colors[:n])
    return [plt.get_cmap("turbo")(x) for x in np.linspace(0.05, 0.95, n)]


def _figure(title: str, width: float = 7.0, height: float = 4.2):
    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig, ax


# ---------------------------------------------------------------- studies
def pareto_front(df: pd.DataFrame, x: str = "output_throughput", y: str = "p99_ttft_ms"):
    """Throughput against p99 latency; the feasible trials that no other feasible trial beats on both."""
    fig, ax = _figure(f"Pareto front: {x} vs {y}")
    done = df[(df["state"] == "COMPLETE") & df[x].notna() & df[y].notna()] if len(df) else df
    if len(done) == 0:
        ax.text(0.5, 0.5, "no completed trials yet", ha="center", transform=ax.transAxes)
        return fig
    feasible = done[done["feasible"]]
    ax.scatter(done[~done["feasible"]][x], done[~done["feasible"]][y], c="lightgray", label="infeasible")
    ax.scatter(feasible[x], feasible[y], c="tab:blue", label="feasible")
    front = feasible.sort_values(x, ascending=False)
    best_y, keep = np.inf, []
    for _, row in front.iterrows():
        if row[y] < best_y:
            keep.append(row)
            best_y = row[y]
    if keep:
        pf = pd.DataFrame(keep).sort_values(x)
        ax.plot(pf[x], pf[y], "o-", c="tab:red", label="Pareto front")
        for _, row in pf.iterrows():
            ax.annotate(f"#{int(row['trial'])}", (row[x], row[y]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend()
    return fig


def optimization_history(df: pd.DataFrame, metric: str, maximize: bool):
    fig, ax = _figure(f"Optimization history: {metric}")
    done = df[(df["state"] == "COMPLETE") & df[metric].notna()].sort_values("trial") if len(df) else df
    if len(done) == 0:
        ax.text(0.5, 0.5, "no completed trials yet", ha="center", transform=ax.transAxes)
        return fig
    ax.scatter(done["trial"], done[metric], c=np.where(done["feasible"], "tab:blue", "lightgray"), label="trial")
    feasible = done[done["feasible"]]
    if len(feasible):
        best = feasible[metric].cummax() if maximize else feasible[metric].cummin()
        ax.step(feasible["trial"], best, where="post", c="tab:red", label="best feasible so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.legend()
    return fig


def parameter_importances(importances: dict[str, float], metric: str):
    fig, ax = _figure(f"Parameter importances for {metric}")
    if not importances:
        ax.text(0.5, 0.5, "needs more completed trials", ha="center", transform=ax.transAxes)
        return fig
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (fANOVA)")
    return fig


def parallel_coordinates(df: pd.DataFrame, metric: str):
    fig, ax = _figure(f"Parallel coordinates, coloured by {metric}", width=8.5)
    params = [c for c in df.columns if c.startswith("param:")]
    done = df[(df["state"] == "COMPLETE") & df[metric].notna()] if len(df) else df
    if len(done) == 0 or not params:
        ax.text(0.5, 0.5, "no completed trials yet", ha="center", transform=ax.transAxes)
        return fig
    cols = params + [metric]
    scaled = pd.DataFrame(index=done.index)
    for c in cols:
        values = pd.to_numeric(done[c].map(lambda v: float(v) if isinstance(v, (bool, int, float)) else hash(v) % 97),
                               errors="coerce")
        span = values.max() - values.min()
        scaled[c] = (values - values.min()) / span if span else 0.5
    cmap = plt.get_cmap("viridis")
    for _, row in scaled.iterrows():
        ax.plot(range(len(cols)), row.values, c=cmap(row[metric]), alpha=0.8)
    ax.set_xticks(range(len(cols)), [c.removeprefix("param:") for c in cols], rotation=20)
    ax.set_yticks([0, 1], ["low", "high"])
    return fig


# ---------------------------------------------------------------- benchmark runs
def latency_distributions(runs: list[RunFile], kind: str):
    """Histograms of one latency for one or more runs, on shared bins: overlaid in distinct colours for a
    few runs, small multiples (one panel per run, shared axes) for more."""
    data = []
    for run in runs:
        values = itl_values_ms(run) if kind == "itl" else request_frame(run)[f"{kind}_ms"].dropna().tolist()
        if values:
            data.append((run.name, values))
    title = f"{LATENCIES[kind]} ({kind}) distribution"
    if not data:
        fig, ax = _figure(title)
        ax.text(0.5, 0.5, "no data", ha="center", transform=ax.transAxes)
        return fig
    bins = np.histogram_bin_edges(np.concatenate([v for _, v in data]), bins=40)
    palette = colours(len(data))
    if len(data) <= OVERLAY_MAX:
        fig, ax = _figure(title)
        axes = [ax] * len(data)
    else:
        cols = 3
        fig, grid = plt.subplots(-(-len(data) // cols), cols, figsize=(10, 2.2 * -(-len(data) // cols)), dpi=110,
                                 sharex=True, sharey=True, squeeze=False)
        fig.suptitle(title)
        axes = list(grid.flat)
        for ax in axes[len(data):]:
            ax.set_visible(False)
    for ax, colour, (name, values) in zip(axes, palette, data):
        ax.hist(values, bins=bins, alpha=0.55 if len(data) <= OVERLAY_MAX else 0.9, color=colour, histtype="stepfilled",
                edgecolor=colour, label=f"{name} (p50 {np.median(values):.1f}, p99 {np.percentile(values, 99):.1f})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[-1 if len(data) <= OVERLAY_MAX else 0].set_xlabel(f"{kind} (ms)")
    axes[0].set_ylabel("count")
    if len(data) > OVERLAY_MAX:
        fig.tight_layout()
    return fig


def sweep_curve(points: list[RunFile], latency: str = "ttft"):
    """The latency-versus-throughput curve of a sweep (median and p99 at each load point)."""
    fig, ax = _figure(f"Throughput vs {latency.upper()} latency")
    x = [p.result.metrics.get("output_throughput") or 0 for p in points]
    for stat, style in (("median", "o-"), ("p99", "s--")):
        y = [p.result.metrics.get(f"{stat}_{latency}_ms") for p in points]
        ax.plot(x, y, style, label=f"{stat} {latency}")
    for p, xi in zip(points, x):
        ax.annotate(p.result.label.split()[-1], (xi, p.result.metrics.get(f"median_{latency}_ms") or 0),
                    textcoords="offset points", xytext=(3, 5), fontsize=8)
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel(f"{latency} (ms)")
    ax.legend()
    return fig


def compare_runs(runs: list[RunFile], metrics: list[str]):
    """Side-by-side bars for chosen metrics (e.g. prefix caching on vs off, our engine vs another)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 4), dpi=110, squeeze=False)
    fig.suptitle("Runs side by side")
    names = [r.name for r in runs]
    for ax, metric in zip(axes[0], metrics):
        values = [r.result.metrics.get(metric) or 0 for r in runs]
        ax.bar(range(len(runs)), values, color=colours(len(runs)))
        ax.set_xticks(range(len(runs)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def percentile_table(runs: list[RunFile]) -> pd.DataFrame:
    rows = []
    for r in runs:
        m = r.result.metrics
        rows.append({"run": r.name, **{f"{s}_{k}_ms": m.get(f"{s}_{k}_ms") for k in LATENCIES
                                       for s in ("median", "p90", "p99")},
                     "output_throughput": m.get("output_throughput"),
                     "request_throughput": m.get("request_throughput")})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- gate
def gate_history(gates: list[RunFile]):
    fig, ax = _figure("Gate history: change against the baseline per metric (%)")
    if not gates:
        ax.text(0.5, 0.5, "no gate runs yet", ha="center", transform=ax.transAxes)
        return fig
    series: dict[str, list[tuple[int, float]]] = {}
    for i, g in enumerate(gates):
        for row in g.result.extra.get("rows", []):
            if row.get("change_pct") is not None:
                series.setdefault(row["metric"], []).append((i, row["change_pct"]))
    for colour, (metric, points) in zip(colours(len(series)), series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=colour, label=metric)
    fails = [i for i, g in enumerate(gates) if g.result.extra.get("verdict") == "fail"]
    for i in fails:
        ax.axvline(i, color="tab:red", alpha=0.3)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("gate run (oldest first; red: failed)")
    ax.set_ylabel("change vs baseline (%)")
    ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------- realistic workloads (load generator)
# Kept as one block: per-turn TTFT for multi-turn runs, latency against time for traces and ramps, and the
# server's /metrics samples against time. Each returns None when its run has nothing to show.
def per_turn_ttft(runs: list[RunFile]):
    """Median and p99 TTFT at each turn of multi-turn runs, with the turn's prefix-cache hit rate."""
    runs = [r for r in runs if r.result.turns]
    if not runs:
        return None
    fig, ax = _figure("TTFT per turn (multi-turn sessions)")
    for run in runs:
        turns = [t["turn"] + 1 for t in run.result.turns]
        line, = ax.plot(turns, [t["median_ttft_ms"] for t in run.result.turns], "o-", label=f"{run.name} median")
        ax.plot(turns, [t["p99_ttft_ms"] for t in run.result.turns], "s--", color=line.get_color(),
                label=f"{run.name} p99")
        for x, t in zip(turns, run.result.turns):
            if t.get("prefix_cache_hit_rate") is not None:
                ax.annotate(f"hit {t['prefix_cache_hit_rate']:.0%}", (x, t["median_ttft_ms"] or 0),
                            textcoords="offset points", xytext=(3, 5), fontsize=7)
    ax.set_xlabel("turn")
    ax.set_ylabel("TTFT (ms)")
    ax.legend(fontsize=8)
    return fig


def latency_over_time(run: RunFile):
    """Each request's TTFT and end-to-end latency at its scheduled send time, with the offered load per
    window (traces and ramps: how latency follows the load)."""
    rows = [(r.scheduled_time if r.scheduled_time is not None else r.start_time, r.ttft, r.e2el)
            for r in run.result.requests if r.success]
    if not rows:
        return None
    fig, ax = _figure(f"Latency over time: {run.name}")
    t, ttft, e2el = zip(*rows)
    ax.scatter(t, [x * 1e3 for x in ttft], s=8, label="TTFT")
    ax.scatter(t, [x * 1e3 for x in e2el], s=8, marker="x", label="E2E latency")
    ax.set_xlabel("scheduled send time (s)")
    ax.set_ylabel("ms")
    ax.legend(loc="upper left", fontsize=8)
    if run.result.windows:
        load = ax.twinx()
        w = run.result.windows
        load.step([x["start_s"] for x in w], [x["offered_rate"] for x in w], where="post", color="gray", alpha=0.6)
        load.set_ylabel("offered requests/s", color="gray")
    return fig


def server_telemetry(run: RunFile):
    """The server's /metrics sampled during the run: KV-cache usage, running and waiting requests."""
    samples = run.result.telemetry
    if not samples:
        return None
    fig, ax = _figure(f"Server during the run: {run.name}")
    t = [s["t"] for s in samples]
    for key in ("running", "waiting"):
        ax.plot(t, [s.get(key) for s in samples], label=key)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("requests")
    kv = ax.twinx()
    kv.plot(t, [100 * (s.get("kv_cache_usage") or 0) for s in samples], color="tab:red", label="KV cache %")
    kv.set_ylabel("KV cache used (%)", color="tab:red")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def workload_figures(runs: list[RunFile]) -> list[tuple[str, str, str, object]]:
    """(file, title, caption, figure) for what realistic workloads add: TTFT per turn of multi-turn runs,
    and for trace replays and ramps, latency against time and the server's telemetry."""
    figures = []
    per_turn = per_turn_ttft(runs)
    if per_turn is not None:
        figures.append(("runs-per-turn-ttft.png", "TTFT per turn (multi-turn runs)",
                        "Median and p99 TTFT at each turn, with the turn's prefix-cache hit rate: with prefix "
                        "caching, later turns (longer histories) should not get slower in step.", per_turn))
    captions = {"latency-over-time": "Each request's TTFT and E2E latency at its scheduled send time, the offered "
                                     "load in grey: latency that climbs with the load marks the server's limit.",
                "telemetry": "The server's /metrics each second: running and waiting requests, KV-cache use. "
                             "Waiting requests while the cache is full means memory, not compute, is the limit."}
    for run in runs:
        if run.result.config.get("dataset") != "trace" and not run.result.config.get("ramp_up"):
            continue
        slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in run.name)
        for kind, plot in (("latency-over-time", latency_over_time), ("telemetry", server_telemetry)):
            fig = plot(run)
            if fig is not None:
                figures.append((f"run-{slug}-{kind}.png", f"{kind.replace('-', ' ')}: {run.name}", captions[kind],
                                fig))
    return figures


def history_trend(df: pd.DataFrame):
    """The gate's history file: one panel per metric, one line per device, failed runs as red crosses."""
    metrics = sorted(df["metric"].unique()) if len(df) else []
    if not metrics:
        fig, ax = _figure("Gate history file")
        ax.text(0.5, 0.5, "no history lines yet", ha="center", transform=ax.transAxes)
        return fig
    cols = min(len(metrics), 2)
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.2 * rows), dpi=110, squeeze=False)
    fig.suptitle("Gate history file: each metric's median per gate run")
    devices = sorted(df["device"].unique())
    palette = dict(zip(devices, colours(len(devices))))
    for ax, metric in zip(axes.flat, metrics):
        sub = df[df["metric"] == metric]
        for device, points in sub.groupby("device"):
            ax.plot(points["run"], points["value"], "o-", ms=3, color=palette[device], label=device)
        failed = sub[sub["verdict"] == "fail"]
        ax.scatter(failed["run"], failed["value"], marker="x", s=60, color="tab:red", zorder=3, label="failed")
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("gate run (oldest first)")
    fig.tight_layout()
    return fig
