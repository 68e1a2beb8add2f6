"""Which multimodal path an SGLang install carries, by code structure.

Variants (mmdiag/sglang/variants.toml): `per-rank`, `broadcast-always`,
`broadcast-flag`; anything else is reported as unknown with the markers found.
The release's facts (handler, flag, group, precompute, transport; mmdiag.sglang.probes)
and its layout family come with it. Also says whether an mmdiag patch is applied
(code markers + manifest).
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from . import astutil
from .errors import UnknownLayout
from .facts import effective_transport, facts, file_rel, layouts, release, rust_hashes, variants
from .locate import SGLangInstall
from .probes import ReleaseFacts, match_family, probe
from ..vocab import SEGMENTS_FRESH, TRANSPORT_SHM

PATCH_MARKER_RE = re.compile(r"#\s*mmdiag-patch:\s*([a-z_-]+)")
MANIFEST_NAME = "manifest.json"


@dataclass
class Detection:
    install: SGLangInstall
    variant: str | None  # None: a layout mmdiag does not know
    summary: str
    scheduler_lines: int
    markers: dict[str, list[int]]  # marker -> 1-based lines in scheduler.py
    methods: dict[str, int]  # Scheduler methods of interest -> def line
    mm_call: str | None  # what the request handler calls on recv_req.mm_inputs
    layouts: dict[str, str | None]  # target -> known layout description, None = unknown
    patched: str | None  # strategy named by mmdiag-patch markers / manifest
    patch_markers: dict[str, list[str]]  # file key -> strategies marked in it
    manifest: dict[str, Any] | None
    release: dict[str, Any] | None  # the variants.toml row for install.version
    flag: dict[str, Any] | None  # where --enable-broadcast-mm-inputs-process is defined
    facts: ReleaseFacts = field(default_factory=ReleaseFacts)
    notes: list[str] = field(default_factory=list)
    # With launch settings given (doctor's options): {"launch", "transport", "why", "hashing"}.
    launch: dict[str, Any] | None = None

    @property
    def family(self) -> str | None:
        return self.facts.family

    @property
    def known(self) -> bool:
        return self.variant is not None

    @property
    def content_hash(self) -> str | None:
        """What mm_utils hashes features with (vocab.HASHES: sha256, or a hash `mmdiag apply` put
        there), read from the code; None: not found."""
        from .patches.content_hash import hash_of
        return hash_of(_read(self.install, "mm_utils"))

    @property
    def segments(self) -> str | None:
        """How the shared-memory writer gets a segment per feature (vocab.SEGMENTS: fresh, or pool
        where mmdiag's `pool` or `shm` patch put one); None: no segments reach the ranks."""
        from .patches.pool import segments_of
        seg = segments_of(_read(self.install, "mm_utils"), self.manifest)
        return None if seg == SEGMENTS_FRESH and self.facts.transport != TRANSPORT_SHM else seg

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["install"] = self.install.to_dict()
        d["family"] = self.family
        d["content_hash"] = self.content_hash
        d["segments"] = self.segments
        return d


def _read(install: SGLangInstall, key: str) -> str | None:
    try:
        return install.path(key).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def scheduler_methods(text: str, filename: str = "scheduler.py") -> dict[str, astutil.MethodSpan]:
    tree = astutil.parse(text, filename)
    cls = astutil.find_class(tree, "Scheduler")
    if cls is None:
        return {}
    return astutil.methods(cls, text.splitlines(keepends=True))


def mm_call_of(span: astutil.MethodSpan | None, arg: str = "recv_req.mm_inputs") -> str | None:
    """Callee that a handler applies to `recv_req.mm_inputs` (or `arg`)."""
    if span is None:
        return None
    for node in ast.walk(span.node):
        if isinstance(node, ast.Call) and any(
            ast.unparse(a) == arg for a in node.args
        ):
            callee = ast.unparse(node.func)
            if callee not in ("self.pad_input_ids_func",):
                return callee
    return None


def layout_of(target: str, node: ast.AST | None) -> str | None:
    if node is None:
        return None
    return layouts(target).get(astutil.fingerprint(node))


def tokenizer_mm_statement(text: str) -> ast.stmt | None:
    """The `mm_inputs = await ...` statement of TokenizerManager._tokenize_one_request."""
    return astutil.target_node(text, "TokenizerManager._tokenize_one_request:mm_inputs", "tokenizer_manager.py")


def flag_location(install: SGLangInstall, rf: ReleaseFacts, option: str) -> dict[str, Any] | None:
    """Where the broadcast flag is declared (file, line, default) and how it is read."""
    if rf.flag_declared is None:
        return None
    rel, line = rf.flag_declared.rsplit(":", 1)
    return {"option": option, "field": "enable_broadcast_mm_inputs_process", "file": str(install.package_dir / rel),
            "field_line": int(line), "default": rf.flag_default, "read": rf.flag_read, "read_at": rf.flag_read_at}


def read_manifest(install: SGLangInstall) -> dict[str, Any] | None:
    """The manifest of the patch applied to this install (external state folder, or the
    in-package `.mmdiag/` an older mmdiag wrote), None when there is none."""
    for d in (install.legacy_state_dir, install.state_dir):
        p = d / MANIFEST_NAME
        try:
            with open(p, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            continue
        except (OSError, json.JSONDecodeError) as e:
            raise UnknownLayout(f"unreadable mmdiag manifest ({e})", where=str(p),
                                fix=f"restore it or remove {d} by hand") from None
    return None


def _match_variant(methods: dict[str, Any], rf: ReleaseFacts, patched: bool):
    for v in variants():
        if not all(m in methods for m in v["methods_present"]):
            continue
        if any(m in methods for m in v["methods_absent"]):
            continue
        # A patch keeps the call site but may replace what the facts are read from (the
        # flag test); an unpatched file must show both.
        if not patched and (rf.mm_call != v["mm_call"] or not all(getattr(rf, f) for f in v["facts_present"])):
            continue
        return v
    return None


def _find_markers(lines: list[str], names: list[str]) -> dict[str, list[int]]:
    """marker -> lines, under the name the code really spells: a marker that starts a longer
    identifier (`_process_and_broadcast_mm_inputs_v2`, a renamed method) is reported as that
    identifier, never under the marker's own name."""
    found: dict[str, list[int]] = {}
    for m in names:
        pat = re.compile(("(?<!\\w)" if m[0].isidentifier() else "") + re.escape(m)
                         + ("\\w*" if (m[-1].isalnum() or m[-1] == "_") else ""))
        for i, line in enumerate(lines, 1):
            for name in dict.fromkeys(pat.findall(line)):
                found.setdefault(name, []).append(i)
    return found


def detect(install: SGLangInstall) -> Detection:
    text = _read(install, "scheduler")
    if text is None:
        raise UnknownLayout(f"missing {file_rel('scheduler')}", where=str(install.package_dir))
    try:
        spans = scheduler_methods(text)
    except SyntaxError as e:
        raise UnknownLayout(f"scheduler.py does not parse (line {e.lineno}: {e.msg})",
                            where=str(install.path("scheduler")),
                            fix="restore the file (pip install --force-reinstall, git checkout)") from None
    lines = text.splitlines()
    markers = _find_markers(lines, facts()["markers"]["scheduler_text"])
    interesting = ("_process_and_broadcast_mm_inputs", "_get_multimodal_inputs",
                   "process_input_requests", "_mmdiag_orig_process_input_requests",
                   "handle_generate_request", "_handle_generate_request", "abort_request")
    methods = {k: spans[k].def_line for k in interesting if k in spans}
    rf = probe(install.package_dir, None)
    mm_call = rf.mm_call

    patch_markers: dict[str, list[str]] = {}
    for key in ("scheduler", "tokenizer_manager"):
        t = text if key == "scheduler" else _read(install, key)
        found = sorted(set(PATCH_MARKER_RE.findall(t or "")))
        if found:
            patch_markers[key] = found
    manifest = read_manifest(install)
    patched = manifest["strategy"] if manifest else None
    if patched is None and patch_markers:
        patched = sorted({s for v in patch_markers.values() for s in v})[0]

    v = _match_variant(spans, rf, bool(patch_markers))
    if manifest and manifest.get("variant"):
        vname = manifest["variant"]
    else:
        vname = v["name"] if v else None
    summary = next((x["summary"] for x in variants() if x["name"] == vname), "unknown layout")

    lay = {}
    for target, name in (("Scheduler._process_and_broadcast_mm_inputs", "_process_and_broadcast_mm_inputs"),
                         ("Scheduler._get_multimodal_inputs", "_get_multimodal_inputs")):
        if name in spans:
            lay[target] = layout_of(target, spans[name].node)
    tm = _read(install, "tokenizer_manager")
    if tm is not None:
        try:
            st = tokenizer_mm_statement(tm)
        except SyntaxError:
            st = None
        lay["TokenizerManager._tokenize_one_request:mm_inputs"] = layout_of(
            "TokenizerManager._tokenize_one_request:mm_inputs", st)

    match_family(rf, vname, install.version)
    flag = None
    if vname == "broadcast-flag":
        flag = flag_location(install, rf, next(x for x in variants() if x["name"] == "broadcast-flag")["flag"])

    rel = release(install.version)
    notes = []
    if vname is None:
        notes.append("unknown layout: markers found in scheduler.py: "
                     + (", ".join(f"{k} (line {v[0]})" for k, v in markers.items()) or "none")
                     + f"; Scheduler methods: {', '.join(methods) or 'none'}; mm call: {mm_call}")
    if rf.family_note:
        notes.append(rf.family_note)
    if rel and vname and rel["variant"] != vname:
        notes.append(f"version {install.version} is listed as {rel['variant']} but the code is {vname} "
                     "(a modified install or checkout): the code wins")
    if rel and not patch_markers and rel.get("scheduler_lines") not in (None, len(lines)):
        notes.append(f"scheduler.py has {len(lines)} lines, release {install.version} has "
                     f"{rel['scheduler_lines']}: locally modified")
    if patch_markers and not manifest:
        notes.append("mmdiag patch markers found but no manifest: the patch was not applied by this "
                     "mmdiag or its state folder was removed; undo is not possible automatically")
    return Detection(install, vname, summary, len(lines), markers, methods, mm_call, lay,
                     patched, patch_markers, manifest, rel, flag, rf, notes)


def with_launch(det: Detection, launch) -> Detection:
    """`det` with what a launch (facts.Launch; None: none given) makes of the release: its
    effective transport and, where SGLANG_RUST_SERVER takes images, who hashes."""
    if launch is None:
        return det
    version = det.install.version
    tr, why = effective_transport(version, det.facts.transport, launch)
    hashing = (f"the Rust front end's workers ({facts()['rust_server']['env']}=1): items arrive hashed"
               if rust_hashes(version, launch) else None)
    det.launch = {"launch": asdict(launch), "transport": tr, "why": why, "hashing": hashing}
    return det
