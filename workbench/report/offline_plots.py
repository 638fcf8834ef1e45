"""Figures and tables for the offline measurements the README quotes: `bench throughput` against the
transformers baseline and the roofline floor, `bench latency` against batch size with its floor,
runs compared across commits, devices and labels, the kernel bandwidths and the load generator's
ceiling. Matplotlib figures, so the Streamlit page and the PNG export show the same thing."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from workbench.report.data import OtherFile, RunFile, model_of, run_title, short_device
from workbench.report.plots import colours

DPI = 110


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", transform=ax.transAxes)


def fit_under_title(fig) -> None:
    """tight_layout with room for the suptitle (half an inch), however tall the figure."""
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))


# ---------------------------------------------------------------- throughput
def ceiling_throughput(run: RunFile) -> float | None:
    """Output tokens/s if the run took exactly its roofline floor."""
    m = run.result.metrics
    floor, tokens = m.get("roofline_floor_s"), m.get("total_output_tokens")
    return tokens / floor if floor and tokens else None


def throughput_vs_floor(runs: list[RunFile]):
    """Small multiples, one panel per run: transformers, ours and the roofline ceiling on a log axis."""
    fig, axes = plt.subplots(max(len(runs), 1), 1, figsize=(8, 1.7 + 1.5 * max(len(runs), 1)), dpi=DPI,
                             squeeze=False, sharex=True)  # one scale, so panels compare at a glance
    fig.suptitle("Output throughput: transformers baseline, PagedBench, roofline ceiling")
    if not runs:
        _empty(axes[0][0], "no throughput runs yet")
        return fig
    names = ("transformers", "PagedBench", "roofline ceiling")
    everything = [v for r in runs for v in (r.result.metrics.get("baseline_output_throughput"),
                                            r.result.metrics.get("output_throughput"), ceiling_throughput(r)) if v]
    palette = dict(zip(names, ("tab:gray", "tab:blue", "tab:green")))
    for ax, run in zip(axes[:, 0], runs):
        m = run.result.metrics
        values = dict(zip(names, (m.get("baseline_output_throughput"), m.get("output_throughput"),
                                  ceiling_throughput(run))))
        shown = [(k, v) for k, v in values.items() if v]
        ax.barh([k for k, _ in shown], [v for _, v in shown], color=[palette[k] for k, _ in shown])
        for i, (_k, v) in enumerate(shown):
            ax.text(v, i, f" {v:,.0f}", va="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlim(min(everything) / 3, max(everything) * 6)
        ratios = []
        if m.get("speedup_vs_baseline"):
            ratios.append(f"{m['speedup_vs_baseline']:.0f}x transformers")
        if m.get("time_over_floor"):
            ratios.append(f"{m['time_over_floor']:.2f}x the floor's time")
        seqs = run.result.config.get("max_num_seqs")  # what tells apart runs of one model, device, commit
        ax.set_title(f"{run_title(run)}{f' · max-num-seqs {seqs}' if seqs else ''}: " + ", ".join(ratios),
                     fontsize=9, loc="left")
        ax.grid(alpha=0.3, axis="x")
    axes[-1][0].set_xlabel("output tokens/s (log scale)")
    fit_under_title(fig)
    return fig


def throughput_table(runs: list[RunFile]) -> pd.DataFrame:
    rows = []
    for r in runs:
        m, c = r.result.metrics, r.result.config
        rows.append({"run": run_title(r), "model": c.get("model"), "prompts": c.get("num_prompts"),
                     "in/out": f"{c.get('input_len')}/{c.get('output_len')}",
                     "output tok/s": m.get("output_throughput"),
                     "transformers tok/s": m.get("baseline_output_throughput"),
                     "speedup": m.get("speedup_vs_baseline"), "ceiling tok/s": ceiling_throughput(r),
                     "time over floor": m.get("time_over_floor"), "file": r.path.name})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- latency
def latency_rows(run: RunFile) -> pd.DataFrame:
    return pd.DataFrame(run.result.extra.get("rows", [])).sort_values("batch_size") \
        if run.result.extra.get("rows") else pd.DataFrame()


def latency_vs_batch(run: RunFile):
    """TPOT and TTFT against batch size, each with its roofline floor."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=DPI)
    fig.suptitle(f"Latency vs batch size: {run_title(run)}")
    df = latency_rows(run)
    for ax, key, name in zip(axes, ("tpot", "ttft"), ("time per output token", "time to first token")):
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        if df.empty or f"{key}_ms" not in df:
            _empty(ax, "no per-batch rows")
            continue
        ax.plot(df["batch_size"], df[f"{key}_ms"], "o-", color="tab:blue", label="measured")
        if f"{key}_floor_ms" in df:
            ax.plot(df["batch_size"], df[f"{key}_floor_ms"], "s--", color="tab:green", label="roofline floor")
            for _, row in df.iterrows():
                ax.annotate(f"{row[f'{key}_ms'] / row[f'{key}_floor_ms']:.2f}x", (row["batch_size"], row[f"{key}_ms"]),
                            textcoords="offset points", xytext=(4, 6), fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(df["batch_size"], [str(b) for b in df["batch_size"]])
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"{key} (ms)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fit_under_title(fig)
    return fig


def latency_table(run: RunFile) -> pd.DataFrame:
    df = latency_rows(run)
    keep = [c for c in ("batch_size", "ttft_ms", "ttft_floor_ms", "tpot_ms", "tpot_floor_ms", "tpot_over_floor",
                        "e2e_ms", "output_throughput") if c in df]
    return df[keep] if keep else df


# ---------------------------------------------------------------- comparisons
def compare_across(runs: list[RunFile], metric: str, unit: str = ""):
    """One bar per run (label · device · commit), one panel per model so scales never mix; colour = device."""
    groups: dict[str, list[RunFile]] = {}
    for r in runs:
        groups.setdefault(model_of(r), []).append(r)
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(max(4.5 * len(groups), 6.5), 4.6), dpi=DPI,
                             squeeze=False)
    fig.suptitle(f"{metric} across commits, devices and labels")
    if not groups:
        _empty(axes[0][0], "no runs")
        return fig
    devices = sorted({short_device(r.result.environment.device) or "?" for r in runs})
    palette = dict(zip(devices, colours(len(devices))))
    for ax, (model, group) in zip(axes[0], groups.items()):
        values = [r.result.metrics.get(metric) or 0 for r in group]
        ax.bar(range(len(group)), values,
               color=[palette[short_device(r.result.environment.device) or "?"] for r in group])
        ax.set_xticks(range(len(group)), [run_title(r) for r in group], rotation=25, ha="right", fontsize=7)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:,.0f}" if v >= 100 else f"{v:.3g}", ha="center", va="bottom", fontsize=8)
        ax.set_title(model, fontsize=9)
        ax.set_ylabel(f"{metric}{f' ({unit})' if unit else ''}")
        ax.grid(alpha=0.3, axis="y")
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[d]) for d in devices]
    fig.legend(handles, devices, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.93), ncol=len(devices),
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    return fig


