"""`workbench report --export DIR`: the report's figures as PNG plus a Markdown and HTML summary, for
CI artifacts and for people without a browser session."""
from __future__ import annotations

import html
from pathlib import Path

import matplotlib.pyplot as plt

from reports import data, plots


def export(storage: str | None, results: str | None, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str, object]] = []  # (file, title, figure)
    lines = ["# PagedBench report", ""]
    for name in data.study_names(storage):
        study = data.load_study(storage, name)
        df = data.trials_frame(study)
        objectives = study.user_attrs.get("objectives", [{"metric": "output_throughput", "direction": "maximize"}])
        main = objectives[0]["metric"]
        lines += [f"## Study {name}", "", f"{len(df)} trials, {int(df['feasible'].sum()) if len(df) else 0} feasible.",
                  ""]
        figures += [(f"study-{name}-pareto.png", f"Pareto front ({name})", plots.pareto_front(df)),
                    (f"study-{name}-history.png", f"Optimization history ({name})",
                     plots.optimization_history(df, main, objectives[0]["direction"] == "maximize"))]
        if len(df):
            cols = [c for c in ("trial", "state", "feasible", main) if c in df] + \
                   [c for c in df.columns if c.startswith("param:")]
            lines += [df[cols].to_markdown(index=False), ""]
    runs = data.load_results(results)
    serve = data.serve_runs(runs)
    if serve:
        lines += ["## Benchmark runs", "", plots.percentile_table(serve).to_markdown(index=False), ""]
        for kind in plots.LATENCIES:
            figures.append((f"runs-{kind}.png", f"{kind} distribution", plots.latency_distributions(serve, kind)))
        figures += plots.workload_figures(serve)
    for name, points in data.sweeps(results, runs).items():
        figures.append((f"{name}-ttft.png", f"Throughput vs TTFT ({name})", plots.sweep_curve(points, "ttft")))
    gates = data.gate_runs(runs)
    if gates:
        figures.append(("gate-history.png", "Gate history", plots.gate_history(gates)))
        lines += ["## Gate", "", f"latest verdict: **{gates[-1].result.extra.get('verdict')}**", ""]
    if not figures:
        lines += ["Nothing here yet: run `workbench bench serve` or `workbench tune` first.", ""]
    written = []
    for file, title, fig in figures:
        fig.savefig(out / file, bbox_inches="tight")
        plt.close(fig)
        lines += [f"### {title}", "", f"![{title}]({file})", ""]
        written.append(out / file)
    md = out / "report.md"
    md.write_text("\n".join(lines))
    page = ["<html><head><meta charset='utf-8'><title>PagedBench report</title></head><body>",
            "<h1>PagedBench report</h1>"]
    for file, title, _ in figures:
        page.append(f"<h3>{html.escape(title)}</h3><img src='{html.escape(file)}' style='max-width:900px'>")
    (out / "report.html").write_text("\n".join(page + ["</body></html>"]))
    return written + [md, out / "report.html"]
