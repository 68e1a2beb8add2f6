"""The live profiler: attach py-spy to running scheduler ranks, attribute samples to phases.

`profile(pid, duration, rate) -> Run` and `from_raw(files) -> Run` (schema mmdiag.profile/2).
"""
from __future__ import annotations

from .profile import DEFAULT_DURATION_S, DEFAULT_RATE_HZ, from_raw, profile

__all__ = ["profile", "from_raw", "DEFAULT_DURATION_S", "DEFAULT_RATE_HZ"]
