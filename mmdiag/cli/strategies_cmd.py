"""`mmdiag strategies`: what each strategy is, from the strategy modules themselves."""
from __future__ import annotations

import click

from ..strategies import catalog
from .app import json_switch, show


@click.command("strategies")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown"]), default="text", show_default=True,
              help="markdown: the table the README shows")
@json_switch("the strategies")
def strategies_command(fmt, as_json):
    """List the strategies: what the ranks do, their own collectives, the patch that applies it."""
    show(catalog(), as_json, fmt)
