"""One unit for sizes everywhere mmdiag prints or stores them: decimal megabytes
(1 MB = 10^6 bytes, as the README's "18.8 MB" for a 4000x1176 float32 feature).
"""
from __future__ import annotations

import math

MB = 1_000_000


def mb(nbytes: float) -> float:
    """Bytes in MB (10^6 bytes)."""
    return nbytes / MB


def fmt_mb(nbytes: float, nd: int = 1) -> str:
    """'18.8 MB' for 18_816_000 bytes; a size too small for nd decimals keeps two
    significant digits ('0.012 MB', never '0.0 MB' for a 12 kB image)."""
    v = mb(nbytes)
    if 0 < abs(v) < 10 ** -nd:
        nd = 1 - math.floor(math.log10(abs(v)))
    return f"{v:,.{nd}f} MB"


def fmt_gb(nbytes: float, nd: int = 1) -> str:
    """'23.9 GB' (10^9 bytes): memory is said in the same decimal units as features."""
    return f"{nbytes / 1e9:,.{nd}f} GB"
