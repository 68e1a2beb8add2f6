"""`mmdiag recommend` as console text."""
from __future__ import annotations

import math

from tabulate import tabulate

from ..analysis.recommend import NONE, Recommendation


def _f(x, nd=2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{nd}f}"


def render_recommendation(rec: Recommendation) -> str:
    if rec.recommended is None and rec.leading:
        head = f"recommended: nothing yet, insufficient evidence (`{rec.leading}` leads; keep the current path)"
    elif rec.recommended is None:
        head = "recommended: cannot decide from these measurements (keep the current path)"
    elif rec.remedy and rec.recommended in (None, NONE):
        head = "recommended: no scheduler-side patch: the tokenizer stage bounds throughput (remedy below)"
    elif rec.recommended == NONE:
        head = "recommended: none (leave the multimodal path as it is)"
    else:
        head = f"recommended: {rec.recommended}   ({rec.command or 'mmdiag apply ' + rec.recommended})"
    out = [head, f"confidence:  {rec.confidence}", f"for:         {rec.target}", ""]
    out += [f"- {r}" for r in rec.reasons]
    opts = ([rec.chosen] if rec.chosen else []) + rec.runners_up
    if opts and any(o.expected_rps is not None for o in opts):
        rows = []
        for o in opts:
            mark = "*" if rec.chosen is not None and o is rec.chosen else ""
            rows.append([mark + o.name, _f(o.expected_rps), f"{o.vs_baseline:.2f}x" if o.vs_baseline else "-",
                         _f(o.max_cpu_pct, 0), _f(o.p99_ms, 0), _f(o.noise_pct, 1), o.repeats,
                         o.verdict or ("(recommended)" if mark else "(baseline)" if o.name == rec.baseline
                                       else "-"), o.prefix_cache or "-", o.note])
        out += ["", tabulate(rows, headers=["strategy", "expected req/s", f"vs {rec.baseline}", "max CPU %",
                                            "p99 ms", "noise %", "repeats",
                                            "vs recommended" if rec.chosen else f"significance vs {rec.baseline}",
                                            "prefix cache", "note"],
                             tablefmt="simple", disable_numparse=True)]
    if rec.release_steps:
        rows = [[st.step, st.how, f"{st.strategy} on {st.transport}", _f(st.expected_rps),
                 f"{st.vs_current:.2f}x" if st.vs_current else "-", st.prefix_cache, st.source]
                for st in rec.release_steps]
        out += ["", f"on SGLang {rec.release}:",
                tabulate(rows, headers=["step", "how", "replayed as", "expected req/s", "vs as it is", "prefix cache",
                                        "from"],
                         tablefmt="simple", disable_numparse=True)]
    if rec.measure_next:
        out += ["", "to decide better, measure next:"] + [f"  - {m}" for m in rec.measure_next]
    if rec.notes:
        out += [""] + [f"note: {n}" for n in rec.notes]
    return "\n".join(out) + "\n"
