"""Use cases that run things: verify (replay, apply, replay, report) and adaptive (recommend's
no-Run path: replay until decided). Between api and analysis: they call the collectors and the
patcher, then hand Runs to analysis, which only reads them."""
