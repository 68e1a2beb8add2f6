"""`python -m mmdiag.live ...` is `mmdiag profile ...` (also usable before cli.py registers it)."""
from .commands import profile_command

if __name__ == "__main__":
    profile_command(prog_name="mmdiag profile")
