"""The replay's own phase timers over a profiling window (for accuracy tests and
benchmarks): a replay started with MMDIAG_STATS_DIR=DIR has each rank rewrite
DIR/rank{r}.json (cumulative phases_ms, a few times a second). Snapshot it when
the window opens and closes; the difference, over the rank's own clock, gives
its main-thread phase shares (other = the rest of the wall time)."""
from __future__ import annotations

import glob
import json
import os

from ..vocab import PHASES, STAGE_PHASES


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


# The tokenizer side's own timers (tests/whole_server_target.py writes DIR/tokenizer.json):
# per server (main thread, hash pool), seconds per phase over its threads, and `threads`.
TOKENIZER_FILE = "tokenizer.json"


def snapshot_tokenizer(stats_dir: str) -> dict | None:
    try:
        with open(os.path.join(stats_dir, TOKENIZER_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def tokenizer_window_shares(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """server -> phase (vocab.STAGE_PHASES["tokenizer"]) -> % of the server's thread time over
    the window (averaged over a pool's threads); `other` is the rest of a thread's time, the
    idle of a server that times only its work (the pool) is the rest."""
    wall = after["time"] - before["time"]
    out = {}
    for name, a in after["servers"].items():
        b = before["servers"].get(name, {"phases_s": {}})
        # A pool starts its threads on demand: each counts from when it first ran (`started`), if given.
        thread_s = (sum(after["time"] - max(t, before["time"]) for t in a["started"]) if a.get("started")
                    else wall * max(1, a.get("threads", 1)))
        d = {p: 100.0 * (a["phases_s"].get(p, 0.0) - b["phases_s"].get(p, 0.0)) / thread_s
             for p in STAGE_PHASES["tokenizer"]}
        rest = max(0.0, 100.0 - sum(d.values()))
        d["idle" if "idle" not in a["phases_s"] else "other"] += rest
        out[name] = d
    return out


def truth_bottleneck(tok: dict[str, dict[str, float]], ranks: dict[int, dict[str, float]]) -> str:
    """The stage whose busiest server is busiest by the timers (the stage that saturates first)."""
    t = max((100.0 - d["idle"] for d in tok.values()), default=0.0)
    s = max((100.0 - d["idle"] for d in ranks.values()), default=0.0)
    return "tokenizer" if t >= s else "scheduler"
