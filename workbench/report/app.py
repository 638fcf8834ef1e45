"""The PagedBench report: `workbench report --storage URL --results DIR` (or `streamlit run workbench/report/app.py --
--storage URL --results DIR`). Four pages: a study, serving runs, offline runs (throughput, latency, kernels, the
load generator's ceiling), the gate's history. `?page=Offline+runs` in the address opens a page directly."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `streamlit run` puts only this folder on the path

import streamlit as st  # noqa: E402

from workbench.report import data, plots, sections  # noqa: E402

PAGES = ("Study", "Benchmark runs", "Offline runs", "Gate history")


def settings() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--storage", default=os.environ.get("PAGEDBENCH_STORAGE"))
    parser.add_argument("--results", default=os.environ.get("PAGEDBENCH_RESULTS", "results"))
    args, _ = parser.parse_known_args(sys.argv[1:])
    return args


def nothing_yet(what: str, how: str) -> None:
    st.info(f"Nothing here yet: no {what}. Run `{how}` first.")


def study_page(storage: str | None) -> None:
    st.header("Study")
    names = data.study_names(storage)
    if not names:
        nothing_yet("Optuna study in the storage", "workbench tune")
        return
    name = st.selectbox("study", names)
    study = data.load_study(storage, name)
    df = data.trials_frame(study)
    objectives = study.user_attrs.get("objectives", [])
    st.caption(f"{len(df)} trials; objectives: " + ", ".join(f"{o['direction']} {o['metric']}" for o in objectives)
               + "; constraints: " + (", ".join(f"{c['metric']} {c['op']} {c['value']}"
                                                for c in study.user_attrs.get("constraints", [])) or "none"))
    st.subheader("Trials")
    st.dataframe(df, width="stretch", hide_index=True)  # click a column to sort
    main = objectives[0]["metric"] if objectives else "output_throughput"
    maximize = (objectives[0]["direction"] == "maximize") if objectives else True
    left, right = st.columns(2)
    left.pyplot(plots.pareto_front(df))
    right.pyplot(plots.optimization_history(df, main, maximize))
    left, right = st.columns(2)
    left.pyplot(plots.parameter_importances(importances(study, len(objectives)), main))
    right.pyplot(plots.parallel_coordinates(df, main))
    st.subheader("One trial")
    numbers = df["trial"].tolist()
    pick = st.selectbox("trial", numbers)
    trial = study.trials[int(pick)]
    st.json({"state": trial.state.name, "flags": trial.user_attrs.get("flags", {}),
             "serve_command": trial.user_attrs.get("serve_command"),
             "fail_reason": trial.user_attrs.get("fail_reason"), "metrics": trial.user_attrs.get("metrics", {})})


def importances(study, num_objectives: int) -> dict[str, float]:
    import optuna

    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if len(done) < 3 or not done[0].params:
        return {}
    try:
        return optuna.importance.get_param_importances(
            study, target=(lambda t: t.values[0]) if num_objectives > 1 else None)
    except (RuntimeError, ValueError, ZeroDivisionError):
        return {}


def runs_page(results: str) -> None:
    st.header("Benchmark runs")
    runs = data.load_results(results)
    serve = data.serve_runs(runs)
    if not serve:
        nothing_yet(f"serving benchmark results in {results}", "workbench bench serve")
        return
    chosen = st.multiselect("runs", [r.name for r in serve], default=[r.name for r in serve[:2]])
    selected = [r for r in serve if r.name in chosen] or serve[:1]
    st.subheader("Percentiles (ms)")
    st.dataframe(plots.percentile_table(selected), width="stretch", hide_index=True)
    cols = st.columns(2)
    for i, kind in enumerate(plots.LATENCIES):
        cols[i % 2].pyplot(plots.latency_distributions(selected, kind))
    if len(selected) >= 2:
        st.pyplot(plots.compare_runs(selected, ["output_throughput", "median_ttft_ms", "p99_ttft_ms",
                                                "median_tpot_ms"]))
    workload = plots.workload_figures(selected)
    if workload:
        st.subheader("Sessions, traces and ramps")
        for _, title, caption, fig in workload:
            st.markdown(f"**{title}**")
            st.pyplot(fig)
            st.caption(caption)
    sweeps = data.sweeps(results, runs)
    if sweeps:
        st.subheader("Sweeps")
        name = st.selectbox("sweep", list(sweeps))
        left, right = st.columns(2)
        left.pyplot(plots.sweep_curve(sweeps[name], "ttft"))
        right.pyplot(plots.sweep_curve(sweeps[name], "tpot"))


def offline_page(results: str) -> None:
    st.header("Offline runs")
    found = sections.offline_sections(results, data.load_results(results))
    if not found:
        nothing_yet(f"offline benchmark results in {results}", "workbench bench throughput")
        return
    for section in found:
        st.subheader(section.title)
        if section.text:
            st.markdown(section.text)
        for name, df in section.tables:
            st.caption(name)
            st.dataframe(df, width="stretch", hide_index=True)
        for figure in section.figures:
            st.pyplot(figure.figure)
            st.caption(figure.caption)


def gate_page(results: str) -> None:
    st.header("Gate history")
    gates = data.gate_runs(data.load_results(results))
    history = data.history_frame(results)
    if len(history):
        st.pyplot(plots.history_trend(history))
    if not gates:
        if not len(history):
            nothing_yet(f"gate runs in {results}", "workbench gate")
        return
    st.pyplot(plots.gate_history(gates))
    latest = gates[-1]
    st.subheader(f"Latest: {latest.result.extra.get('verdict', '?').upper()} ({latest.result.created})")
    st.dataframe(latest.result.extra.get("rows", []), width="stretch", hide_index=True)


def main() -> None:
    st.set_page_config(page_title="PagedBench report", layout="wide")
    st.title("PagedBench report")
    args = settings()
    asked = st.query_params.get("page")
    page = st.sidebar.radio("page", PAGES, index=PAGES.index(asked) if asked in PAGES else 0)
    st.sidebar.caption(f"storage: {args.storage or '(none)'}\n\nresults: {args.results}")
    if page == "Study":
        study_page(args.storage)
    elif page == "Benchmark runs":
        runs_page(args.results)
    elif page == "Offline runs":
        offline_page(args.results)
    else:
        gate_page(args.results)


main()
