"""Option types shared by the commands: every number has a range, so a bad value is a
one-line usage error (exit 2), never an OverflowError deep inside."""
from __future__ import annotations

import click

PORT = click.IntRange(1, 65535)
RANKS = click.IntRange(1, 1024)
REPEATS = click.IntRange(1, 1000)
COUNT = click.IntRange(1, 100_000_000)
CONCURRENCY = click.IntRange(1, 1_000_000)
SEED = click.IntRange(0, 2**32 - 1)
ITEMS = click.IntRange(1, 1000)
TOKENS = click.IntRange(0, 10_000_000)
RATIO = click.FloatRange(0, 1)
PID = click.IntRange(1, 2**22)
RATE_HZ = click.IntRange(1, 10_000)
SECONDS = click.FloatRange(0, 86_400, min_open=True)
MILLISECONDS = click.FloatRange(0, 3_600_000)
MEGABYTES = click.FloatRange(0, 1_000_000, min_open=True)
REQ_PER_S = click.FloatRange(0, 1_000_000, min_open=True)

# Why repeats default differently: one replay shows the table; a verdict (recommend,
# apply --verify) needs at least two repeats per strategy to estimate the noise it judges against.
REPEAT_HELP_TABLE = ("run each strategy N times; 1 is enough for the table, the report judges differences "
                     "only with 2 or more")
REPEAT_HELP_VERDICT = ("repeats per strategy; 2 by default because the verdict needs the repeats' noise "
                       "(a single replay cannot say whether a difference is significant)")

# cond's threshold: one wording for replay and apply (mmdiag.analysis.threshold says where it comes from).
THRESHOLD_HELP = ("cond's threshold: bytes (100000, 100k, 2M), never, or a Run file whose measured crossover "
                  "to use [default: SGLANG_MM_BROADCAST_THRESHOLD, else {measured}, else the seed's 100 KB example]")
