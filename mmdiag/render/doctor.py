"""Text of `mmdiag doctor`: one row per fact, each with the file:line that says so; and of
`mmdiag doctor --pid` (a running server's settings, mmdiag.live.server)."""
from __future__ import annotations

from typing import Any


def _or(v: Any, none: str = "absent") -> str:
    return str(v) if v not in (None, "", []) else none


def fact_rows(det) -> list[tuple[str, str]]:
    """The release facts of issue 10 (mmdiag.sglang.probes.ReleaseFacts) as (label, text)."""
    f = det.facts
    fam = "unknown"
    if f.family:
        fam = f"{f.family} (releases {f.family_releases})"
        if f.family_fit != "in range":  # named from the code alone; the note says why
            v = det.install.version
            fam += (f"; {v} is not one of them" if v else "; no version found") + ": matched by its code"
    rows = [("family", fam)]
    rows.append(("request handler", f"Scheduler.{f.handler} ({f.handler_at}) calls {f.mm_call}"
                 if f.handler else "not found"))
    rows.append(("materializer", f"MultimodalInputs.{f.materializer}" if f.materializer else "unknown"))
    if f.flag_declared:
        rows.append(("broadcast flag", f"--enable-broadcast-mm-inputs-process, default {f.flag_default}; "
                     f"declared {f.flag_declared}; read as {f.flag_read} ({f.flag_read_at})"))
    else:
        rows.append(("broadcast flag", "absent"))
    if f.group:
        proto = f"; error-broadcast protocol {f.error_protocol}" if f.error_protocol else ""
        rows.append(("entry-rank broadcast", f"group {f.group}, src {f.src}, entry test `{f.entry_test}` "
                     f"({f.broadcast_at}){proto}"))
    if f.precompute_env:
        rows.append(("SGLANG_MM_PRECOMPUTE_HASH", f"default {f.precompute_default} ({f.precompute_env}); "
                     f"hashes on the {f.precompute_hashing} ({f.precompute_at})"))
    else:
        rows.append(("SGLANG_MM_PRECOMPUTE_HASH", "absent (every rank hashes; `mmdiag apply precompute` patches it in)"))
    from ..sglang.patches.content_hash import describe
    rows.append(("content hash", describe(det.content_hash)))
    from ..sglang.patches.pool import describe as describe_segments
    rows.append(("shm segments", describe_segments(det.segments)))
    rows.append(("feature transport", f"{f.transport}: {f.transport_detail}"
                 + (f" ({f.transport_at})" if f.transport_at else "")))
    if det.launch:
        rows.append(("with this launch", f"feature transport {det.launch['transport']} ({det.launch['why']})"
                     + (f"; hashing: {det.launch['hashing']}" if det.launch["hashing"] else "")))
    cuda = []
    if f.feature_transport_option:
        cuda.append(f"--mm-feature-transport {{{','.join(f.feature_transport_option)}}} ({f.feature_transport_at})")
    if f.cuda_ipc_env:
        cuda.append(f"SGLANG_USE_CUDA_IPC_TRANSPORT ({f.cuda_ipc_env})"
                    + (", deprecated" if f.feature_transport_option else ""))
    rows.append(("CUDA feature transport", "; ".join(cuda) or "none"))
    return rows


def doctor_text(det) -> str:
    i = det.install
    rows = [
        ("sglang", str(i.package_dir)),
        ("layout", f"{i.layout} (found by {i.found_by})"),
        ("version", i.version or "unknown"),
        ("variant", det.variant or "unknown"),
        ("path", det.summary),
        ("scheduler.py", f"{det.scheduler_lines} lines; mm call: {det.mm_call}"),
    ]
    rows += fact_rows(det)
    for target, lay in det.layouts.items():
        rows.append((target, lay or "unknown layout"))
    if det.manifest:
        m = det.manifest
        rows.append(("mmdiag patch", f"{'+'.join(m.get('patches') or [m['strategy']])} ({m.get('status')}, "
                                     f"{m.get('created')}; files: {', '.join(m['files'])}; undo: {i.undo_command})"))
    elif det.patch_markers:
        rows.append(("mmdiag patch", f"markers {det.patch_markers} but no manifest"))
    else:
        rows.append(("mmdiag patch", "none"))
    width = max(len(k) for k, _ in rows)
    out = [f"{k.ljust(width)}  {v}" for k, v in rows]
    out += [f"note: {n}" for n in det.notes]
    return "\n".join(out) + "\n"


def server_text(s) -> str:
    """`doctor --pid`: the lines a profile's header also carries (one home: live.server)."""
    from ..live.server import settings_lines
    return "\n".join(settings_lines(s)) + "\n"
