"""User-facing errors: one line saying what was wrong, where, and what to do.

The CLI prints `mmdiag: error: <message>` and exits non-zero; it never shows a
traceback for these. Anything else escaping is a bug in mmdiag.
"""
from __future__ import annotations


class MmdiagError(Exception):
    """A problem the user can act on. `exit_code` is what the CLI returns."""

    exit_code = 2

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = [f"{self.where}: {self.what}" if self.where else self.what]
        if self.fix:
            parts.append(self.fix)
        return "; ".join(parts)


def json_error(e) -> str:
    """A json.JSONDecodeError in words: "Expecting value at column 5", "Unterminated string
    starting at column 5" (its message may already end in "at")."""
    return f"{e.msg}{'' if e.msg.endswith(' at') else ' at'} column {e.pos + 1}"


class TraceError(MmdiagError):
    """A trace file is unreadable or malformed."""


class ProfileError(MmdiagError):
    """A workload profile or criteria file is unknown or malformed."""


class ReplayError(MmdiagError):
    """A replay could not start or a rank failed."""

    exit_code = 3


class RunFileError(MmdiagError):
    """A Run JSON file is missing, truncated or of the wrong schema."""


class Terminated(ReplayError):
    """The replay was stopped by SIGTERM; exits as a shell reports a SIGTERMed command."""

    exit_code = 143
