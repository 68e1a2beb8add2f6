"""Import floors of mmdiag: which package imports which, pairs that import each other, arrows up.

    python benchmarks/import_floors.py            # summary figures
    python benchmarks/import_floors.py --verbose  # every pair and up-arrow with the importing files

Every module under mmdiag/ is parsed with ast; imports inside functions count too (a lazy
import is still a dependency). A module maps to its package: the first name under mmdiag
(mmdiag.sglang.patches.cond -> sglang; mmdiag/run.py -> run). FLOORS is the layering of
/work/shared/ARCHITECTURE.md, higher imports lower; an arrow from a package to one on a
higher floor (or to a sibling on the same floor) runs the wrong way. tests/test_floors.py
asserts on the same functions.
"""
from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "mmdiag"

# Floor per package, higher imports lower. Packages on one floor are siblings and must not
# import each other (replay and live are both collectors: neither is the other's library).
FLOORS: dict[str, float] = {
    "__main__": 11, "cli": 10,  # __main__: the `python -m` entry points over cli
    "api": 9,
    "workflows": 8,
    "render": 7,
    "analysis": 6,
    "replay": 5, "live": 5,
    # workloads synthesizes traces (the replay's input) from profiles/ tables and
    # sglang.bench_serving's defaults and arguments, which ingest reads: above ingest.
    "workloads": 4.5,
    "sglang": 4, "ingest": 4,
    "strategies": 3,
    "mmpath": 2,  # the primitives the strategies are built of (ARCHITECTURE puts them on one floor)
    "run": 1, "trace": 1, "geometry": 1,  # the model: Runs, traces, the model geometry of features
    # plumbing every floor may use: names, units, errors, atomic files, tables, processes
    "vocab": 0, "units": 0, "errors": 0, "fileio": 0, "tables": 0, "lazy": 0, "proc": 0,
    "progress": 0, "__init__": 0,
}
# Imports between siblings of one floor that are a library relation, not a loop.
SAME_FLOOR_OK = {("trace", "run")}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_of(module: str) -> str:
    parts = module.split(".")
    if parts[-1] == "__main__":
        return "__main__"
    return parts[1] if len(parts) > 1 else "__init__"


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute module names an ImportFrom reaches (`from . import x` reaches pkg.x)."""
    if node.level:
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_pkg else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if node.module is None:  # from . import a, b: each name may be a submodule
        return [f"{target}.{a.name}" for a in node.names]
    return [target]


def imports() -> list[tuple[str, str, int]]:
    """(importing module, imported mmdiag module, line) for every import in mmdiag/."""
    out = []
    for path in sorted(PKG.rglob("*.py")):
        module = module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = _resolve(module, path.name == "__init__.py", node)
            else:
                continue
            out += [(module, t, node.lineno) for t in targets
                    if t == "mmdiag" or t.startswith("mmdiag.")]
    return out


def edges() -> dict[tuple[str, str], list[str]]:
    """(package, package) -> the 'module:line' sites that import across them."""
    out: dict[tuple[str, str], list[str]] = defaultdict(list)
    for src, dst, line in imports():
        a, b = package_of(src), package_of(dst)
        if a != b and b != "__init__":
            out[(a, b)].append(f"{src}:{line}")
    return dict(out)


def mutual_pairs(e: dict) -> list[tuple[str, str]]:
    return sorted({tuple(sorted(k)) for k in e if (k[1], k[0]) in e})


def up_arrows(e: dict) -> list[tuple[str, str]]:
    """Package arrows that point to a higher floor, or sideways to a sibling."""
    bad = []
    for a, b in e:
        fa, fb = FLOORS.get(a), FLOORS.get(b)
        if fa is None or fb is None:
            raise SystemExit(f"import_floors: package {a if fa is None else b!r} has no floor in FLOORS")
        if fb > fa or (fb == fa and (a, b) not in SAME_FLOOR_OK and fa != 0):
            bad.append((a, b))
    return sorted(bad)


def module_up_arrows(e: dict) -> int:
    """Importing modules behind the up arrows (farm-studio-like count: one per module edge)."""
    ups = set(up_arrows(e))
    return len({(site.split(":")[0], pair) for pair in ups for site in e[pair]})


def module_cycles() -> list[list[str]]:
    """Module import circles: strongly connected components of two or more modules (Tarjan)."""
    known = {module_name(p) for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst, _ in imports():
        while dst not in known and "." in dst:  # `from .x import name` -> module x
            dst = dst.rsplit(".", 1)[0]
        if dst != src and dst in known and dst != "mmdiag":
            graph[src].add(dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(known):
        if v not in index:
            visit(v)
    return sorted(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    e = edges()
    pairs, ups = mutual_pairs(e), up_arrows(e)
    print(f"packages: {len({p for k in e for p in k})}  package arrows: {len(e)}")
    print(f"pairs importing each other: {len(pairs)}")
    for a, b in pairs:
        print(f"  {a} <-> {b}" + (f"   {e[(a, b)][:3]} / {e[(b, a)][:3]}" if args.verbose else ""))
    print(f"arrows up the floors (package): {len(ups)}  (importing modules: {module_up_arrows(e)})")
    for a, b in ups:
        print(f"  {a} -> {b}" + (f"   {e[(a, b)]}" if args.verbose else ""))
    cycles = module_cycles()
    print(f"module import circles: {len(cycles)}")
    for c in cycles:
        print("  " + " <-> ".join(m.removeprefix("mmdiag.") for m in c))
    return 0


if __name__ == "__main__":
    sys.exit(main())
