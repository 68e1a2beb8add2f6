"""One Chrome-trace / Perfetto file for all ranks, from each rank's viztracer log."""
from __future__ import annotations

import os

from ..errors import MmdiagError


def combine_timeline(rank_files: list[str], output: str) -> None:
    from viztracer.report_builder import ReportBuilder

    missing = [f for f in rank_files if not os.path.exists(f)]
    if missing:
        raise MmdiagError(f"timeline incomplete: no events from {', '.join(os.path.basename(m) for m in missing)}")
    # viztracer picks the format from the suffix, so the temp name keeps it.
    tmp = os.path.join(os.path.dirname(os.path.abspath(output)), ".part-" + os.path.basename(output))
    try:
        ReportBuilder(rank_files, verbose=0).save(output_file=tmp)
        os.replace(tmp, output)
    except OSError as e:
        raise MmdiagError(f"cannot write timeline ({e.strerror})", where=output) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
