"""The multi-rank replay: `replay(trace, ReplayOptions(tp=4, strategies=[...])) -> Run`."""
from .launcher import ReplayOptions, replay

__all__ = ["ReplayOptions", "replay"]
