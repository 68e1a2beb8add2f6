"""Errors of `mmdiag doctor` / `mmdiag apply`: one line, what, where, what to do."""
from __future__ import annotations

from ..errors import MmdiagError


class SGLangError(MmdiagError):
    """A problem with the SGLang install mmdiag inspects or patches."""


class SGLangNotFound(SGLangError):
    """No SGLang where we looked."""


class UnknownLayout(SGLangError):
    """The install's code matches no layout mmdiag knows; nothing was changed."""


class NotApplicable(SGLangError):
    """The strategy makes no sense for this variant (e.g. `dict` on a per-rank release)."""


class ReadOnlyInstall(SGLangError):
    """A target file or the state folder cannot be written; nothing was changed."""


class ApplyLocked(SGLangError):
    """Another `mmdiag apply` holds the lock on this install."""

    exit_code = 3


class NoManifest(SGLangError):
    """`--undo` with no mmdiag patch recorded for this install."""


class ChangedSinceApply(SGLangError):
    """A patched file was edited after mmdiag patched it; undo/apply refuses."""


class AlreadyPatched(SGLangError):
    """Another mmdiag strategy is applied; undo it first."""
