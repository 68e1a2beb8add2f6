"""Errors of the live profiler (one line each; the CLI prints them, no traceback)."""
from __future__ import annotations

from ..errors import MmdiagError


class LiveError(MmdiagError):
    """Attaching to or sampling a live process failed, or its input is unusable."""

    exit_code = 2


class PtraceError(LiveError):
    """The kernel refused ptrace (py-spy reads the target's memory)."""

    exit_code = 5


class PySpyError(LiveError):
    """py-spy is missing, failed, or wrote output this version of mmdiag cannot read."""

    exit_code = 6


class RawParseError(LiveError):
    """A py-spy raw file (`record --format raw`) does not parse."""


class TargetExitedError(LiveError):
    """A rank exited inside the window; what was sampled was kept and reported."""

    exit_code = 4
