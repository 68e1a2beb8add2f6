"""Which step pays on a given SGLang release: upgrading, setting the hash variable,
or applying `shm`, each with its expected throughput.

Every step is a configuration the replay measures, a strategy on a transport: the
release as it is (per-rank, or 17a57fd's broadcast on 0.5.4.post2 .. 0.5.5.post2,
on the release's transport), SGLANG_MM_PRECOMPUTE_HASH=1 (`precompute`, where the
release ships it), `mmdiag apply shm` (where the recv broadcast still pickles
features), and upgrading to a shared-memory release, alone or with the variable.
Which release does what is data (mmdiag/sglang/variants.toml [defaults] and the
families). A configuration no Run measured is predicted from its measurement on the
other transport and the cost model's per-MB transport costs, and says so.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..mmpath.hashing import PATCHABLE as PATCHABLE_HASHES
from ..mmpath.hashing import prefix_cache
from ..sglang.facts import (Launch, at_least, default_transport, effective_transport, first_shm_release, rust_hashes,
                            since)
from ..vocab import DEFAULT_HASH
from ..run import Run
from .costmodel import CostModel, _transport_of
from .merge import TRACE_KEYS
from ..vocab import STRATEGY_PRECOMPUTE as PRECOMPUTE, STRATEGY_REVERT as REVERT, STRATEGY_SHM as SHM
from ..vocab import TRANSPORT_PICKLE, TRANSPORT_SHM


@dataclass
class Step:
    step: str                   # what the user does
    how: str                    # the command or setting
    strategy: str               # what the replay measures for it, on `transport`
    transport: str
    expected_rps: float | None = None
    source: str = "not measured"
    vs_current: float | None = None
    skip_hash: bool = False     # measured with SGLANG_MM_SKIP_COMPUTE_HASH=1 (replay --skip-hash)
    hash: str = DEFAULT_HASH    # the content hash (`mmdiag apply xxh3`; replay --hash)

    @property
    def prefix_cache(self) -> str:
        return prefix_cache(self.hash, self.skip_hash)


def current_path(version: str) -> str:
    """The release's own multimodal path as a replay strategy (its defaults)."""
    if at_least(version, since("broadcast_always_family")) and not at_least(version, since("broadcast_flag_family")):
        return "commit"
    return "revert"  # per-rank before 17a57fd; the broadcast flag is off by default after it


def plan(version: str, launch: Launch | None = None) -> list[Step]:
    """The steps open on `version` as the server is launched (`launch`: one node by default; a
    shared-memory release pickles the features under some launches: facts.effective_transport).
    Those with SGLANG_MM_SKIP_COMPUTE_HASH (no hashing at all: a random hash drawn once, so
    repeated images share no prefix-cache entry) only where the hash is drawn once (never
    alone: every rank would draw its own) and the release reads it."""
    launch = launch or Launch()
    tr = effective_transport(version, default_transport(version), launch)[0]
    env, skip = "SGLANG_MM_PRECOMPUTE_HASH=1", "SGLANG_MM_SKIP_COMPUTE_HASH=1"
    cmd = f"{env} python -m sglang.launch_server ..."
    reads_skip = at_least(version, since("skip_hash_family"))
    if rust_hashes(version, launch):  # the Rust front end hashes before the scheduler, as precompute does
        return [Step("as it is", f"SGLang {version} with SGLANG_RUST_SERVER=1 (items arrive hashed)", PRECOMPUTE, tr)]
    steps = [Step("as it is", f"SGLang {version}", current_path(version), tr)]
    if at_least(version, since("hash_env_family")):
        steps.append(Step(f"set {env}", cmd, PRECOMPUTE, tr))
        if reads_skip:
            steps.append(Step(f"set {env} and {skip}", f"{env} {skip} python -m sglang.launch_server ...",
                              PRECOMPUTE, tr, skip_hash=True))
    # mmdiag's `shm` patch writes code only where the release has no shared-memory transport,
    # and its segments only on one node
    if default_transport(version) == TRANSPORT_PICKLE and launch.nnodes == 1:
        steps += [Step("apply shm", "mmdiag apply shm", SHM, TRANSPORT_SHM)]
        if reads_skip:
            steps.append(Step(f"apply shm and set {skip}", f"mmdiag apply shm, then {skip}", SHM, TRANSPORT_SHM,
                              skip_hash=True))
    up = first_shm_release(launch)
    if tr == TRANSPORT_PICKLE and up is not None:
        steps += [Step(f"upgrade to {up}+", f"pip install 'sglang>={up}'", REVERT, TRANSPORT_SHM),
                  Step(f"upgrade to {up}+ and set {env}", f"pip install 'sglang>={up}', then {env}", SHM, TRANSPORT_SHM),
                  Step(f"upgrade to {up}+ and set {env} and {skip}", f"pip install 'sglang>={up}', then {env} {skip}",
                       SHM, TRANSPORT_SHM, skip_hash=True)]
    # each configuration that hashes, with a faster content hash patched in (shown once measured)
    steps += [Step(f"{st.step}, apply {h}", f"{st.how}; mmdiag apply {h}", st.strategy, st.transport, hash=h)
              for h in PATCHABLE_HASHES for st in list(steps) if not st.skip_hash]
    return steps


