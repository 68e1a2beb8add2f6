"""Progress on stderr for long replays (to be replaced by a library bar)."""
from __future__ import annotations

import sys

import click


class Bar:
    """A progress line on stderr: a redrawn bar on a terminal, a line per step otherwise."""

    def __init__(self, enabled: bool):
        self.enabled, self.tty, self.label = enabled, sys.stderr.isatty(), None

    def __call__(self, p: dict) -> None:
        if not self.enabled:
            return
        label, done, total = p.get("label", ""), p.get("done", 0), p.get("total") or 0
        if self.tty:
            width = 30
            fill = int(width * done / total) if total else 0
            click.echo(f"\r  {label:<14} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} requests",
                       err=True, nl=False)
        if label != self.label:
            if self.label is not None and self.tty:
                click.echo("", err=True)
            elif not self.tty:
                click.echo(f"  replaying {label} ...", err=True)
            self.label = label

    def close(self) -> None:
        if self.enabled and self.tty and self.label is not None:
            click.echo("", err=True)

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
