"""Under what load a replay measured, and whether a criterion means anything there.

A closed loop (N requests always in flight) runs every rank flat out: it measures
throughput at saturation, and there CPU per rank sits near 100% and p99 latency is
queueing (N / throughput) whatever the patch does. An open loop (Poisson or recorded
arrivals) that the code keeps up with measures CPU and latency at that offered load.
So each criterion is judged only where it means something:

    saturation   throughput: a closed loop, or an open loop the code could not keep up with
    equal_load   CPU per rank, p99 latency: both versions replayed the same open-loop trace,
                 at a rate the "before" version sustained
    per_request  CPU-ms per request: any replay (work per unit served, whatever the load)
    any          judged wherever the measurement exists (GIL wait, rank agreement)

When the given Runs cannot judge a criterion it is n/a, with the reason and the
commands that would measure it (`remeasure`), never a fail.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..mmpath.hashing import prefix_cache_of
from ..run import RankResult, Run, StrategyResult
from ..strategies import BASELINE
from ..vocab import AXES

SATURATION, EQUAL_LOAD, PER_REQUEST, ANY = "saturation", "equal_load", "per_request", "any"
# An open loop is sustained when the achieved throughput is at least this share of the
# offered rate (short Poisson traces fluctuate by several percent around it).
SUSTAINED_SHARE = 0.9
# The rate to replay at, as a share of what "before" carried at saturation: under it.
REPLAY_RATE_SHARE = 0.8


@dataclass
class Side:
    """One Run of a before/after pair, as a report and its conditions read it."""
    label: str              # before | after
    path: str
    run: Run
    strategy: str | None
    result: StrategyResult | None

    @property
    def ranks(self) -> list[RankResult]:
        if self.result is not None:
            return self.result.ranks
        return self.run.ranks or []

    @property
    def is_replay(self) -> bool:
        return self.run.is_replay

    @property
    def has_requests(self) -> bool:
        """Served counted requests: a replay, or a live profile with bench_serving runs attached."""
        return self.result is not None and (self.is_replay or self.result.requests > 0)

    @property
    def load(self) -> Load:
        rps = self.result.throughput_rps if self.result is not None else None
        return load_of(self.run, rps if rps is not None and rps == rps else None)  # nan: not measured

    @property
    def prefix_cache(self) -> str | None:
        """Content hash kept (which), or random (replay --skip-hash); None for a live profile."""
        return prefix_cache_of(self.run.config) if self.run.is_replay else None

    def describe(self) -> str:
        name = f"`{self.strategy}`" if self.strategy else "profile"
        pc = f"; prefix cache: {self.prefix_cache}" if self.prefix_cache else ""
        return f"{self.label}: {name} from {self.path} ({self.run.schema}, tp {self.run.tp}{pc})"


@dataclass
class Load:
    """How one Run's replay loaded the ranks."""
    mode: str                    # closed | poisson | recorded | live
    offered_rps: float | None    # open loop: requests / arrival span
    achieved_rps: float | None

    @property
    def open_loop(self) -> bool:
        return self.mode in ("poisson", "recorded")

    @property
    def sustained(self) -> bool | None:
        """Did the code keep up with the offered rate? None when unknown."""
        if not self.open_loop or not self.offered_rps or self.achieved_rps is None:
            return None
        return self.achieved_rps >= SUSTAINED_SHARE * self.offered_rps

    @property
    def saturated(self) -> bool:
        return self.mode == "closed" or self.sustained is False

    def words(self) -> str:
        if self.mode == "closed":
            return "a closed loop (requests always in flight: the ranks run flat out)"
        if self.open_loop and self.offered_rps:
            return f"an open loop offering {self.offered_rps:.2f} req/s"
        return f"{self.mode} arrivals"


def load_of(run: Run, achieved_rps: float | None) -> Load:
    if run.is_profile and not run.trace.get("arrival"):   # a profile alone serves no counted requests
        return Load("live", None, None)
    arrival = run.trace.get("arrival") or {}
    mode = arrival.get("mode", "recorded")
    offered = None
    if mode == "poisson" and arrival.get("request_rate"):
        offered = float(arrival["request_rate"])
    span = run.trace.get("duration_s")
    if mode in ("poisson", "recorded") and span and run.trace.get("requests"):
        offered = run.trace["requests"] / float(span)   # what this trace really offered
    return Load(mode, offered, achieved_rps)


