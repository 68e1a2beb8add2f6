"""The multi-rank replay: `replay(trace, ReplayOptions(tp=4, strategies=[...])) -> Run`."""
from .launcher import replay
from .options import ReplayOptions

__all__ = ["ReplayOptions", "replay"]