# On the shm transport, `precompute` and `shm` are the same configuration.
_SAME = {(PRECOMPUTE, TRANSPORT_SHM): (SHM, TRANSPORT_SHM), (SHM, TRANSPORT_SHM): (PRECOMPUTE, TRANSPORT_SHM)}


def _lookup(table: dict, strategy: str, transport: str, skip_hash: bool, hash_: str = DEFAULT_HASH) -> float | None:
    same = _SAME.get((strategy, transport))
    return (table.get((strategy, transport, skip_hash, hash_))
            or (table.get((*same, skip_hash, hash_)) if same else None))


def _measured(runs: list[Run], target: Run) -> dict[tuple[str, str, bool, str], float]:
    """(strategy, transport, skip_hash, hash) -> mean of the Runs' median throughputs, same trace and rank count."""
    got: dict[tuple[str, str, bool], list[float]] = {}
    for run in runs:
        if not run.is_replay or run.tp != target.tp or any(run.trace.get(k) != target.trace.get(k) for k in TRACE_KEYS):
            continue
        for name, s in run.strategies.items():
            tr = _transport_of(run, name)
            if s.throughput_rps and tr:
                key = (name, tr, bool(run.config.skip_hash), run.config.setting("hash"))
                got.setdefault(key, []).append(s.throughput_rps)
    return {k: sum(v) / len(v) for k, v in got.items()}


def _predict(step: Step, table: dict, model: CostModel | None, target: Run) -> tuple[float, str] | None:
    """From the same strategy on the other transport and the per-MB transport saving."""
    tc = model.transport if model else None
    saving = tc.shm_saving_ms_per_mb if tc else None
    other = TRANSPORT_PICKLE if step.transport == TRANSPORT_SHM else TRANSPORT_SHM
    rps = _lookup(table, step.strategy, other, step.skip_hash, step.hash)
    if rps is None or saving is None or not model.workload_mb:
        return None
    mm_share = (target.trace.get("mm_requests") or 0) / max(target.trace.get("requests") or 1, 1)
    delta = saving * model.workload_mb * mm_share * (1 if step.transport == TRANSPORT_SHM else -1)
    loop_ms = max(1000.0 / rps - delta, 1e-3)
    per_mb = ("shm's per-MB saving on the receive path below resolution, taken as 0" if tc.saving_below_resolution
              else f"shm saves {saving:.2f} ms per MB on the receive path")
    return 1000.0 / loop_ms, (f"model: {rps:.1f} req/s measured on {other}, {per_mb} "
                              f"({tc.source[TRANSPORT_PICKLE]} pickle, {tc.source[TRANSPORT_SHM]} shm)")


def advise(version: str, runs: list[Run], target: Run, model: CostModel | None,
           launch: Launch | None = None) -> list[Step]:
    table = _measured(runs, target)
    steps = plan(version, launch)
    for st in steps:
        rps = _lookup(table, st.strategy, st.transport, st.skip_hash, st.hash)
        if rps is not None:
            st.expected_rps, st.source = rps, "measured"
        elif (p := _predict(st, table, model, target)) is not None:
            st.expected_rps, st.source = p
    # a skip-hash or xxh3 step nobody replayed (replay --skip-hash, --hash) is not shown: an option, not a default
    steps = [st for st in steps if (not st.skip_hash and st.hash == DEFAULT_HASH) or st.expected_rps is not None]
    cur = steps[0].expected_rps
    for st in steps:
        st.vs_current = st.expected_rps / cur if cur and st.expected_rps else None
    return steps


def best(steps: list[Step]) -> Step | None:
    """The step that pays most over the release as it is (None: none known to)."""
    cands = [s for s in steps[1:] if s.vs_current is not None and s.vs_current > 1.0]
    return max(cands, key=lambda s: s.expected_rps) if cands else None
