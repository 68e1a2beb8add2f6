"""`mmdiag strategies`: what each strategy is, from the strategy modules themselves."""
from __future__ import annotations

import click

from .. import render
from ..strategies import catalog
from .app import json_switch, show


@click.command("strategies")
@click.option("--format", "fmt", type=click.Choice([f for f in render.formats_for("Catalog") if f != "json"]),
              default="text", show_default=True, help="markdown: the table the README shows (JSON: --json)")
@json_switch("the strategies")
def strategies_command(fmt, as_json):
    """List the strategies: what the ranks do, their own collectives, the patch that applies it."""
    show(catalog(), as_json, fmt)
