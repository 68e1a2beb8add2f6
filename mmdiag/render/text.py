"""Console text (and Markdown tables) for Runs, doctor detections and plain summaries."""
from __future__ import annotations

import math
from typing import Any

from tabulate import tabulate

from ..analysis.findings import findings
from ..live.stats import pm
from ..run import LiveInfo, ProfileRank, Run
from ..vocab import PHASES, PROFILE_SCHEMA
from . import table

# Every path has these; the others (a broadcast's, shared memory's on 0.5.10+) show where a rank spent time in them.
ALWAYS_SHOWN = ("recv", "forward", "other", "idle")


def shown_phases(profiles) -> tuple[str, ...]:
    """The phases a profile table shows, in vocabulary order: ALWAYS_SHOWN and every other
    phase some rank spent time in (a share hidden by a fixed column list would make a row
    add up to less than 100%)."""
    return tuple(p for p in PHASES if p in ALWAYS_SHOWN
                 or any((pr.phases_pct.get(p) or 0.0) > 0.0 for pr in profiles if pr is not None))


def _f(v, fmt="{:.1f}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def render_run(run: Run) -> str:
    return render_profile(run) if run.schema == PROFILE_SCHEMA else table.render_run(run)


def render_run_md(run: Run) -> str:
    if run.schema == PROFILE_SCHEMA:
        return render_profile(run, "github")
    return "\n\n".join([f"## mmdiag replay at tp {run.tp}", table.summary_table(run, "github"),
                        "### Phase time per request, ms", table.phase_table(run, "github")])


def _profile_head(run: Run, name: str) -> str:
    live = run.live or LiveInfo()
    if live.source == "live":
        return (f"profile of PID {live.target_pid} ({live.target_title or ''}): "
                f"{len(run.ranks or [])} rank(s), {_f(live.duration_s)} s at {live.rate_hz} Hz, "
                f"py-spy {live.pyspy.get('version')}; multimodal path: {name}"
                + "".join(f"\nconfiguration: {ln}" for ln in live.config.get("lines", ())))
    return f"profile from {len(live.files)} py-spy raw file(s); multimodal path: {name}"


def profile_table(run: Run, fmt: str = "simple") -> tuple[str, str]:
    """(the profile's head lines, its rank table) in tabulate's `fmt`."""
    (name, _), = run.strategies.items()
    ranks = list(run.ranks or [])
    profs = [rank.profile or ProfileRank() for rank in ranks]
    shown = shown_phases(profs)
    # Phases as rows, ranks as columns: an 80-column terminal holds five ranks (a row per rank
    # with every phase was ~180 columns wide).
    rows = [["pid"] + [r.pid if r.pid is not None else "-" for r in profs],
            ["samples"] + [r.samples for r in profs]]
    rows += [[f"{p} %"] + [pm(r.phases_pct.get(p), r.phases_ci.get(p)) for r in profs] for p in shown]
    rows += [["of which waiting %"] + [pm(r.wait_pct.get("all"), r.wait_ci.get("all")) for r in profs],
             ["GIL held %"] + [pm(r.gil_held_pct, r.gil_held_ci) for r in profs],
             ["GIL wait %"] + [pm(r.gil_wait_pct, r.gil_wait_ci) for r in profs],
             ["CPU %"] + [_f(r.cpu_pct, "{:.0f}") for r in profs]]
    tab = tabulate(rows, headers=["rank"] + [str(rank.rank) for rank in ranks], tablefmt=fmt,
                   disable_numparse=True)
    return _profile_head(run, name), tab


def render_profile(run: Run, fmt: str = "simple") -> str:
    from .stages import stage_text
    head, tab = profile_table(run, fmt)
    out = (head + "\n\nshares of wall time in percent, +/- the 95% interval (README: "
           "how precise a profile is)\n\n" + tab + "\n" + _spread_line(run) + stage_text(run, fmt))
    found = findings(run)
    if found:
        out += "\nfindings:\n" + "\n".join(f"  - {f}" for f in found) + "\n"
    return out


def render_doctor(det: Any) -> str:
    from ..sglang.report import doctor_text  # one home for doctor's rows (the release facts)
    return doctor_text(det)


def render_mapping(d: dict[str, Any]) -> str:
    """key  value lines; a nested mapping as `k=v, ...` (never a Python dict's repr)."""
    def words(v: Any) -> str:
        if isinstance(v, dict):
            return ", ".join(f"{k}={words(x)}" for k, x in v.items()) or "-"
        if isinstance(v, (list, tuple)):
            return ", ".join(words(x) for x in v) or "-"
        return "-" if v is None else str(v)
    return "\n".join(f"{k:15} {words(v)}" for k, v in d.items()) + "\n"


def _catalog_rows(cat: list[dict[str, Any]], code: str = "") -> list[list[str]]:
    return [[f"{code}{s['name']}{code}" + (" (baseline)" if s["baseline"] else ""), s["summary"], s["collectives"],
             f"{code}{s['patch']}{code}" if s["patch"] else "none ships"] for s in cat]


CATALOG_HEADERS = ["strategy", "what the TP ranks do with each request's mm inputs", "own collectives", "patch"]


def render_catalog(cat: list[dict[str, Any]]) -> str:
    return "\n\n".join(f"{r[0]}\n  {r[1]}\n  collectives: {r[2]}; patch: {r[3]}" for r in _catalog_rows(cat))


def render_catalog_md(cat: list[dict[str, Any]]) -> str:
    # Unpadded rows: the README keeps this table, and a diff of it should show only what changed.
    rows = [CATALOG_HEADERS, ["---"] * len(CATALOG_HEADERS)] + _catalog_rows(cat, "`")
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def _spread_line(run: Run) -> str:
    """The load's own variation between windows of this length (phases_spread), apart from the
    sampling error in the table: the widest rank per phase."""
    widest: dict[str, tuple[float, int]] = {}
    shown = shown_phases([rank.profile for rank in run.ranks or []])
    for rank in run.ranks or []:
        for p, v in (rank.profile or ProfileRank()).phases_spread.items():
            if p in shown and v is not None and not math.isnan(v) and v > widest.get(p, (-1.0, 0))[0]:
                widest[p] = (v, rank.rank)
    if not widest:
        return ""
    parts = ", ".join(f"{p} +/-{widest[p][0]:.1f} (rank {widest[p][1]})" for p in shown if p in widest)
    return f"\nload variation between windows this long (95%, widest rank): {parts}\n"
