"""A live profile's stage part (Run.stages, Run.bottleneck: mmdiag.live.stages) as text,
Markdown and HTML, and a profile Run as one HTML page."""
from __future__ import annotations

import html

from tabulate import tabulate

from ..live.stats import pm
from ..run import Run
from ..vocab import STAGE_PHASES

HEADERS = ["stage", "server", "pid", "busy %", "service ms/req", "capacity req/s"]


def stage_rows(run: Run) -> list[list[str]]:
    """One row per server, with the service time and capacity its own busy share implies over the
    requests counted (mmdiag.live.stages: u n W / N and N / (u W)); '-' without a count."""
    b = run.bottleneck or {}
    n, w = b.get("requests"), b.get("window_s")
    rows = []
    for st in run.stages:
        for sv in st.servers:
            u, rel = sv.busy_pct / 100.0, (sv.busy_ci / sv.busy_pct if sv.busy_ci is not None and sv.busy_pct else None)
            service = capacity = "-"
            if n and w and u > 0:
                sv_ms, cap = 1000.0 * u * sv.threads * w / n, n / (u * w)
                service = pm(sv_ms, None if rel is None else sv_ms * rel)
                capacity = pm(cap, None if rel is None else cap * rel)
            rows.append([st.role, sv.name + (" *" if sv.name == st.bound_by else ""),
                         str(sv.pid) if sv.pid is not None else "-", pm(sv.busy_pct, sv.busy_ci), service, capacity])
    return rows


def tokenizer_rows(run: Run) -> tuple[list[str], list[list[str]]]:
    """The tokenizer stage's phases (vocab.STAGE_PHASES), one column per server."""
    st = next((s for s in run.stages if s.role == "tokenizer"), None)
    if st is None:
        return [], []
    head = ["tokenizer phase"] + [s.name for s in st.servers]
    return head, [[f"{p} %"] + [pm(s.phases_pct.get(p), s.phases_ci.get(p)) for s in st.servers]
                  for p in STAGE_PHASES["tokenizer"]]


def stage_text(run: Run, fmt: str = "simple") -> str:
    if not run.stages:
        return ""
    head, rows = tokenizer_rows(run)
    out = ("\nstages (the server as a pipeline; * the server that bounds its stage; per multimodal request: "
           "mmdiag.live.stages says how it is counted)\n\n"
           + tabulate(stage_rows(run), headers=HEADERS, tablefmt=fmt, disable_numparse=True) + "\n")
    if rows:
        out += "\n" + tabulate(rows, headers=head, tablefmt=fmt, disable_numparse=True) + "\n"
    if run.bottleneck:
        out += f"\nbottleneck: {run.bottleneck['text']}\n"
    return out


def stage_lines(stages, verdict: dict | None) -> list[str]:
    """`mmdiag top`'s lines for the stages: each server's busy share, and the verdict."""
    out = []
    for st in stages:
        busy = ", ".join(f"{s.name} {pm(s.busy_pct, s.busy_ci, 0)}" for s in st.servers)
        out.append(f"{st.role} busy %: {busy}")
    if verdict and verdict.get("capacity_rps") is not None:
        out.append(f"bottleneck: {verdict['stage']} stage, caps at {pm(verdict['capacity_rps'], verdict['capacity_ci'])} "
                   f"req/s; {verdict['next']} would take {pm(verdict['next_capacity_rps'], verdict['next_capacity_ci'])}")
    elif verdict:
        out.append(f"bottleneck: {verdict['stage']} stage, {verdict['ratio']}x the next (busy shares)"
                   if verdict.get("ratio") is not None else f"bottleneck: {verdict['stage']} stage")
    return out


def render_run_html(run: Run) -> str:
    """A Run as one standalone page: a profile's rank table, stages, verdict and findings; a
    replay's tables as text."""
    from ..analysis.findings import findings
    from .report_html import CSS
    from .text import render_run, profile_table
    parts = ["<!doctype html>", "<html><head><meta charset='utf-8'>", "<title>mmdiag Run</title>",
             f"<style>{CSS}</style></head><body>"]
    if not run.is_profile:
        parts += ["<h1>mmdiag replay</h1>", f"<pre>{html.escape(render_run(run))}</pre>", "</body></html>\n"]
        return "\n".join(parts)
    head, table = profile_table(run, "html")
    parts += ["<h1>mmdiag profile</h1>", "<ul>" + "".join(f"<li>{html.escape(ln)}</li>" for ln in head.splitlines())
              + "</ul>", "<h2>Scheduler ranks: shares of wall time, % +/- 95% interval</h2>", table]
    if run.stages:
        parts += ["<h2>Stages</h2>", tabulate(stage_rows(run), headers=HEADERS, tablefmt="html", disable_numparse=True)]
        thead, trows = tokenizer_rows(run)
        if trows:
            parts.append(tabulate(trows, headers=thead, tablefmt="html", disable_numparse=True))
    if run.bottleneck:
        parts.append(f"<p class='verdict'>bottleneck: {html.escape(run.bottleneck['text'])}</p>")
    found = findings(run)
    if found:
        parts += ["<h2>Findings</h2>", "<ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in found) + "</ul>"]
    parts.append("</body></html>\n")
    return "\n".join(parts)
