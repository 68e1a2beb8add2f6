"""A Run as one standalone HTML page (`-o run.html`): it draws on the text tables and the
stage part alike, so it sits above both (render.text imports render.stages)."""
from __future__ import annotations

import html

from tabulate import tabulate

from ..analysis.findings import findings
from ..run import Run
from .report_html import CSS
from .stages import HEADERS, stage_rows, tokenizer_rows
from .text import profile_table, render_run


def render_run_html(run: Run) -> str:
    """A Run as one standalone page: a profile's rank table, stages, verdict and findings; a
    replay's tables as text."""
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
