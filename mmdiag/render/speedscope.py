"""The sampled stacks as a speedscope file (https://www.speedscope.app): the `speedscope` renderer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class SampledStacks:
    """Every rank's sampled stacks (mmdiag.live.attribute.RankSamples): what the `speedscope`
    renderer shows; the live profiler hands them up, api writes them."""
    ranks: list[Any]
    noun = "speedscope file"

    def to_speedscope(self) -> dict[str, Any]:
        return to_speedscope(self.ranks)


def to_speedscope(ranks: list[Any], name: str = "mmdiag profile") -> dict[str, Any]:
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
