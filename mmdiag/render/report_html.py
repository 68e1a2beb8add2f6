"""The acceptance report as one standalone HTML file: the tables of the Markdown
report plus charts (per-rank phase bars before/after, latency distributions,
throughput per repeat) drawn with matplotlib and embedded as base64 PNG, so the
file needs nothing beside it."""
from __future__ import annotations

import base64
import html
import io
import math

from ..analysis.report import Report
from ..vocab import PHASES
from .report_md import criteria_rows, header_lines, metric_rows, phase_table_rows

PHASE_COLORS = {"recv": "#8c8c8c", "from_dict": "#d62728", "pickle": "#ff7f0e", "broadcast": "#1f77b4",
                "unpickle": "#9467bd", "forward": "#2ca02c", "other": "#bcbd22", "idle": "#e6e6e6"}
SIDE_COLORS = {"before": "#d62728", "after": "#1f77b4"}

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.PASS { color: #1a7f37; } .FAIL { color: #cf222e; } .verdict { font-size: 1.4em; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
.note { color: #555; font-size: 0.9em; }
"""


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def phase_chart(rep: Report) -> str | None:
    plt = _plt()
    phases = [p for p in PHASES if p != "idle"] if rep.phase_unit.startswith("ms") else list(PHASES)
    bars = []
    for row in rep.phases:
        for side in ("before", "after"):
            if row.get(side):
                bars.append((f"rank {row['rank']} {side}", row[side]))
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(bars) + 1.2))
    ys = list(range(len(bars)))[::-1]
    left = [0.0] * len(bars)
    for p in phases:
        vals = [b[1].get(p, 0.0) for b in bars]
        if not any(vals):
            continue
        ax.barh(ys, vals, left=left, color=PHASE_COLORS.get(p), label=p, edgecolor="white", linewidth=0.5)
        left = [l + v for l, v in zip(left, vals)]
    ax.set_yticks(ys, [b[0] for b in bars])
    ax.set_xlabel(rep.phase_unit)
    ax.set_title("scheduler phases per rank, before and after")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18 - 0.5 / len(bars)), fontsize=8, ncols=7, frameon=False)
    return _png(fig)


def latency_chart(rep: Report) -> str | None:
    plt = _plt()
    sides = [(s.label, s.result.latency_hist) for s in (rep.before, rep.after)
             if s.result is not None and s.result.latency_hist and s.result.latency_hist.get("counts")]
    if not sides:
        return None
    fig, ax = plt.subplots(figsize=(9, 3.2))
    for label, h in sides:
        edges, counts = h["edges_ms"], h["counts"]
        total = sum(counts) or 1
        ax.stairs([c / total for c in counts], edges, label=f"{label} ({getattr(rep, label).strategy})",
                  color=SIDE_COLORS[label], linewidth=1.8)
        res = getattr(rep, label).result
        for q, ls in (("p50", "--"), ("p99", ":")):
            v = res.latency_ms.get(q)
            if v is not None and not math.isnan(v):
                ax.axvline(v, color=SIDE_COLORS[label], linestyle=ls, linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("request latency, ms (dashed p50, dotted p99)")
    ax.set_ylabel("share of requests")
    ax.set_title("latency distribution")
    ax.legend(fontsize=8)
    return _png(fig)


def repeats_chart(rep: Report) -> str | None:
    plt = _plt()
    sides = [(s.label, s.result.repeats_rps) for s in (rep.before, rep.after)
             if s.result is not None and s.result.repeats_rps]
    if not sides:
        return None
    fig, ax = plt.subplots(figsize=(5, 2.6))
    for i, (label, xs) in enumerate(sides):
        ax.scatter(xs, [i] * len(xs), color=SIDE_COLORS[label], s=40, zorder=3)
        ax.plot([sum(xs) / len(xs)] * 2, [i - 0.25, i + 0.25], color=SIDE_COLORS[label], linewidth=2)
    ax.set_yticks(range(len(sides)), [f"{l} ({getattr(rep, l).strategy})" for l, _ in sides])
    ax.set_ylim(-0.6, len(sides) - 0.4)
    ax.set_xlabel("throughput per repeat, req/s (bar: mean)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _table(rows, headers) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for r in rows:
        cells = []
        for c in r:
            t = str(c).replace("**", "")
            cls = f" class='{t}'" if t in ("PASS", "FAIL") else ""
            cells.append(f"<td{cls}>{html.escape(t)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(rep: Report) -> str:
    charts: list[tuple[str, str]] = []
    chart_note = ""
    try:
        for fn, caption in ((phase_chart, "Per-rank scheduler phases, before and after."),
                            (latency_chart, "Latency distributions (from each Run's latency histogram)."),
                            (repeats_chart, "Throughput of every repeat: what the significance test sees.")):
            png = fn(rep)
            if png:
                charts.append((png, caption))
    except ImportError:
        chart_note = "charts need matplotlib (pip install matplotlib)"
    v = rep.verdict
    parts = ["<!doctype html>", "<html><head><meta charset='utf-8'>",
             f"<title>mmdiag acceptance report: {html.escape(v)}</title>", f"<style>{CSS}</style></head><body>",
             f"<h1>mmdiag acceptance report: <span class='verdict {html.escape(v.split()[0])}'>{html.escape(v)}</span></h1>",
             "<ul>" + "".join(f"<li>{html.escape(ln)}</li>" for ln in header_lines(rep)) + "</ul>",
             "<h2>Acceptance criteria (on the after Run)</h2>",
             _table(criteria_rows(rep, False), ["criterion", "threshold", "measured", "result", "note"]),
             "<h2>Before / after</h2>",
             _table(metric_rows(rep), ["metric", "before", "after", "change", "significance"]),
             "<h2>Charts</h2>"]
    for png, caption in charts:
        parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{png}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if chart_note:
        parts.append(f"<p class='note'>{html.escape(chart_note)}</p>")
    parts += [f"<h2>Phase breakdown per rank ({html.escape(rep.phase_unit)})</h2>",
              _table(phase_table_rows(rep), ["rank", "run"] + list(PHASES))]
    if rep.notes:
        parts.append("<ul class='note'>" + "".join(f"<li>{html.escape(n)}</li>" for n in rep.notes) + "</ul>")
    parts.append("<p class='note'>Made with mmdiag report. Differences are judged with Welch's t-test over the "
                 "replay repeats (p &lt; 0.05); inside the noise is &quot;not significant&quot;, never a win.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
