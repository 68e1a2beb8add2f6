"""Shared fixtures: small real traces and a way to run the CLI as a user does."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mmdiag.proc import stop_group  # noqa: F401 - the tests' one way to stop a launcher's group

from mmdiag.trace import MMItem, TraceHeader, TraceRequest, write_trace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_trace(path, n=24, rows=64, rate=None, concurrency=8, video_every=0, text_every=4, seed_t=0.0):
    """A trace with real Qwen2.5-VL row width but few rows, so tests stay fast."""
    arrival = {"mode": "poisson", "request_rate": rate} if rate else {"mode": "closed", "max_concurrency": concurrency}
    reqs = []
    for i in range(n):
        t = seed_t + (i / rate if rate else 0.0)
        if text_every and i % text_every == text_every - 1:
            mm = ()
        elif video_every and i % video_every == 0:
            mm = (MMItem("video", (rows * 4, 1176)),)
        else:
            mm = (MMItem("image", (rows, 1176)),) * (1 + i % 2)
        reqs.append(TraceRequest(f"r{i:04d}", t, 32 + i, mm))
    header = TraceHeader(source={"tool": "tests"}, model={"name": "Qwen2.5-VL", "image_token_id": 151655},
                         arrival=arrival)
    write_trace(str(path), header, iter(reqs))
    return str(path)


@pytest.fixture(autouse=True, scope="session")
def isolated_user_dirs(tmp_path_factory):
    """Nothing a test runs writes under the user's home: mmdiag's apply state (~/.local/state) and
    matplotlib's font cache (the HTML report's charts) go to test folders, for the whole session
    and every test (module-scoped fixtures apply patches too; rank processes and CLI subprocesses
    inherit the environment)."""
    d = tmp_path_factory.mktemp("mmdiag-state")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMDIAG_STATE_DIR", str(d))
        mp.setenv("MPLCONFIGDIR", str(tmp_path_factory.mktemp("matplotlib")))
        yield d


@pytest.fixture
def small_trace(tmp_path):
    return make_trace(tmp_path / "trace.jsonl")


def mmdiag_cli(*args, timeout=300, env=None, **kw):
    """Run `python -m mmdiag ...` in a fresh process, as a user would."""
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "mmdiag", *args], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=kw.pop("cwd", ROOT), **kw)
