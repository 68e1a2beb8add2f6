"""Stack -> phase rules, kept as data in rules.toml (see the comments there)."""
from __future__ import annotations

import ast
import glob
import os
import tomllib
from dataclasses import dataclass
from functools import lru_cache

from ..vocab import PHASES, TOKENIZER_PHASES
from .errors import LiveError

RULE_PHASES = PHASES + TOKENIZER_PHASES

RULES_FILE = os.path.join(os.path.dirname(__file__), "rules.toml")
STRATEGIES_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "strategies")


@dataclass(frozen=True)
class Frame:
    name: str          # py-spy's function name (a qualified name on Python >= 3.11)
    file: str = ""
    line: int | None = None

    @property
    def short(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Rule:
    phase: str
    functions: frozenset[str]
    files: tuple[str, ...] = ()
    within: frozenset[str] = frozenset()
    outer: bool = False  # wins wherever its frame is on the stack (checked before the others)

    def matches(self, frame: Frame) -> bool:
        if frame.name not in self.functions and frame.short not in self.functions:
            return False
        return not self.files or frame.file.endswith(self.files)


@dataclass(frozen=True)
class WaitRule:
    """Frames in which a rank waits (a collective's gloo wait, a socket poll, a
    sched_yield spin): the sample counts as waiting, in `phase` if given, else in
    the phase its other frames give. A `work` frame below it makes the sample work
    after all (the socket call returned and is unpickling what it received)."""
    functions: frozenset[str]
    files: tuple[str, ...] = ()
    phase: str | None = None
    work: frozenset[str] = frozenset()
    leaf: bool = False  # only as the innermost frame (an event loop or pool worker whose wait runs in C)

    def matches(self, frame: Frame) -> bool:
        if frame.name not in self.functions and frame.short not in self.functions:
            return False
        return not self.files or frame.file.endswith(self.files)


@dataclass(frozen=True, eq=False)  # hashed by identity: classify() caches per rule set
class RuleSet:
    rules: tuple[Rule, ...]
    strategy_order: tuple[str, ...]
    strategy_markers: dict[str, tuple[str, ...]]
    source: str
    waits: tuple[WaitRule, ...] = ()

    @property
    def stack_markers(self) -> tuple[tuple[str, str], ...]:
        """The ("outer", "inner") pairs of the `outer>inner` markers."""
        pairs = {tuple(part.split(">", 1)) for ms in self.strategy_markers.values() for m in ms
                 for part in m.split("+") if ">" in part}
        return tuple(sorted(pairs))

    def classify(self, frames: tuple[Frame, ...]) -> tuple[str, bool]:
        """(phase, waiting) of one sample: the innermost frame matching a wait rule
        makes it waiting, in that rule's phase if it has one. Cached: `top` sees the
        same stacks every second."""
        return _classify(self, frames)

    def _classify(self, frames: tuple[Frame, ...]) -> tuple[str, bool]:
        for i in range(len(frames) - 1, -1, -1):
            for w in self.waits:
                if w.matches(frames[i]) and not (w.leaf and i != len(frames) - 1):
                    if w.work and any(g.name in w.work or g.short in w.work for g in frames[i + 1:]):
                        return self.phase_of(frames), False
                    return (w.phase or self.phase_of(frames)), True
        return self.phase_of(frames), False

    def phase_of(self, frames: tuple[Frame, ...]) -> str:
        """`frames` root first. An `outer` rule matching any frame wins; else the
        innermost matching frame; no match is `other`."""
        for rule in self.rules:
            if rule.outer and any(rule.matches(f) for f in frames):
                return rule.phase
        for i in range(len(frames) - 1, -1, -1):
            f = frames[i]
            for rule in self.rules:
                if not rule.outer and rule.matches(f):
                    if rule.within and not any(
                            o.name in rule.within or o.short in rule.within for o in frames[:i]):
                        continue
                    return rule.phase
        return "other"

    def strategy_of(self, functions: set[str]) -> str:
        """The multimodal path, from the function names seen in the window, plus
        the `outer>inner` and `phase:NAME` tokens attribute() adds (see rules.toml)."""
        for name in self.strategy_order:
            for marker in self.strategy_markers.get(name, ()):
                if all((part[1:] not in functions) if part.startswith("!") else (part in functions)
                       for part in marker.split("+")):
                    return name
        return "unknown"


@lru_cache(maxsize=1 << 16)
def _classify(rules: RuleSet, frames: tuple[Frame, ...]) -> tuple[str, bool]:
    return rules._classify(frames)


def _fail(source: str, what: str) -> LiveError:
    return LiveError(what, where=source, fix="fix the rules file (format: see the comments in mmdiag/live/rules.toml)")


def parse_rules(text: str, source: str = "<rules>") -> RuleSet:
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _fail(source, f"not TOML ({e})") from None
    rules = []
    for k, r in enumerate(d.get("rule", []), 1):
        phase = r.get("phase")
        if phase not in RULE_PHASES:
            raise _fail(source, f"rule {k}: phase {phase!r} is not one of {', '.join(RULE_PHASES)}")
        fns = r.get("functions")
        if not fns or not all(isinstance(x, str) for x in fns):
            raise _fail(source, f"rule {k}: `functions` must be a non-empty list of names")
        rules.append(Rule(phase, frozenset(fns), tuple(r.get("files", ())), frozenset(r.get("within", ())),
                          bool(r.get("outer", False))))
    if not rules:
        raise _fail(source, "no [[rule]] tables")
    waits = []
    for k, w in enumerate(d.get("wait", []), 1):
        fns = w.get("functions")
        if not fns or not all(isinstance(x, str) for x in fns):
            raise _fail(source, f"wait {k}: `functions` must be a non-empty list of names")
        if w.get("phase") is not None and w["phase"] not in PHASES:
            raise _fail(source, f"wait {k}: phase {w['phase']!r} is not one of {', '.join(PHASES)}")
        waits.append(WaitRule(frozenset(fns), tuple(w.get("files", ())), w.get("phase"), frozenset(w.get("work", ())),
                              bool(w.get("leaf", False))))
    listed = tuple(d.get("strategy", {}).get("order", ()))
    markers = strategy_markers()
    unknown = [n for n in listed if n not in markers]
    if unknown:
        raise _fail(source, f"[strategy] order names {unknown[0]!r}, not a strategy of mmdiag.strategies")
    # A strategy with markers the order does not name (a new one) is tried first: its markers are its own.
    order = tuple(n for n, m in markers.items() if m and n not in listed) + listed
    return RuleSet(tuple(rules), order, markers, source, tuple(waits))


@lru_cache(maxsize=1)
def strategy_markers() -> dict[str, tuple[str, ...]]:
    """Each strategy's `live_markers`, where they live: on its class in
    mmdiag/strategies/. Read from the source, not imported: the strategy modules
    import torch, which would cost `profile` and `top` seconds of start-up."""
    out: dict[str, tuple[str, ...]] = {}
    for path in sorted(glob.glob(os.path.join(STRATEGIES_DIR, "*.py"))):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            attrs = {}
            for st in cls.body:
                if isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name):
                    if st.targets[0].id in ("name", "live_markers"):
                        attrs[st.targets[0].id] = ast.literal_eval(st.value)
            if "name" in attrs:
                out[attrs["name"]] = tuple(attrs.get("live_markers", ()))
    return out


@lru_cache(maxsize=8)
def load_rules(path: str | None = None) -> RuleSet:
    path = path or RULES_FILE
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise LiveError(f"cannot read rules ({e.strerror})", where=path) from None
    return parse_rules(text, path)
