"""One unit for sizes everywhere mmdiag prints or stores them: decimal megabytes
(1 MB = 10^6 bytes, as the README's "18.8 MB" for a 4000x1176 float32 feature).
"""
from __future__ import annotations

MB = 1_000_000


def mb(nbytes: float) -> float:
    """Bytes in MB (10^6 bytes)."""
    return nbytes / MB


def fmt_mb(nbytes: float, nd: int = 1) -> str:
    """'18.8 MB' for 18_816_000 bytes."""
    return f"{mb(nbytes):,.{nd}f} MB"


def fmt_gb(nbytes: float, nd: int = 1) -> str:
    """'23.9 GB' (10^9 bytes): memory is said in the same decimal units as features."""
    return f"{nbytes / 1e9:,.{nd}f} GB"
