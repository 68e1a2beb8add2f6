"""One Chrome-trace / Perfetto file for all ranks, from each rank's viztracer log
(the `chrome` renderer; `replay --timeline` writes it)."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

from ..errors import MmdiagError


@dataclass
class RankTimelines:
    files: list[str]   # one viztracer log per rank
    noun = "timeline"


def render_chrome(t: RankTimelines) -> str:
    from viztracer.report_builder import ReportBuilder

    missing = [f for f in t.files if not os.path.exists(f)]
    if missing:
        raise MmdiagError(f"timeline incomplete: no events from {', '.join(os.path.basename(m) for m in missing)}")
    buf = io.StringIO()
    ReportBuilder(t.files, verbose=0).save(output_file=buf)
    return buf.getvalue()


def combine_timeline(rank_files: list[str], output: str) -> None:
    from . import write
    write(RankTimelines(rank_files), output, "chrome", what="--timeline")
