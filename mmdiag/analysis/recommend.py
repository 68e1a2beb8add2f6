"""Which patch, and why: `recommend(runs) -> Recommendation`.

From replay Runs: the measured throughput of every patchable strategy (median
repeat; precompute capped by the single tokenizer process it hashes in), judged
against each other with the repeats (Welch t-test, mmdiag.analysis.compare), the
per-rank CPU, and the cost model (mmdiag.analysis.costmodel) that places the
workload against the feature size where broadcasting starts to pay. Ties inside
the noise are broken by the cost model's side of the crossover, then CPU, and are
reported as low confidence with what to measure next.

One engine: the phase-share diagnosis (`diagnose`: shares of wall time, the same from
either collector) runs on the replay baseline's ranks or a live profile's; where replays
measured throughput, the measurement decides and the diagnosis is supporting evidence;
from live profiles alone (no throughput) the diagnosis is the answer, at low confidence.

The rules and thresholds are data: profiles/recommend.toml.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import MmdiagError, ProfileError
from ..run import Run, StrategyResult
from .. import units
from ..mmpath.hashing import PATCHABLE as PATCHABLE_HASHES
from ..mmpath.hashing import prefix_cache_of
from ..sglang.facts import at_least, since
from ..sglang.patches import PATCHES
from ..strategies import BASELINE
from ..strategies import PATCHABLE as PATCHABLE_STRATEGIES
from ..strategies import REGISTRY as STRATEGY_REGISTRY
from ..vocab import STRATEGIES, TRANSPORT_SHM
from . import breakdown as B
from .breakdown import json_safe
from .compare import NOT_JUDGED, Comparison, compare_samples, relative_noise
from ..tables import PROFILES_DIR, load_table
from ..strategies import cond_threshold as threshold
from .costmodel import CostModel, _transport_of, fit
from .merge import label, merge_replays
from . import release_steps as RS
from .release_steps import Step

RULES_FILE = PROFILES_DIR / "recommend.toml"
NONE = "none"
# Confidence when the best patch is not shown to beat the baseline: no recommendation.
INSUFFICIENT = "insufficient evidence"


def load_rules(path: str | os.PathLike | None = None) -> dict[str, Any]:
    p = Path(path) if path else RULES_FILE
    rules = load_table(p)
    for sect in ("thresholds", "candidates", "not_a_fix", "live"):
        if sect not in rules:
            raise ProfileError(f"missing section [{sect}]", where=str(p))
    for name in rules["candidates"].get("order", []):
        if name not in PATCHABLE_STRATEGIES:
            raise ProfileError(f"candidates.order names {name!r}, which no patch ships", where=str(p),
                               fix=f"patchable: {', '.join(PATCHABLE_STRATEGIES)}")
    return rules


@dataclass
class Option:
    """One strategy as the recommendation sees it."""
    name: str
    throughput_rps: float | None
    expected_rps: float | None        # measured, capped where a cap applies
    vs_baseline: float | None         # expected_rps / the baseline's (commit's) throughput
    max_cpu_pct: float | None
    p99_ms: float | None
    noise_pct: float | None
    repeats: int
    patchable: bool
    verdict: str = ""                 # against the recommended one
    note: str = ""
    prefix_cache: str | None = None   # content hash kept (which), or random (mmdiag.mmpath.hashing)


@dataclass
class Recommendation:
    recommended: str | None           # a patchable strategy, "none", or None when the data cannot decide
    confidence: str                   # high | medium | low | insufficient evidence | undecided
    source: str                       # replay | profile
    target: str                       # what workload / Run it is for
    reasons: list[str] = field(default_factory=list)
    runners_up: list[Option] = field(default_factory=list)
    chosen: Option | None = None
    measure_next: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mm_share_pct: float | None = None
    baseline: str | None = None
    cost_model: CostModel | None = None
    leading: str | None = None        # insufficient evidence: the patch that leads, not yet shown to help
    tied: list[str] = field(default_factory=list)   # patches the data cannot tell from the pick / lead
    runs_used: list[str] = field(default_factory=list)
    runs_left_out: list[dict[str, str]] = field(default_factory=list)
    command: str | None = None        # how to apply the recommended patch
    release: str | None = None        # the SGLang release the steps below are for
    release_steps: list[Step] = field(default_factory=list)  # mmdiag.analysis.release_steps
    remedy: str | None = None         # the tokenizer stage bounds throughput: its remedy, not a scheduler patch

    def to_dict(self) -> dict[str, Any]:
        d = {
            "recommended": self.recommended, "command": self.command, "confidence": self.confidence,
            "source": self.source,
            "target": self.target, "baseline": self.baseline, "leading": self.leading, "tied": self.tied,
            "runs": {"used": self.runs_used, "left_out": self.runs_left_out},
            "mm_share_pct": _num(self.mm_share_pct),
            "reasons": self.reasons,
            "chosen": json_safe(asdict(self.chosen)) if self.chosen else None,
            "runners_up": [json_safe(asdict(o)) for o in self.runners_up],
            "measure_next": self.measure_next, "notes": self.notes,
            "cost_model": json_safe(self.cost_model.to_dict()) if self.cost_model else None,
            "release": self.release, "release_steps": [json_safe({**asdict(x), "prefix_cache": x.prefix_cache})
                                                        for x in self.release_steps],
            "remedy": self.remedy,
        }
        return d


def _num(x):
    return None if x is None or (isinstance(x, float) and (math.isnan(x))) else x


def _describe_target(run: Run) -> str:
    t = run.trace
    if run.is_profile:
        return f"live profile at tp {run.tp}" + (f" ({run.host.get('hostname')})" if run.host.get("hostname") else "")
    prof = (t.get("source") or {}).get("profile") if isinstance(t.get("source"), dict) else None
    size = units.fmt_mb(t.get("mean_mm_request_bytes") or 0)
    return (f"replay of {t.get('requests')} requests{f' ({prof})' if prof else ''}, "
            f"{t.get('mm_requests')} multimodal at {size} each, tp {run.tp}")


def _expected(name: str, s: StrategyResult, rules: dict[str, Any]) -> tuple[float, str]:
    rps = s.throughput_rps
    if name == "precompute" and rules["candidates"].get("cap_precompute_by_tokenizer", True):
        cap = (s.tokenizer_ms or {}).get("capacity_rps")
        if cap is not None and not math.isinf(cap) and cap < rps:
            return cap, (f"capped at {cap:.1f} req/s: one tokenizer process hashes every feature "
                         f"({s.tokenizer_ms.get('per_mm_request', 0):.1f} ms per multimodal request)")
    return rps, ""


def _samples(s: StrategyResult, expected: float) -> list[float]:
    xs = list(s.repeats_rps) or [s.throughput_rps]
    if expected < s.throughput_rps:  # a cap applies: scale the repeats down with it
        f = expected / s.throughput_rps if s.throughput_rps else 1.0
        xs = [x * f for x in xs]
    return xs


def recommend(runs: list[Run], rules: dict[str, Any] | None = None, release: str | None = None,
              launch: Any = None) -> Recommendation:
    """Recommend from the replay Runs of one workload (every Run of the first one's trace, rank
    count, host and settings is merged; the rest say why they were left out, and feed only the
    cost model); with only live profiles, from the first profile's phase shares. For `release`
    (default: the trace's SGLang version) it also says which release step pays, as the server is
    launched (`launch`, mmdiag.sglang.facts.Launch: one node by default)."""
    if not runs:
        raise MmdiagError("no Runs to recommend from")
    rules = rules or load_rules()
    merged = merge_replays(runs)
    if merged.run is not None:
        others = [r for i, r in enumerate(runs) if r.is_replay and label(r, i) not in merged.used]
        rec = _from_replay(merged.run, [merged.run, *others], rules)
        rec.runs_used = merged.used
        rec.runs_left_out = [{"run": n, "why": w} for n, w in merged.left_out]
        rec.notes += merged.notes()
        for prof in (r for r in runs if r.is_profile and r.ranks):
            dx = diagnose(prof.ranks, rules)
            rec.notes.append(f"the live profile points to {dx.points_to!r}: " + "; ".join(dx.reasons[:2]))
        _release_steps(rec, release or (merged.run.trace.get("source") or {}).get("sglang_version"), runs, merged.run,
                       launch)
        bound = next((r for r in runs if tokenizer_bound(r)), None)
        if bound is not None:
            _tokenizer_remedy(rec, bound, rules, release)
        return rec
    rec = _from_profile(runs[0], rules)
    if tokenizer_bound(runs[0]):
        _tokenizer_remedy(rec, runs[0], rules, release)
    return rec


def tokenizer_bound(run: Run) -> bool:
    """A live profile whose stage verdict says the tokenizer stage bounds throughput."""
    b = run.bottleneck if run.is_profile else None
    return bool(b) and b.get("stage") == "tokenizer"


def _tokenizer_remedy(rec: Recommendation, run: Run, rules: dict[str, Any], release: str | None = None) -> None:
    """The tokenizer bounds throughput: a scheduler-side patch speeds up a stage that is not the
    bound, so it is never the fix; the remedy for the tokenizer's dominant phase is."""
    b = run.bottleneck
    st = next((s for s in run.stages if s.role == "tokenizer"), None)
    shares = {k: v for k, v in (st.phases_pct if st else {}).items() if k != "idle"}
    phase = max(shares, key=shares.get) if shares else "other"
    remedy = (rules.get("tokenizer_bound") or {}).get(phase) or {}
    scheduler_pick = rec.recommended if rec.recommended not in (None, NONE) else None
    patch = remedy.get("patch") or ""
    if release and remedy.get("before_shm_family") and not at_least(release, since("shm_family")):
        patch = remedy["before_shm_family"]
    # a strategy, a content hash or the segments (`mmdiag apply xxh3` / `pool` stack on a strategy)
    rec.recommended = patch if patch in PATCHES else NONE
    rec.command = f"mmdiag apply {patch}" if rec.recommended == patch and patch else None
    rec.chosen, rec.leading, rec.tied = None, None, []
    rec.remedy = remedy.get("remedy") or f"a tokenizer-side remedy for its {phase}"
    why = f"the tokenizer stage bounds throughput: {b.get('text')}"
    rec.reasons = [why, f"its bounding server ({b.get('server')}) spends most of its busy time in {phase} "
                        f"({shares.get(phase, 0.0):.0f}%): {remedy.get('remedy') or 'a tokenizer-side remedy'}"]
    if scheduler_pick:
        rec.notes.append(f"{scheduler_pick!r} (a scheduler-side patch) is not recommended: it would speed up the "
                         "scheduler loop, which does not bound this server")


def _release_steps(rec: Recommendation, version: str | None, runs: list[Run], target: Run, launch: Any = None) -> None:
    """Which step pays on the release: upgrading, the hash variable, or `shm` (with figures)."""
    if not version:
        rec.notes.append("name the SGLang release (--release X) to see whether upgrading, setting "
                         "SGLANG_MM_PRECOMPUTE_HASH=1 or applying shm pays on it")
        return
    rec.release, rec.release_steps = version, RS.advise(version, runs, target, rec.cost_model, launch)
    top = RS.best(rec.release_steps)
    if top is not None:
        rec.reasons.append(f"on SGLang {version} the step that pays most is `{top.step}` ({top.how}): "
                           f"{top.expected_rps:.1f} req/s expected, {top.vs_current:.2f}x the release as it is "
                           f"({top.source}); prefix cache: {top.prefix_cache}"
                           + ("; it skips hashing, so repeated images no longer share "
                              "prefix-cache entries: keep it off where they repeat" if top.skip_hash else ""))
    for st in rec.release_steps:
        if st.expected_rps is None:
            rec.measure_next.append(f"for `{st.step}` on SGLang {version}: replay --strategy {st.strategy} "
                                    f"--transport {st.transport}")
    # the skip-hash steps show only when measured: say how to measure them
    unmeasured = {st.transport for st in RS.plan(version, launch) if st.skip_hash} - {
        st.transport for st in rec.release_steps if st.skip_hash}
    for tr in sorted(unmeasured):
        rec.measure_next.append(f"for SGLANG_MM_SKIP_COMPUTE_HASH=1 on SGLang {version} (no hashing; repeated images "
                                f"then share no prefix-cache entry): replay --strategy precompute --strategy shm "
                                f"--transport {tr} --skip-hash")
    for h in PATCHABLE_HASHES:  # a faster content hash keeps the prefix cache: say how to measure it
        if not any(st.hash == h for st in rec.release_steps):
            rec.measure_next.append(f"for `mmdiag apply {h}` on SGLang {version} (content hash kept, repeated images "
                                    f"still share prefix-cache entries): replay --strategy precompute --strategy shm "
                                    f"--hash {h}")


# --- replay --------------------------------------------------------------------

def _options(run: Run, base_rps: float | None, rules: dict[str, Any]) -> tuple[dict[str, Option], dict[str, list[float]]]:
    options: dict[str, Option] = {}
    samples: dict[str, list[float]] = {}
    for name, s in run.strategies.items():
        exp, note = _expected(name, s, rules)
        samples[name] = _samples(s, exp)
        noise = relative_noise(samples[name])
        options[name] = Option(
            name=name, throughput_rps=s.throughput_rps, expected_rps=exp,
            vs_baseline=exp / base_rps if base_rps else None,
            max_cpu_pct=B.max_or_nan(B.cpu_pct(r) for r in s.ranks), p99_ms=s.latency_ms.get("p99"),
            noise_pct=100 * noise if noise is not None else None, repeats=len(s.repeats_rps) or 1,
            patchable=name in PATCHABLE_STRATEGIES and not _resends_on_shm(run, name),
            prefix_cache=prefix_cache_of(run.config),
            note=note or rules["not_a_fix"].get(name, "") or (_RESEND_NOTE if _resends_on_shm(run, name) else ""))
    return options, samples


_RESEND_NOTE = ("replayed on the shared-memory transport: its broadcast pickles the features again from the entry "
                "rank, which that transport exists to avoid (`mmdiag apply` refuses it on such releases)")


def _resends_on_shm(run: Run, name: str) -> bool:
    """A strategy whose collective pickles the features again (Strategy.resends_features), replayed
    where they reach every rank by shared memory: never the patch to apply there."""
    return _transport_of(run, name) == TRANSPORT_SHM and STRATEGY_REGISTRY[name].resends_features


def _cost_reason(model: CostModel) -> str | None:
    if model.workload_mb is None:
        return None
    x = model.crossover_mb(1.0 / max(model.requests_per_iteration or 1.0, 1.0))
    if x is not None and math.isinf(x):
        xs = "batched broadcasting never pays (sending costs more per MB than every rank hashing)"
    elif x is not None:
        xs = f"batched broadcasting pays above {x:.2f} MB"
    elif not model.separable and model.saving_ms_per_mb is not None:
        xs = ("where batched broadcasting starts to pay is unknown (one message size per collective: the "
              "per-collective cost cannot be told from the per-MB cost; 0 MB is only a lower bound, "
              "not used to decide)")
    else:
        xs = "where batched broadcasting starts to pay is unknown"
    sending = (f"{_f(model.k_ms_per_mb)} ms/MB + {_f(model.c_ms_per_collective)} ms per collective"
               if model.separable else
               f"{_f(model.k_ms_per_mb)} ms/MB with the per-collective cost folded in (not separable)")
    return (f"cost model at tp {model.tp}: materialize {_f(model.m_all_ms_per_mb)} ms/MB with every rank at once, "
            f"{_f(model.m_one_ms_per_mb)} ms/MB on the entry rank alone; sending {sending}; "
            f"{_f(model.requests_per_iteration, 1)} requests per loop iteration; {xs}; this workload: "
            f"{model.workload_mb:.2f} MB per multimodal request")


def _choose(cands: list[str], options: dict[str, Option], samples: dict[str, list[float]], pays: bool | None,
            rules: dict[str, Any], baseline: str | None) -> tuple[str, list[str]]:
    """The best candidate, and those tied with it inside the noise (the pick among ties: one shown
    faster than the baseline, then the cost model's side of the crossover, then the lower
    busiest-rank CPU, then the rules' order)."""
    th, cand = rules["thresholds"], rules["candidates"]
    best = max(cands, key=lambda n: options[n].expected_rps or 0.0)
    tied = [best]
    for n in cands:
        if n == best:
            continue
        c = compare_samples(samples[best], samples[n], metric="throughput_rps", alpha=th["alpha"])
        within = abs(1 - c.ratio) * 100 <= th["tie_pct"]
        if (c.status == NOT_JUDGED and within) or (c.status != NOT_JUDGED and not c.significant):
            tied.append(n)
    if len(tied) == 1:
        return best, tied
    group = cand["when_broadcast_pays"] if pays else cand["when_broadcast_does_not_pay"] if pays is False \
        else cand["order"]
    order = cand["order"]

    def cpu(n: str) -> float:
        v = options[n].max_cpu_pct
        return v if v is not None and not math.isnan(v) else 1e9

    def beats_baseline(n: str) -> bool:
        return baseline is None or baseline in cands or compare_samples(
            samples[baseline], samples[n], metric="throughput_rps", alpha=th["alpha"]).better

    return min(tied, key=lambda n: (not beats_baseline(n), n not in group, cpu(n),
                                    order.index(n) if n in order else 99)), tied


def _verdicts(options: dict[str, Option], samples: dict[str, list[float]], against: str, alpha: float,
              *, keep_against: bool = False) -> list[Option]:
    """Every other option judged against `against` with the repeats, fastest first."""
    out = []
    for n, o in options.items():
        if n != against:
            o.verdict = compare_samples(samples[against], samples[n], metric="throughput_rps", alpha=alpha).verdict()
        if n != against or keep_against:
            out.append(o)
    return sorted(out, key=lambda o: -(o.expected_rps or 0))


def _from_replay(run: Run, runs: list[Run], rules: dict[str, Any]) -> Recommendation:
    th, cand = rules["thresholds"], rules["candidates"]
    model = fit(runs, target=run)
    rec = Recommendation(None, "undecided", "replay", _describe_target(run), cost_model=model)
    rec.notes += model.notes
    rec.notes.append(threshold.recommend_note(model))
    rec.baseline = baseline_name = BASELINE if BASELINE in run.strategies else next(iter(run.strategies), None)
    if baseline_name is None:
        rec.reasons.append("the Runs have no strategy with a measured throughput")
        rec.measure_next.append("replay with --strategy all")
        return rec
    if baseline_name != BASELINE:
        return _without_baseline(rec, run, rules)
    base = run.strategies[baseline_name]
    dx = diagnose(base.ranks, rules) if base.ranks else None
    share = dx.mm_share_pct if dx else math.nan
    rec.mm_share_pct = share
    if dx is not None and dx.points_to != NONE:
        rec.notes.append(f"the phase shares of `{baseline_name}` alone point to `{dx.points_to}` "
                         f"({dx.reasons[0]}); the measured throughput decides")
    options, samples = _options(run, base.throughput_rps or None, rules)
    if (reason := _cost_reason(model)) is not None:
        rec.reasons.append(reason)
    share_words = f"the multimodal path is {share:.1f}% of the busiest rank's scheduler time in `{baseline_name}`"
    if not math.isnan(share) and share < th["min_mm_share_pct"]:
        rec.recommended, rec.confidence = NONE, "high" if base.repeats_rps and len(base.repeats_rps) > 1 else "medium"
        rec.reasons.insert(0, f"{share_words} (under {th['min_mm_share_pct']}%): no patch is worth it")
        rec.runners_up = sorted(options.values(), key=lambda o: -(o.expected_rps or 0))
        return rec
    cands = [n for n in cand["order"] if n in options and options[n].patchable]
    if not cands:
        rec.reasons.append(f"none of the patchable strategies ({', '.join(PATCHABLE_STRATEGIES)}) was replayed")
        rec.measure_next.append("replay with --strategy all (or at least revert, batch and precompute)")
        rec.runners_up = list(options.values())
        return rec
    pays = model.broadcast_pays()
    pick, tied = _choose(cands, options, samples, pays, rules, baseline_name)
    rec.tied = [n for n in tied if n != pick]
    # The pick against the baseline (the current path): a patch that is slower, or not
    # measurably faster, is no answer; only the size of the gap says which words to use.
    base_cmp = None
    if baseline_name not in cands:
        base_cmp = compare_samples(samples[baseline_name], samples[pick], metric="throughput_rps", alpha=th["alpha"])
    if base_cmp is not None and (_against_baseline(rec, base_cmp, pick, baseline_name, options, cands, pays, rules)
                                 or _insufficient(rec, base_cmp, pick, baseline_name, options)):
        rec.runners_up = _verdicts(options, samples, baseline_name, th["alpha"], keep_against=True)
        rec.reasons.insert(1, share_words)
        return rec
    rec.recommended, rec.chosen = pick, options[pick]
    rec.command = _apply_command(pick, run, rec)
    rec.runners_up = _verdicts(options, samples, pick, th["alpha"])
    _chosen_reasons(rec, options[pick], baseline_name, share_words, pays, options, cands, rules)
    _confidence(rec, options, cands, tied, pays, th)
    if not model.separable:
        rec.measure_next.append("to place the crossover precisely, replay commit and batch (or a second workload "
                                "with a different feature size) so the per-collective cost can be fitted")
    if options[pick].max_cpu_pct is not None and not math.isnan(options[pick].max_cpu_pct) and run.trace.get(
            "arrival", {}).get("mode") == "closed":
        rec.notes.append("closed-loop replay: every strategy runs the ranks flat out, so CPU per rank compares "
                         "efficiency; replay Poisson arrivals (trace synth --request-rate) to check the 60% target")
    return rec


def _replay_command(run: Run, strategies: list[str], output: str) -> str:
    """The `mmdiag replay` that measures `strategies` as `run` was measured (its trace, rank count
    and every setting merge_replays compares), so its Run pools with this one."""
    from ..replay.options import ReplayOptions, option_flag
    from .merge import SETTINGS
    flags = {f.name: option_flag(f) for f in fields(ReplayOptions) if f.metadata["cli"]}
    cmd = [f"mmdiag replay {run.trace.get('path') or 'TRACE'} --tp {run.tp}"]
    cmd += [f"--strategy {n}" for n in strategies]
    for k in SETTINGS:
        v, default = run.config.setting(k), getattr(ReplayOptions, k, None)
        if k not in flags or v is None or v == default or (k == "impl" and v == "mmdiag"):
            continue
        cmd.append(flags[k] if v is True else f"{flags[k]} {v:g}" if isinstance(v, float) else f"{flags[k]} {v}")
    if run.config.sglang is not None and getattr(run.config.sglang, "path", None):
        cmd.append(f"--sglang {run.config.sglang.path}")
    return " ".join(cmd + ["--repeat 2", f"-o {output}"])


def _without_baseline(rec: Recommendation, run: Run, rules: dict[str, Any]) -> Recommendation:
    """No `commit` in the Runs: no patch is shown faster than the current path, so none is named;
    the answer is what to replay (a Run of the same trace and settings merges with these)."""
    options, _ = _options(run, None, rules)
    rec.baseline = BASELINE
    rec.recommended, rec.confidence, rec.chosen = None, INSUFFICIENT, None
    rec.runners_up = sorted(options.values(), key=lambda o: -(o.expected_rps or 0))
    cands = [n for n in rules["candidates"]["order"] if n in options]
    if cands:
        rec.leading = max(cands, key=lambda n: options[n].expected_rps or 0.0)
        lead = options[rec.leading]
        rec.reasons.insert(0, f"insufficient evidence: `{rec.leading}` leads at {_f(lead.expected_rps)} req/s, but "
                              f"`{BASELINE}` (the current path) was not replayed, so no patch is shown faster than "
                              "it: keep the current path until it is")
    else:
        rec.reasons.insert(0, f"insufficient evidence: neither `{BASELINE}` (the current path) nor a patch was "
                              "replayed: keep the current path")
    missing = [] if cands else [n for n in rules["candidates"]["order"]]
    rec.measure_next.insert(0, f"replay the baseline: {_replay_command(run, [BASELINE, *missing], 'commit.json')}, "
                               f"then mmdiag recommend {run.path or 'RUN.json'} commit.json (Runs of one trace and "
                               "settings merge)")
    return rec


def _apply_command(pick: str, run: Run, rec: Recommendation) -> str:
    """`mmdiag apply PICK`; cond with the threshold it was replayed with (what was measured to win)."""
    cfg = run.described(pick).get("threshold") if pick == "cond" else None
    if not isinstance(cfg, dict):
        return f"mmdiag apply {pick}"
    th = threshold.Threshold.from_dict(cfg)
    rec.reasons.append(f"`cond` was replayed with its threshold from {th.source}: {th.text}")
    return threshold.apply_command(th)


def _chosen_reasons(rec: Recommendation, ch: Option, baseline: str, share_words: str, pays: bool | None,
                    options: dict[str, Option], cands: list[str], rules: dict[str, Any]) -> None:
    vs = f" ({ch.vs_baseline:.2f}x `{baseline}`)" if ch.vs_baseline and baseline != ch.name else ""
    cpu_txt = (f", busiest rank's scheduler CPU {ch.max_cpu_pct:.0f}%"
               if ch.max_cpu_pct is not None and not math.isnan(ch.max_cpu_pct) else "")
    rec.reasons.insert(0, f"`{ch.name}` is expected at {ch.expected_rps:.2f} req/s{vs}{cpu_txt}, p99 {_f(ch.p99_ms, 0)} ms"
                          + (f"; {ch.note}" if ch.note and ch.name not in rules["not_a_fix"] else ""))
    rec.reasons.insert(1, share_words)
    if pays is None:
        return
    rec.reasons.append(f"the workload is {'above' if pays else 'below'} the crossover: broadcasting "
                       f"{'pays' if pays else 'does not pay'} here")
    if pays and "batch" in cands and "revert" in options and \
            (options["revert"].expected_rps or 0) > (options["batch"].expected_rps or 0):
        rec.notes.append("the cost model and the measured throughput disagree (model: broadcasting pays; "
                         "measured: revert faster): trust the measurement, and replay again to be sure")


def _confidence(rec: Recommendation, options: dict[str, Option], cands: list[str], tied: list[str],
                pays: bool | None, th: dict[str, Any]) -> None:
    """Of a pick the data shows beats the baseline: how sure the choice among the patches is."""
    pick = rec.recommended
    noise = [o.noise_pct for o in options.values() if o.noise_pct is not None]
    max_noise = max(noise) if noise else None
    if len(tied) > 1:
        rec.confidence = "low"
        others = ", ".join(f"`{n}`" for n in tied if n != pick)
        why = ("the cost model's side of the crossover, then the lower busiest-rank CPU" if pays is not None
               else "the lower busiest-rank CPU")
        rec.reasons.append(f"the data cannot decide between `{pick}` and {others}: their throughput differs "
                           f"inside the noise; `{pick}` is chosen by {why}")
        rec.measure_next.append(f"replay again with --repeat 5 or more (and more requests, -n) to separate "
                                f"{', '.join(tied)}" + (f"; repeat noise now up to {max_noise:.0f}%" if max_noise else ""))
    elif any(options[n].repeats < 2 for n in cands):
        rec.confidence = "low"
        rec.reasons.append("one repeat of some patches: the noise is unknown, so they are not judged against the pick")
        rec.measure_next.append("replay with --repeat 3 or more to judge the differences")
    elif max_noise is not None and max_noise > th["max_noise_pct"]:
        rec.confidence = "medium"
        rec.measure_next.append(f"repeat noise up to {max_noise:.0f}% (over {th['max_noise_pct']}%): "
                                "replay on a quieter machine or with more requests")
    else:
        rec.confidence = "high"


def _insufficient(rec: Recommendation, c: Comparison, pick: str, baseline: str, options: dict[str, Option]) -> bool:
    """The best patch is not measurably faster than the baseline (one repeat, or inside the noise):
    no recommendation, and the words say so consistently."""
    if c.better:
        return False
    rec.recommended, rec.confidence, rec.chosen, rec.leading = None, INSUFFICIENT, None, pick
    o = options[pick]
    vs = f" ({o.vs_baseline:.2f}x `{baseline}`)" if o.vs_baseline else ""
    rec.reasons.insert(0, f"insufficient evidence: `{pick}` leads at {_f(o.expected_rps)} req/s{vs}, but the data "
                          f"does not show it is faster than `{baseline}` ({c.verdict()}): keep the current path until "
                          "a replay with more repeats shows it")
    rec.measure_next.append(f"replay again with --repeat 3 or more (and more requests, -n) to separate `{pick}` "
                            f"from `{baseline}`; Runs of the same trace are merged, so a second Run adds repeats")
    return True


def _against_baseline(rec: Recommendation, c: Comparison, pick: str, baseline: str, options: dict[str, Option],
                      cands: list[str], pays: bool | None, rules: dict[str, Any]) -> bool:
    """Undecided (True, with reasons and what to replay next) when the best patch measured is
    slower than the baseline, or within its noise while the cost model says a broadcasting
    fix that was not replayed would pay. `c` is the pick against the baseline."""
    cand = rules["candidates"]
    tie = rules["thresholds"]["tie_pct"]
    slower = c.worse or (c.status == NOT_JUDGED and c.ratio < 1 - tie / 100)
    pays_group = [n for n in cand["when_broadcast_pays"] if n in PATCHABLE_STRATEGIES]
    missing = [n for n in cand["order"] if n not in options]
    missing.sort(key=lambda n: (n not in pays_group) if pays else 0)
    unproven = (not c.better and not slower and pays is True and pick not in pays_group
                and any(n not in cands for n in pays_group))
    if not (slower or unproven):
        return False
    rec.recommended, rec.confidence, rec.chosen = None, "undecided", None
    if slower:
        rec.reasons.insert(0, f"the best patch measured, `{pick}`, is slower than `{baseline}` (the current path): "
                              f"{c.verdict()}; applying it would make things worse: keep the current path")
    else:
        rec.reasons.insert(0, f"the best patch measured, `{pick}`, is not measurably faster than `{baseline}` "
                              f"({c.verdict()}), and the cost model says broadcasting pays here, so the patch "
                              f"that keeps it ({', '.join(f'`{n}`' for n in pays_group)}) is the likely answer "
                              "but was not replayed: keep the current path until it is")
    if missing:
        rec.measure_next.append(f"replay {', '.join(missing)} as well (mmdiag replay "
                                + " ".join(f"--strategy {n}" for n in [baseline, *cands, *missing])
                                + ") and recommend again")
    else:
        rec.measure_next.append(f"every patch was replayed and none beats `{baseline}` on this workload: replay "
                                "again with --repeat 5 or more, or on the production workload, before patching")
    return True


def _f(x: float | None, nd: int = 2) -> str:
    return "?" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


# --- live profile ----------------------------------------------------------------

@dataclass
class Diagnosis:
    """What the phase shares of a rank set say, whoever measured them (shares of wall time)."""
    points_to: str                    # "none" or a patch
    reasons: list[str]
    mm_share_pct: float


def diagnose(ranks: list, rules: dict[str, Any]) -> Diagnosis:
    """The phase-share rules (profiles/recommend.toml [live]) on a rank set: the multimodal path
    under the threshold needs no patch; non-entry ranks waiting in the broadcast longer than
    the entry rank materializes: broadcasting does not pay (revert); waiting but less: batch;
    no broadcast waited on: hashing dominates (precompute)."""
    th, lv = rules["thresholds"], rules["live"]
    entry = min(ranks, key=lambda r: r.rank)
    others = [r for r in ranks if r is not entry]
    share = B.max_or_nan(B.mm_share(r) for r in ranks)
    if math.isnan(share) or share < th["min_mm_share_pct"]:
        return Diagnosis(NONE, [f"the multimodal path is {_f(share, 1)}% of the busiest rank's busy time "
                                f"(under {th['min_mm_share_pct']}%): no patch is worth it"], share)
    wait = (sum(B.share_of_busy(r, ("broadcast", "unpickle")) for r in others) / len(others)) if others else 0.0
    entry_mat = B.share_of_busy(entry, ("from_dict",))
    others_mat = (sum(B.share_of_busy(r, ("from_dict",)) for r in others) / len(others)) if others else entry_mat
    numbers = (f"non-entry ranks wait {wait:.1f}% of their busy time in broadcast+unpickle; the entry rank "
               f"materializes {entry_mat:.1f}%, the others {others_mat:.1f}%; mm path {share:.1f}% on the busiest rank")
    if wait >= lv["broadcast_wait_pct"] and wait >= entry_mat:
        return Diagnosis("revert", ["the ranks wait in the broadcast longer than materializing on each rank would "
                                    "take: broadcasting does not pay for this traffic", numbers], share)
    if wait >= lv["broadcast_wait_pct"]:
        return Diagnosis("batch", ["broadcasting saves the other ranks more than they wait for it: keep it, "
                                   "but one collective per loop iteration instead of per request", numbers], share)
    return Diagnosis("precompute", ["materialization (hashing) dominates on every rank and no broadcast is waited "
                                    "on: hash once, in the tokenizer, off the scheduler loop", numbers], share)


def _from_profile(run: Run, rules: dict[str, Any]) -> Recommendation:
    """Without throughput, the phase-share diagnosis is the answer, at low confidence."""
    lv = rules["live"]
    rec = Recommendation(None, "low", "profile", _describe_target(run))
    ranks = B.ranks_of(run)
    if not ranks:
        raise MmdiagError("the live profile has no ranks", where="recommend",
                          fix="profile again while the server has multimodal traffic")
    dx = diagnose(ranks, rules)
    rec.recommended, rec.reasons, rec.mm_share_pct = dx.points_to, list(dx.reasons), dx.mm_share_pct
    rec.baseline = next(iter(run.strategies), None)
    rec.measure_next.append("a replay of this traffic is needed for throughput: mmdiag trace synth (or a captured "
                            "trace), then mmdiag replay --repeat 3 and mmdiag recommend on that Run")
    waits = [(r.rank, B.gil(r, "gil_wait_pct")) for r in ranks]
    gil = [(r, v) for r, v in waits if v is not None and v > lv["gil_wait_pct"]]
    if gil:
        rec.notes.append("GIL wait over " f"{lv['gil_wait_pct']}% on rank(s) " +
                         ", ".join(f"{r} ({v:.0f}%)" for r, v in gil))
    if dx.points_to != NONE:
        rec.notes.append("from phase shares only (no throughput in a live profile): confidence is low")
    return rec


def strategy_order(names) -> list[str]:
    return sorted(names, key=lambda n: STRATEGIES.index(n) if n in STRATEGIES else 99)
