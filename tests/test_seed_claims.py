"""benchmarks/seed_claims.py: every seed claim is measurable, and the verdict follows the figure."""
from __future__ import annotations

import math
import sys
from pathlib import Path

from runs_synth import MB, rank, replay_run, strategy

from mmdiag.vocab import STRATEGIES

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import seed_claims as SC  # noqa: E402


def _run(rps: dict[str, float]):
    return replay_run([strategy(n, [v, v], [rank(0, collectives=10, bytes_sent=10 * MB, pickle=50.0),
                                             rank(1)]) for n, v in rps.items()], tp=2, mean_mb=1.0)


def test_every_claim_names_known_strategies_and_metrics():
    claims = SC.load_claims()["claims"]
    assert {c["seed"][:3] for c in claims} == {"000", "001", "002", "003", "004"}
    assert set(SC.needed_strategies(claims)) <= set(STRATEGIES)
    run = _run({n: 1.0 + k for k, n in enumerate(SC.needed_strategies(claims))})
    for c in claims:
        assert not math.isnan(SC.figure(run, c)), c          # computable from a Run with every strategy
        assert "min" in c or "max" in c or SC.verdict(c, 1.0, 3.0) == "(no number claimed)"


def test_verdict_follows_the_measured_ratio():
    claims = SC.load_claims()["claims"]
    four_x = next(c for c in claims if c["metric"] == "throughput_ratio" and c.get("min") == 4.0)
    assert SC.figure(_run({"revert": 10.0, "commit": 2.0}), four_x) == 5.0
    assert SC.verdict(four_x, 5.0, 3.0) == "holds" and SC.verdict(four_x, 3.9, 3.0) == "no"
    assert SC.verdict(four_x, SC.figure(_run({"revert": 1.0}), four_x), 3.0) == "not replayed"
