"""Process lifecycle helpers shared by the commands, the benchmarks and the tests."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from typing import Iterator

from .errors import Terminated


def stop_group(p: subprocess.Popen, timeout: float = 20) -> None:
    """End a process started with start_new_session and everything under it:
    SIGTERM to its group (it cleans up), then SIGKILL if it has not exited in `timeout`."""
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@contextlib.contextmanager
def on_sigterm(message: str) -> Iterator[None]:
    """Inside the block SIGTERM raises Terminated(message) (exit 143), so the `finally`
    clauses that stop child processes and remove temporary files run, as for Ctrl-C.
    Only the main thread receives signals: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise Terminated(message)

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
