"""The size threshold of the conditional broadcast (`cond`): where it comes from.

A request whose features exceed the threshold takes 17a57fd's path (entry rank
materializes, one broadcast), a smaller one materializes on every rank. The
threshold is, in order: an explicit option, the seed's environment variable
(SGLANG_MM_BROADCAST_THRESHOLD, bytes), the crossover the cost model measured
for this deployment (mmdiag.analysis.costmodel: B* = c / (m_all - m_one - k),
one collective per request). The cost model is the caller's: this module sits with the
strategy, below analysis, and is handed a fitted model (or `fit`, Runs -> model, where
Run files are named by the user) instead of importing analysis. When broadcasting never pays (sending costs more
per MB than every rank hashing, as on the CPU transports so far) the threshold
is infinite and `cond` is `revert`; mmdiag says so rather than invent a number.

The option (`--threshold` of replay and apply) is a byte count, 'never', or Run files
whose measured crossover to use; `mmdiag apply cond` with neither option nor variable
takes the crossover from the Run `mmdiag recommend` kept last (its [quick] runs_dir).
"""
from __future__ import annotations

import contextlib
import contextvars
import glob
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from ..errors import MmdiagError
from ..units import MB

ENV = "SGLANG_MM_BROADCAST_THRESHOLD"
# 000_3099abf5086ce8a8.txt (方案2: 条件优化): `export SGLANG_MM_BROADCAST_THRESHOLD=100000  # 100KB`.
SEED_EXAMPLE_BYTES = 100_000
NEVER_WORDS = ("inf", "never")
# How the replay launcher hands `--threshold` (a resolved Threshold, JSON) to rank 0.
OPTION_ENV = "MMDIAG_COND_THRESHOLD"
OPTION_FORMS = "bytes (100000, 100k, 2M), 'never', or a Run file (replay -o run.json) to use its measured crossover"


@dataclass(frozen=True)
class Threshold:
    bytes: float | None   # math.inf: never broadcast; None: unknown
    source: str           # option | env | measured | seed-example
    text: str             # one sentence for the user

    @property
    def never(self) -> bool:
        return self.bytes is not None and math.isinf(self.bytes)

    def to_dict(self) -> dict:
        b = "never" if self.never else self.bytes
        return {"bytes": b, "source": self.source, "text": self.text}

    @classmethod
    def from_dict(cls, d: dict) -> "Threshold":
        b = d.get("bytes")
        return cls(math.inf if b == "never" else None if b is None else float(b), d["source"], d["text"])


def parse_bytes(value: str | float | int, where: str) -> float:
    """Bytes as an integer (100000), with a k/M/G suffix (100k, 1.5M), or inf/never."""
    s = str(value).strip().lower()
    if s in NEVER_WORDS:
        return math.inf
    mult = {"k": 1e3, "m": 1e6, "g": 1e9}.get(s[-1:], 1.0)
    try:
        x = float(s[:-1] if mult != 1.0 else s) * mult
    except ValueError:
        x = math.nan
    if math.isnan(x) or x < 0:
        raise MmdiagError(f"threshold {value!r} is not a byte count", where=where,
                          fix=f"give {OPTION_FORMS if where == '--threshold' else 'bytes (100000, 100k, 2M) or never'}")
    return x


def from_model(model) -> Threshold:
    """The measured crossover of one collective per request (a CostModel from costmodel.fit)."""
    x = model.crossover_mb(1.0) if model is not None else None
    if x is None:
        return Threshold(None, "measured", "where a per-request broadcast starts to pay is unknown "
                         "(replay revert, commit and batch so the cost model can be fitted)")
    if math.isinf(x):
        return Threshold(math.inf, "measured", f"no threshold pays at tp {model.tp}: sending costs more per MB "
                         "than every rank hashing, so `cond` never broadcasts (it is `revert`)")
    b = x * MB
    return Threshold(b, "measured", f"broadcast requests above {b:,.0f} bytes ({x:.2f} MB), "
                     f"the measured crossover at tp {model.tp}")


Fit = Callable[[list[Any]], Any]   # Runs -> CostModel (mmdiag.analysis.costmodel.fit)