# ---------------------------------------------------------------- kernels and the load generator
def kernel_bandwidth(kernels: OtherFile):
    """Decode attention bandwidth per shape against the measured copy bandwidth."""
    doc = kernels.data
    fig, ax = plt.subplots(figsize=(8, 3.8), dpi=DPI)
    ax.set_title(f"Paged decode attention bandwidth ({short_device(doc.get('device', ''))})")
    rows = doc.get("decode", [])
    names = [f"batch {r['batch']}, ctx {r['context']}, {r['heads']}/{r['kv_heads']} heads, d {r['head_dim']}"
             for r in rows]
    values = [r["bandwidth_GBps"] for r in rows]
    ax.barh(names, values, color=colours(len(rows)))
    copy = doc["copy_bandwidth_GBps"]
    ax.axvline(copy, color="black", ls="--", label=f"measured copy bandwidth {copy:,.0f} GB/s")
    for i, r in enumerate(rows):
        ax.text(r["bandwidth_GBps"], i, f" {r['bandwidth_GBps']:,.0f} GB/s ({r['fraction_of_copy_bandwidth']:.1%})",
                va="center", fontsize=8)
    ax.set_xlim(0, copy * 1.35)
    ax.set_xlabel("GB/s")
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def kernels_table(kernels: OtherFile) -> pd.DataFrame:
    return pd.DataFrame(kernels.data.get("decode", []))


def loadgen_ceiling(files: list[OtherFile]):
    """Requests/s (short replies) and streamed tokens/s (long replies) per client setup; dots are the runs."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=DPI)
    fig.suptitle("Load generator ceiling (no-compute server)")
    files = sorted(files, key=lambda f: f.data.get("workers", 0))
    palette = colours(len(files))
    for ax, key, metric, label in zip(axes, ("requests", "tokens"), ("request_throughput", "output_throughput"),
                                      ("requests/s (8-token replies)", "streamed tokens/s (64-token replies)")):
        for i, f in enumerate(files):
            values = [run[metric] for run in f.data["runs"].get(key, [])]
            if values:
                ax.bar(i, float(np.median(values)), color=palette[i])
                ax.scatter([i] * len(values), values, color="black", s=10, zorder=3)
        ax.set_xticks(range(len(files)), [f"--workers {f.data.get('workers', '?')}" for f in files])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    fit_under_title(fig)
    return fig


def ceiling_table(files: list[OtherFile]) -> pd.DataFrame:
    return pd.DataFrame([{"workers": f.data.get("workers"), "requests/s": f.data.get("median_request_throughput"),
                          "streamed tokens/s": f.data.get("median_streamed_tokens_per_s"),
                          "concurrency": f.data.get("max_concurrency"), "cpu cores": f.data.get("cpu_cores"),
                          "file": f.path.name} for f in sorted(files, key=lambda f: f.data.get("workers", 0))])
