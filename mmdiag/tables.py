"""The data tables in profiles/ (workloads, model geometries, criteria, recommend rules,
bench_serving's facts): where they are and how one is read (a bad file is a one-line error)."""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from .errors import ProfileError

PROFILES_DIR = Path(os.environ.get("MMDIAG_PROFILES", Path(__file__).resolve().parent.parent / "profiles"))


def load_table(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ProfileError("no such file", where=str(path)) from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"invalid TOML ({e})", where=str(path)) from None