def same_trace(before: Run, after: Run) -> bool:
    keys = ("path", "requests", "mm_bytes", "arrival")
    return before is after or all(before.trace.get(k) == after.trace.get(k) for k in keys)


def judgeable(condition: str, before: Side, after: Side) -> str | None:
    """None when the two sides measured under `condition`; else why not (for an n/a)."""
    if condition in (ANY, PER_REQUEST) or not before.run.trace.get("arrival"):
        return None
    lb, la = before.load, after.load
    if condition == SATURATION:
        # An after that kept up with the load before could not carry is a lower bound: fair to judge.
        if lb.saturated:
            return None
        return (f"before is {lb.words()} that it kept up with: throughput there is the offered rate, "
                "not what the code can carry")
    # equal_load
    if lb.mode == "closed" or la.mode == "closed":
        return (f"measured in {(lb if lb.mode == 'closed' else la).words()}: CPU per rank and p99 latency "
                "there measure saturation and the queue, not the patch")
    if not same_trace(before.run, after.run):
        return "the two replays ran different traces: not an equal offered load"
    if lb.sustained is False:
        return (f"before did not keep up with {lb.offered_rps:.2f} req/s (it served {lb.achieved_rps:.2f}): "
                "not a load both versions carry")
    return None


def _rate(before: Side) -> float:
    """A rate "before" carries: under its saturated throughput (or under what it served)."""
    rps = before.result.throughput_rps if before.result is not None else None
    rps = rps if rps and rps == rps else 1.0
    return float(f"{REPLAY_RATE_SHARE * rps:.2g}")


def remeasure(condition: str, before: Side, after: Side) -> str:
    """The commands that would measure the two sides under `condition`."""
    run = before.run
    if run.is_profile and run.config.bench_serving:   # a live server measured with bench_serving: re-run that
        from ..ingest.bench_serving import bench_command
        flag = "--max-concurrency N (or --request-rate inf)" if condition == SATURATION else \
            f"--request-rate {_rate(before)}"
        return bench_command(run, flag)
    n = run.trace.get("requests") or 100
    src = run.trace.get("source") if isinstance(run.trace.get("source"), dict) else {}
    profile = src.get("profile")
    if condition == SATURATION:
        conc = max(int(n) // 2, 8)
        arrival, name = f"--max-concurrency {conc}", "closed-loop"
    else:
        arrival, name = f"--request-rate {_rate(before)}", "open-loop"
    synth = (f"mmdiag trace synth --profile {profile} -n {n} {arrival} -o {name}.jsonl" if profile else
             f"(your trace of {n} requests, re-timed: mmdiag trace synth {arrival} -o {name}.jsonl)")
    b, a = before.strategy or BASELINE, after.strategy or BASELINE
    if run.is_replay and run.config.impl == "sglang":   # apply --verify: the install is the strategy
        sg = run.config.sglang.path if run.config.sglang else None
        where = f" --sglang {sg}" if sg else ""
        a = _applied(run, after.run) or a
        return (f"{synth} && mmdiag apply --undo -y{where} && mmdiag apply {a} --verify -y{where} "
                f"--trace {name}.jsonl --tp {run.tp} --repeat 3")
    strategies = " ".join(f"--strategy {s}" for s in dict.fromkeys((b, a)))
    return (f"{synth} && mmdiag replay {name}.jsonl --tp {run.tp} {strategies} --repeat 3 -o {name}.json && "
            f"mmdiag report {name}.json {name}.json --before-strategy {b} --after-strategy {a}")


def _applied(before: Run, after: Run) -> str | None:
    """What `mmdiag apply` changed between two replays of one install: its strategy patch, or
    the axis (a content hash, the segments) whose setting differs; None: nothing recorded."""
    patched = [r.config.sglang.patched if r.config.sglang else None for r in (before, after)]
    if patched[1] and patched[1] != patched[0]:
        return patched[1]
    return next((after.config.setting(x) for x in AXES if after.config.setting(x) != before.config.setting(x)), None)
