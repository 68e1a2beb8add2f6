"""The data tables in profiles/ (workloads, model geometries, criteria, recommend rules,
bench_serving's facts): where they are and how one is read (a bad file is a one-line error)."""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from .errors import MmdiagError, ProfileError

PROFILES_DIR = Path(os.environ.get("MMDIAG_PROFILES", Path(__file__).resolve().parent.parent / "profiles"))


def load_table(path: str | os.PathLike, what: str = "file", *, error: type[MmdiagError] = ProfileError,
               invalid: str = "invalid TOML", fix: str | None = None, missing_fix: str | None = None,
               folder_fix: str | None = None) -> dict[str, Any]:
    """The one TOML reader: a file mmdiag reads (profiles/, criteria, rules, variants.toml)
    as a dict, or `error` in one line: "no such {what}" (`missing_fix`), "is a directory, not
    a {what}" (`folder_fix`), "cannot read (...)", "{invalid} (...)" (`fix`: the file's format)."""
    where = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise error(f"no such {what}", where=where, fix=missing_fix) from None
    except IsADirectoryError:
        raise error(f"is a directory, not a {what}", where=where, fix=folder_fix) from None
    except OSError as e:
        raise error(f"cannot read ({e.strerror})", where=where) from None
    try:
        text = data.decode("utf-8")  # as tomllib.load
    except UnicodeDecodeError as e:
        raise error(f"{invalid} (not UTF-8: {e.reason} at byte {e.start})", where=where, fix=fix) from None
    return parse_table(text, where, error=error, invalid=invalid, fix=fix)


def parse_table(text: str, where: str, *, error: type[MmdiagError] = ProfileError, invalid: str = "invalid TOML",
                fix: str | None = None) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise error(f"{invalid} ({e})", where=where, fix=fix) from None