def from_runs(paths: Sequence[str], fit: Fit, where: str = "--threshold") -> Threshold:
    """The crossover measured in these Runs (`fit`: recommend's cost model); an error when they do not place it."""
    from ..run import Run
    th = from_model(fit([Run.load(p) for p in paths]))
    if th.bytes is None:
        raise MmdiagError(f"the Run does not place the crossover: {th.text}", where=f"{where} {', '.join(paths)}",
                          fix="replay with --strategy all (or give the threshold in bytes)")
    return Threshold(th.bytes, "measured", f"{th.text} (measured in {', '.join(paths)})")


def from_option(value: str | float, fit: Fit | None = None) -> Threshold:
    """--threshold: bytes, 'never', or a Run file whose measured crossover to use (fitted by `fit`)."""
    text = str(value).strip()
    if isinstance(value, str) and text.lower() not in NEVER_WORDS and os.path.isfile(text):
        if fit is None:
            raise TypeError("from_option: a Run file needs the caller's cost model fit")
        return from_runs([text], fit)
    return Threshold(parse_bytes(value, "--threshold"), "option", f"threshold {text} from the option")


def kept_recommend_run(runs_dir: str, fit: Fit) -> Threshold | None:
    """The crossover in the newest Run `mmdiag recommend` kept (None: no such Run, or it places none)."""
    kept = sorted(glob.glob(os.path.join(runs_dir, "recommend-*.json")))
    if not kept:
        return None
    try:
        return from_runs(kept[-1:], fit, "the Run mmdiag recommend kept")
    except MmdiagError:
        return None


def resolve(option: str | float | Threshold | None = None, env: Mapping[str, str] | None = None,
            model=None, fallback: Threshold | None = None, fit: Fit | None = None) -> Threshold:
    """Option, then the environment variable, then the measured crossover (`model`, else
    `fallback`); the seed's example value only when nothing was given or measured (and
    labelled as such)."""
    env = os.environ if env is None else env
    if isinstance(option, Threshold):
        return option
    if option is not None:
        return from_option(option, fit)
    if env.get(OPTION_ENV):      # a replay rank: the launcher's resolved --threshold
        return Threshold.from_dict(json.loads(env[OPTION_ENV]))
    if env.get(ENV, "").strip():
        b = parse_bytes(env[ENV], ENV)
        return Threshold(b, "env", f"threshold {env[ENV].strip()} from {ENV}")
    measured = from_model(model)
    if measured.bytes is not None:
        return measured
    if fallback is not None:
        return fallback
    return Threshold(float(SEED_EXAMPLE_BYTES), "seed-example",
                     f"{SEED_EXAMPLE_BYTES} bytes, the seed's example value (000_3099abf5086ce8a8.txt): "
                     f"nothing measured or given; {measured.text}, give --threshold or set {ENV}")


_GIVEN: contextvars.ContextVar[Threshold | None] = contextvars.ContextVar("cond_threshold", default=None)


@contextlib.contextmanager
def given(th: Threshold | None):
    """The threshold `mmdiag apply cond` resolved, for the patch builder to bake in."""
    token = _GIVEN.set(th)
    try:
        yield
    finally:
        _GIVEN.reset(token)


def for_patch(runs_dir: str | None = None, option: str | None = None, fit: Fit | None = None) -> Threshold:
    """What `mmdiag apply cond` bakes in: the option, the environment, the Run recommend kept, the seed's example."""
    if _GIVEN.get() is not None and option is None:
        return _GIVEN.get()
    env = {k: v for k, v in os.environ.items() if k != OPTION_ENV}
    kept = (kept_recommend_run(runs_dir, fit) if runs_dir and fit and option is None and not env.get(ENV, "").strip()
            else None)
    return resolve(option, env=env, fallback=kept, fit=fit)


def recommend_note(model) -> str:
    """What `mmdiag recommend` says about the conditional broadcast for these Runs."""
    th = from_model(model)
    if th.bytes is None or th.never:
        return f"`cond` (size-conditional broadcast): {th.text}"
    return f"`cond` (size-conditional broadcast): {th.text}; to use it: {apply_command(th)}"


def apply_command(th: Threshold) -> str:
    return "mmdiag apply cond" + ("" if th.bytes is None else " --threshold " + ("never" if th.never else f"{th.bytes:.0f}"))
