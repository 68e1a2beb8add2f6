"""`mmdiag strategies`: what each strategy is, from the strategy modules themselves."""
from __future__ import annotations

import click

from .. import render as out
from ..strategies import catalog
from .app import json_switch


@click.command("strategies")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown"]), default="text", show_default=True,
              help="markdown: the table the README shows")
@json_switch("the strategies")
def strategies_command(fmt, as_json):
    """List the strategies: what the ranks do, their own collectives, the patch that applies it."""
    click.echo(out.render(catalog(), "json" if as_json else fmt), nl=False)
