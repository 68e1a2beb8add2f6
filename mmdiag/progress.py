"""Progress of long operations, for anything that takes the replay's `progress` callable
(dicts {"label": strategy, "done": requests, "total": requests}).

    with progress.stderr(enabled=True) as p:
        api.replay("trace.jsonl", progress=p)

On a terminal: a rich progress bar per strategy. Off a terminal (CI logs, `| tee`): a plain
line every few seconds and at each new strategy, so a long run is never silent.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO

Report = Callable[[dict], None]


class Lines:
    """A line every `every_s` seconds and at each new label, written through `log`."""

    def __init__(self, log: Callable[[str], None], every_s: float = 3.0,
                 clock: Callable[[], float] = time.monotonic):
        self.log, self.every, self.clock = log, every_s, clock
        self.t0 = clock()
        self.last, self.label = -every_s, None

    def __call__(self, p: dict) -> None:
        now = self.clock()
        label = p.get("label")
        if label == self.label and now - self.last < self.every:
            return
        self.label, self.last = label, now
        done = f": {p.get('done')}/{p.get('total')} requests" if p.get("total") else ""
        self.log(f"  [{now - self.t0:4.0f} s] replaying {label or '...'}{done}")

    def close(self) -> None:
        pass


class Bar:
    """A rich progress bar per label on a terminal."""

    def __init__(self, stream: TextIO):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("  {task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("requests"), TimeElapsedColumn(),
                            console=Console(file=stream), transient=False)
        self.tasks: dict[Any, Any] = {}
        self.bar.start()

    def __call__(self, p: dict) -> None:
        label = p.get("label") or "..."
        if label not in self.tasks:
            self.tasks[label] = self.bar.add_task(label, total=p.get("total") or None)
        self.bar.update(self.tasks[label], completed=p.get("done", 0), total=p.get("total") or None)

    def close(self) -> None:
        self.bar.stop()


class _Off:
    def __call__(self, p: dict) -> None:
        pass

    def close(self) -> None:
        pass


class stderr:
    """Context manager giving the progress callable for stderr: a bar on a terminal, lines
    otherwise, nothing when not `enabled`."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None, every_s: float = 3.0):
        self.stream, self.enabled, self.every = stream or sys.stderr, enabled, every_s

    def __enter__(self) -> Report:
        if not self.enabled:
            self.p = _Off()
        elif self.stream.isatty():
            self.p = Bar(self.stream)
        else:
            self.p = Lines(lambda s: print(s, file=self.stream, flush=True), self.every)
        return self.p

    def __exit__(self, *exc: Any) -> None:
        self.p.close()
