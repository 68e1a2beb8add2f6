"""A live profile's findings, in words with their numbers."""
from __future__ import annotations

from statistics import mean

from .attribute import RankProfile

STRATEGY_WORDS = {
    "commit": "17a57fd's path: the entry rank materializes and sends each request with a blocking "
              "broadcast_object_list (`_process_and_broadcast_mm_inputs` on the stacks)",
    "revert": "every rank materializes its own copy (from_dict on every rank, no extra collective)",
    "dict": "the raw mm_inputs dict is broadcast per request and every rank materializes",
    "batch": "one broadcast_object_list per loop iteration for all of its multimodal requests",
    "async": "17a57fd's broadcast on a background thread (`_async_broadcast_worker`)",
    "unknown": "no multimodal frames were sampled (no multimodal traffic in the window, or another code path)",
}
MIN_PCT = 5.0
MIN_PHASE_SAMPLES = 10


def rank_list(ranks: list[int]) -> str:
    rs = sorted(ranks)
    if len(rs) == 1:
        return f"rank {rs[0]}"
    if rs == list(range(rs[0], rs[-1] + 1)):
        return f"ranks {rs[0]}..{rs[-1]}"
    return "ranks " + ", ".join(map(str, rs))


def _verb(xs: list, one: str, many: str) -> str:
    return one if len(xs) == 1 else many


def _spread(vals: list[float]) -> str:
    return f" ({min(vals):.0f}-{max(vals):.0f}%)" if len(vals) > 1 and max(vals) - min(vals) >= 1 else ""


def findings(profiles: list[RankProfile], strategy: str, cpu: dict[int, float | None],
             exited: list[dict] | None = None, notes: list[str] | None = None) -> list[str]:
    out: list[str] = []
    if not profiles:
        return out
    out.append(f"multimodal path: {strategy}: {STRATEGY_WORDS.get(strategy, strategy)}")
    entry = min(p.rank for p in profiles)
    rest = [p for p in profiles if p.rank != entry]
    first = next(p for p in profiles if p.rank == entry)
    ph = lambda p, k: p.phases_pct.get(k, 0.0)  # noqa: E731

    if rest:
        b = [ph(p, "broadcast") for p in rest]
        if mean(b) >= MIN_PCT:
            out.append(f"{rank_list([p.rank for p in rest])} {_verb(rest, 'spends', 'spend')} {mean(b):.0f}% of "
                       f"{_verb(rest, 'its', 'their')} time{_spread(b)} "
                       f"waiting on rank {entry} in broadcast_object_list (rank {entry}: {ph(first, 'broadcast'):.0f}%)")
    fd = {p.rank: ph(p, "from_dict") for p in profiles}
    if max(fd.values()) >= MIN_PCT:
        if rest and fd[entry] >= MIN_PCT and max(fd[p.rank] for p in rest) < 1.0:
            out.append(f"rank {entry} spends {fd[entry]:.0f}% in from_dict (feature hashing) while "
                       f"{rank_list([p.rank for p in rest])} {_verb(rest, 'spends', 'spend')} under 1%: materialization runs once, on the entry rank")
        else:
            vals = list(fd.values())
            out.append(f"from_dict (materialization, sha256 hashing) takes {mean(vals):.0f}% of each rank's time{_spread(vals)}")
    pk, up = ph(first, "pickle"), [ph(p, "unpickle") for p in rest]
    if pk >= MIN_PCT or (up and mean(up) >= MIN_PCT):
        s = f"rank {entry} pickles for {pk:.0f}% of its time"
        if up:
            s += f"; {rank_list([p.rank for p in rest])} {_verb(rest, 'unpickles', 'unpickle')} for {mean(up):.0f}%{_spread(up)}"
        out.append(s + " (the strategy's own collective)")
    rv = [ph(p, "recv") for p in profiles]
    if max(rv) >= MIN_PCT:
        s = f"the request receive (recv_requests / broadcast_pyobj) takes {ph(first, 'recv'):.0f}% on rank {entry}"
        if rest:
            r2 = [ph(p, "recv") for p in rest]
            s += f" and {mean(r2):.0f}%{_spread(r2)} on {rank_list([p.rank for p in rest])} (waiting for rank {entry}'s requests included)"
        out.append(s)
    idle = [ph(p, "idle") for p in profiles]
    if max(idle) >= MIN_PCT:
        parts = ", ".join(f"rank {p.rank} {ph(p, 'idle'):.0f}%" for p in profiles)
        out.append(f"idle (waiting for requests): {parts}")
    # GIL by phase, pooled over ranks.
    pooled: dict[str, tuple[float, int]] = {}
    for p in profiles:
        for k, g in p.phase_gil_pct.items():
            n = p.phase_counts.get(k, 0)
            if g is not None and n:
                held, tot = pooled.get(k, (0.0, 0))
                pooled[k] = (held + g * n / 100.0, tot + n)
    gil = {k: 100.0 * h / n for k, (h, n) in pooled.items() if n >= MIN_PHASE_SAMPLES}
    if "from_dict" in gil and any(k in gil for k in ("pickle", "unpickle")):
        other = "pickle" if "pickle" in gil else "unpickle"
        verb = "releases" if gil["from_dict"] < 50 else "mostly holds"
        out.append(f"hashing {verb} the GIL (from_dict held it in {gil['from_dict']:.0f}% of its samples) "
                   f"while {other} holds it ({gil[other]:.0f}%)")
    elif gil:
        out.append("GIL held by phase: " + ", ".join(f"{k} {v:.0f}%" for k, v in sorted(gil.items(), key=lambda kv: -kv[1])))
    waits = [(p.rank, p.gil_wait_pct) for p in profiles if p.gil_wait_pct and p.gil_wait_pct >= MIN_PCT]
    for r, w in waits:
        p = next(x for x in profiles if x.rank == r)
        who = ", ".join(t["name"] or str(t["tid"]) for t in p.other_threads if t.get("gil_held_pct"))
        out.append(f"rank {r}: up to {w:.0f}% of the main thread's time may be GIL wait (held by: {who or 'other threads'})")
    pinned = [(r, c) for r, c in sorted(cpu.items()) if c is not None and c >= 90.0]
    if pinned:
        out.append("scheduler CPU pinned: " + ", ".join(f"rank {r} {c:.0f}%" for r, c in pinned))
    for p in profiles:
        if ph(p, "other") >= 30.0 and p.top_other:
            top = ", ".join(f"{n} ({c})" for n, c in p.top_other[:3])
            out.append(f"rank {p.rank}: {ph(p, 'other'):.0f}% of samples match no phase rule (most in: {top})")
    for e in exited or []:
        out.append(f"rank {e['rank']} (pid {e['pid']}) exited during the window; "
                   f"kept its {e['samples']} samples (about {e['sampled_s']:.1f} s)")
    out.extend(notes or [])
    return out
