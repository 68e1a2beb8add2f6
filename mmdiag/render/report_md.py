"""The acceptance report as Markdown (pastes into an upstream PR or issue) and as
console text. Same tables, two tabulate formats."""
from __future__ import annotations

import math
from typing import Any

from tabulate import tabulate

from .. import units
from ..analysis.report import Report
from ..vocab import PHASES

STATUS_WORD = {"pass": "pass", "fail": "**FAIL**", "n/a": "n/a"}


def _f(x: Any, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float):
        nd = 2 if abs(x) < 100 else 0
        return f"{x:,.{nd}f}"
    return str(x)


def criteria_rows(rep: Report, md: bool) -> list[list[str]]:
    return [[c.key, c.threshold, c.measured, STATUS_WORD[c.status] if md else c.status.upper(),
             c.note or c.description] for c in rep.criteria]


def metric_rows(rep: Report) -> list[list[str]]:
    return [[m.metric + (f" ({m.unit})" if m.unit else ""), _f(m.before), _f(m.after), m.change,
             m.verdict or "-"] for m in rep.metrics]


def phase_table_rows(rep: Report, phases: tuple[str, ...] = PHASES) -> list[list[str]]:
    rows = []
    for row in rep.phases:
        for side in ("before", "after"):
            vals = row.get(side) or {}
            if not vals:
                continue
            rows.append([str(row["rank"]), side] + [_f(vals.get(p, 0.0)) for p in phases])
    return rows


def header_lines(rep: Report) -> list[str]:
    b, a = rep.before, rep.after
    t = a.run.trace or {}
    lines = [b.describe(), a.describe()]
    src = t.get("source") if isinstance(t.get("source"), dict) else {}
    if src.get("tool") == "sglang.bench_serving":   # a live server, measured with bench_serving
        lines.append(f"workload: sglang.bench_serving --dataset-name {src.get('dataset_name')}, "
                     f"{t.get('requests')} requests per run, --request-rate {src.get('request_rate')}, "
                     f"--max-concurrency {src.get('max_concurrency')}; host {a.run.host.get('hostname', '?')}")
    elif t.get("requests") is not None:
        size = units.fmt_mb(t.get("mean_mm_request_bytes") or 0)
        prof = (t.get("source") or {}).get("profile") if isinstance(t.get("source"), dict) else None
        lines.append(f"workload: {t.get('requests')} requests{f' ({prof})' if prof else ''}, "
                     f"{t.get('mm_requests')} multimodal at {size} each; host "
                     f"{a.run.host.get('hostname', '?')} ({a.run.host.get('cpus', '?')} cores)")
    return lines


def render_markdown(rep: Report) -> str:
    fmt = "github"
    out = [f"## mmdiag acceptance report: {rep.verdict}", ""]
    out += [f"- {ln}" for ln in header_lines(rep)]
    out += ["", "### Acceptance criteria (on the after Run)", "",
            tabulate(criteria_rows(rep, True), headers=["criterion", "threshold", "measured", "result", "note"],
                     tablefmt=fmt, disable_numparse=True),
            "", "### Before / after", "",
            tabulate(metric_rows(rep), headers=["metric", "before", "after", "change", "significance"],
                     tablefmt=fmt, disable_numparse=True),
            "", f"### Phase breakdown per rank ({rep.phase_unit})", "",
            tabulate(phase_table_rows(rep), headers=["rank", "run"] + list(PHASES), tablefmt=fmt,
                     disable_numparse=True)]
    if rep.notes:
        out += [""] + [f"> {n}" for n in rep.notes]
    out += ["", "<sub>made with `mmdiag report`; differences judged with Welch's t-test over replay repeats "
                "(p < 0.05); inside the noise is \"not significant\", never a win</sub>", ""]
    return "\n".join(out)


def render_text(rep: Report) -> str:
    fmt = "simple"
    out = [f"acceptance: {rep.verdict}"] + header_lines(rep) + [
        "", tabulate(criteria_rows(rep, False), headers=["criterion", "threshold", "measured", "result", "note"],
                     tablefmt=fmt, disable_numparse=True),
        "", tabulate(metric_rows(rep), headers=["metric", "before", "after", "change", "significance"],
                     tablefmt=fmt, disable_numparse=True),
        "", f"phase breakdown per rank ({rep.phase_unit})", "",
        tabulate(phase_table_rows(rep), headers=["rank", "run"] + list(PHASES), tablefmt=fmt,
                 disable_numparse=True)]
    out += [f"note: {n}" for n in rep.notes]
    return "\n".join(out) + "\n"
