"""The size threshold of the conditional broadcast (`cond`): where it comes from.

A request whose features exceed the threshold takes 17a57fd's path (entry rank
materializes, one broadcast), a smaller one materializes on every rank. The
threshold is, in order: an explicit option, the seed's environment variable
(SGLANG_MM_BROADCAST_THRESHOLD, bytes), the crossover the cost model measured
for this deployment (mmdiag.analysis.costmodel: B* = c / (m_all - m_one - k),
one collective per request). When broadcasting never pays (sending costs more
per MB than every rank hashing, as on the CPU transports so far) the threshold
is infinite and `cond` is `revert`; mmdiag says so rather than invent a number.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Mapping

from ..errors import MmdiagError
from ..units import MB

ENV = "SGLANG_MM_BROADCAST_THRESHOLD"
# 000_3099abf5086ce8a8.txt (方案2: 条件优化): `export SGLANG_MM_BROADCAST_THRESHOLD=100000  # 100KB`.
SEED_EXAMPLE_BYTES = 100_000
NEVER_WORDS = ("inf", "never")


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
                          fix="give bytes (100000, 100k, 2M) or 'never'")
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


def resolve(option: str | float | None = None, env: Mapping[str, str] | None = None,
            model=None) -> Threshold:
    """Option, then the environment variable, then the measured crossover; the seed's
    example value only when nothing was given or measured (and labelled as such)."""
    env = os.environ if env is None else env
    if option is not None:
        b = parse_bytes(option, "--threshold")
        return Threshold(b, "option", f"threshold {option} from the option")
    if env.get(ENV, "").strip():
        b = parse_bytes(env[ENV], ENV)
        return Threshold(b, "env", f"threshold {env[ENV].strip()} from {ENV}")
    measured = from_model(model)
    if measured.bytes is not None:
        return measured
    return Threshold(float(SEED_EXAMPLE_BYTES), "seed-example",
                     f"{SEED_EXAMPLE_BYTES} bytes, the seed's example value (000_3099abf5086ce8a8.txt): "
                     f"nothing measured or given; {measured.text}, or set {ENV}")


def recommend_note(model) -> str:
    """What `mmdiag recommend` says about the conditional broadcast for these Runs."""
    th = from_model(model)
    if th.bytes is None or th.never:
        return f"`cond` (size-conditional broadcast): {th.text}"
    return f"`cond` (size-conditional broadcast): {th.text}; to use it: {ENV}={th.bytes:.0f} mmdiag apply cond"
