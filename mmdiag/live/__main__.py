"""`python -m mmdiag.live ...` is `mmdiag profile ...`."""
import sys

from ..cli import main

if __name__ == "__main__":
    main(["profile", *sys.argv[1:]], prog_name="mmdiag")
