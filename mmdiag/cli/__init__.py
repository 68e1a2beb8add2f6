"""The `mmdiag` command line: one click application over mmdiag.api.

app.py holds the group and its one error handler; each *_cmds module holds a family of
commands; this module gathers them. A new command: a function in a *_cmds module and its
line below.
"""
from __future__ import annotations

from .. import render
from ..vocab import PHASES, STRATEGIES
from .analysis_cmds import recommend_command, report_command
from .app import OUTPUT_KINDS, main
from .profile_cmd import profile_command, top_command
from .replay_cmds import demo_cmd, replay_cmd
from .sglang_cmds import apply_command, doctor_command
from .strategies_cmd import strategies_command
from .trace_cmds import trace

# The output formats, from mmdiag.render's table and the kinds the commands' -o write (imported above).
main.help = main.help.replace("{output_formats}", render.describe_formats(OUTPUT_KINDS))
# The names, from the vocabulary (indented like the docstring they extend).
main.help += (f"\n\n    \b\n    Strategies (one name everywhere; mmdiag strategies): {', '.join(STRATEGIES)}."
              f"\n    Phases (per rank): {', '.join(PHASES)}.")

for _cmd in (trace, replay_cmd, demo_cmd, profile_command, top_command, recommend_command, report_command,
             doctor_command, apply_command, strategies_command):
    main.add_command(_cmd)

__all__ = ["main"]
