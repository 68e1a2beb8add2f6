"""Write the sampled stacks as a speedscope file (https://www.speedscope.app)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import fileio, render
from .attribute import RankSamples


@dataclass
class SampledStacks:
    """Every rank's sampled stacks: what the `speedscope` renderer shows."""
    ranks: list[RankSamples]
    noun = "speedscope file"

    def to_speedscope(self) -> dict[str, Any]:
        return to_speedscope(self.ranks)


def to_speedscope(ranks: list[RankSamples], name: str = "mmdiag profile") -> dict[str, Any]:
    frames: list[dict[str, Any]] = []
    index: dict[tuple, int] = {}
    profiles = []
    for rs in ranks:
        for tid, t in sorted(rs.threads.items()):
            samples, weights = [], []
            for stack, n in t.stacks.items():
                ids = []
                for f in stack:
                    key = (f.name, f.file, f.line)
                    if key not in index:
                        index[key] = len(frames)
                        d = {"name": f.name, "file": f.file}
                        if f.line is not None:
                            d["line"] = f.line
                        frames.append(d)
                    ids.append(index[key])
                samples.append(ids)
                weights.append(n)
            profiles.append({"type": "sampled", "name": f"{f'rank {rs.rank}' if rs.rank >= 0 else 'tokenizer'} {rs.title or ''} thread {t.name or tid}".strip(),
                             "unit": "none", "startValue": 0, "endValue": sum(weights),
                             "samples": samples, "weights": weights})
    return {"$schema": "https://www.speedscope.app/file-format-schema.json", "name": name,
            "exporter": "mmdiag", "activeProfileIndex": 0, "shared": {"frames": frames}, "profiles": profiles}


def write_speedscope(path: str, ranks: list[RankSamples]) -> None:
    fileio.write_text_atomic(path, render.render(SampledStacks(ranks), "speedscope"))
