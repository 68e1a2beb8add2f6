"""The replay's own phase timers over a profiling window (for accuracy tests and
benchmarks): a replay started with MMDIAG_STATS_DIR=DIR has each rank rewrite
DIR/rank{r}.json (cumulative phases_ms, a few times a second). Snapshot it when
the window opens and closes; the difference, over the rank's own clock, gives
its main-thread phase shares (other = the rest of the wall time)."""
from __future__ import annotations

import glob
import json
import os

from ..vocab import PHASES


def snapshot(stats_dir: str) -> dict[int, dict]:
    out = {}
    for path in glob.glob(os.path.join(stats_dir, "rank*.json")):
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, ValueError):
            continue
        out[int(d["rank"])] = d
    return out


def window_shares(before: dict[int, dict], after: dict[int, dict]) -> dict[int, dict[str, float]]:
    """rank -> phase -> % of the window's wall time (sums to 100 with `other`)."""
    shares = {}
    for r, a in after.items():
        b = before.get(r)
        if b is None or a.get("strategy") != b.get("strategy"):
            continue
        wall_ms = (a["time"] - b["time"]) * 1000.0
        if wall_ms <= 0:
            continue
        d = {p: 100.0 * (a["phases_ms"].get(p, 0.0) - b["phases_ms"].get(p, 0.0)) / wall_ms for p in PHASES}
        d["other"] = max(0.0, 100.0 - sum(v for k, v in d.items() if k != "other"))
        shares[r] = d
    return shares


def compare(profiled: dict[int, dict[str, float]], truth: dict[int, dict[str, float]],
            min_pct: float = 0.0) -> list[dict]:
    """One row per (rank, phase) where either side is at least min_pct: both shares and |diff|."""
    rows = []
    for r in sorted(truth):
        if r not in profiled:
            continue
        for p in PHASES:
            a, b = profiled[r].get(p, 0.0), truth[r].get(p, 0.0)
            if max(a, b) >= min_pct:
                rows.append({"rank": r, "phase": p, "profile": round(a, 2), "replay": round(b, 2),
                             "diff": round(abs(a - b), 2)})
    return rows
