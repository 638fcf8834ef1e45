"""`workbench report --export DIR`: the report's sections as PNG figures plus report.md and a report.html
that reads on its own (tables, figures, a caption per figure), for CI artifacts and for people
without a browser session."""
from __future__ import annotations

import html
import re
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from workbench.report.sections import Section, all_sections

STYLE = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}td{text-align:right}figure{margin:1em 0 2em}img{max-width:100%}
figcaption{font-size:14px;color:#444;margin-top:.3em}code{background:#f3f3f3;padding:0 3px}"""
EMPTY = "Nothing here yet: run `workbench bench throughput`, `workbench bench serve` or `workbench tune` first."


def export(storage: str | None, results: str | None, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = all_sections(storage, results)
    written = []
    for section in sections:
        for f in section.figures:
            f.figure.savefig(out / f.file, bbox_inches="tight")
            plt.close(f.figure)
            written.append(out / f.file)
    (out / "report.md").write_text(markdown(sections))
    (out / "report.html").write_text(page(sections))
    return written + [out / "report.md", out / "report.html"]


def _number(v) -> str:
    if v is None or (isinstance(v, float) and v != v):  # missing, or NaN from pandas
        return ""
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"  # 49,326 rather than 4.933e+04
    return str(v)


def markdown(sections: list[Section]) -> str:
    lines = ["# PagedBench report", ""] + ([EMPTY, ""] if not sections else [])
    for s in sections:
        lines += [f"## {s.title}", ""] + ([s.text, ""] if s.text else [])
        for name, df in s.tables:
            lines += [f"**{name}**", "", df.map(_number).to_markdown(index=False), ""]
        for f in s.figures:
            lines += [f"### {f.title}", "", f"![{f.title}]({f.file})", "", f"*{f.caption}*", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    """The little Markdown the sections use (**bold**, `code`) as HTML."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _table(df: pd.DataFrame) -> str:
    return df.map(_number).to_html(index=False, border=0, escape=True, na_rep="")


def page(sections: list[Section]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>PagedBench report</title>",
             f"<style>{STYLE}</style></head><body>", "<h1>PagedBench report</h1>"]
    if sections:
        parts.append("<ul>" + "".join(f"<li><a href='#s{i}'>{_inline(s.title)}</a></li>"
                                      for i, s in enumerate(sections)) + "</ul>")
    else:
        parts.append(f"<p>{_inline(EMPTY)}</p>")
    for i, s in enumerate(sections):
        parts.append(f"<h2 id='s{i}'>{_inline(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{_inline(s.text)}</p>")
        for name, df in s.tables:
            parts.append(f"<h4>{html.escape(name)}</h4>{_table(df)}")
        for f in s.figures:
            parts.append(f"<figure><h3>{html.escape(f.title)}</h3><img src='{html.escape(f.file)}' "
                         f"alt='{html.escape(f.title)}'><figcaption>{_inline(f.caption)}</figcaption></figure>")
    return "\n".join(parts + ["</body></html>"])
