import os

import pytest

from mmdiag.errors import TraceError
from mmdiag.trace import TraceReader, scan, write_trace, TraceHeader, TraceRequest, MMItem
from conftest import make_trace, mmdiag_cli


def test_round_trip_and_stats(tmp_path):
    p = make_trace(tmp_path / "t.jsonl", n=8, rows=10)
    with TraceReader(p) as r:
        reqs = list(r)
        assert r.header.arrival == {"mode": "closed", "max_concurrency": 8}
    assert [q.rid for q in reqs] == [f"r{i:04d}" for i in range(8)]
    assert reqs[0].mm[0].shape == (10, 1176) and reqs[0].mm[0].nbytes == 10 * 1176 * 4
    header, st = scan(p)
    assert st.requests == 8 and st.mm_requests == 6 and st.modalities == {"image": 8}


def _with_line(tmp_path, line, lineno_offset=0):
    p = make_trace(tmp_path / "t.jsonl", n=3, rows=4)
    lines = open(p).read().splitlines()
    lines.insert(2, line)
    open(p, "w").write("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize("line, field", [
    ('{"rid": "x", "t": 0.0, "mm": [{"modality": "smell", "shape": [1, 2]}]}', "mm[0].modality"),
    ('{"rid": "x", "t": 0.0, "mm": [{"modality": "image", "shape": [0, 2]}]}', "mm[0].shape"),
    ('{"rid": "x", "t": 0.0, "mm": [{"modality": "image", "shape": [2, 2], "dtype": "int7"}]}', "mm[0].dtype"),
    ('{"t": 0.0}', "'rid'"),
    ('{"rid": "x", "t": -1}', "'t'"),
    ('{"rid": "x", "t": 0, "prompt_len": "long"}', "'prompt_len'"),
    ('{"rid": "r0000", "t": 0}', "duplicate"),
    ('{"rid": "x", "t": 0', "invalid JSON"),
])
def test_malformed_line_names_file_line_and_field(tmp_path, line, field):
    p = _with_line(tmp_path, line)
    with pytest.raises(TraceError) as e:
        scan(p)
    msg = str(e.value)
    assert f"{p}:3" in msg and field in msg


def test_bad_header_and_empty_file(tmp_path):
    p = tmp_path / "h.jsonl"
    p.write_text('{"schema": "other/9"}\n')
    with pytest.raises(TraceError, match=r"h.jsonl:1.*schema"):
        scan(str(p))
    e = tmp_path / "e.jsonl"
    e.write_text("")
    with pytest.raises(TraceError, match="empty"):
        scan(str(e))


def test_reader_streams_without_loading_whole_file(tmp_path):
    # A malformed line far down is only met when reached: the reader is lazy.
    p = make_trace(tmp_path / "t.jsonl", n=50, rows=2)
    with open(p, "a") as f:
        f.write("not json\n")
    with TraceReader(p) as r:
        it = iter(r)
        assert next(it).rid == "r0000"
        with pytest.raises(TraceError, match=":52"):
            list(it)


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "t.jsonl"

    def boom():
        yield TraceRequest("a", 0.0, 1, (MMItem("image", (1, 1)),))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_trace(str(out), TraceHeader(), boom())
    assert os.listdir(tmp_path) == []


def test_cli_malformed_trace_is_one_line_and_writes_nothing(tmp_path):
    p = _with_line(tmp_path, '{"rid": "x", "t": "soon"}')
    out = tmp_path / "run.json"
    r = mmdiag_cli("replay", p, "--tp", "2", "-o", str(out), timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert f"{p}:3" in r.stderr and "'t'" in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_line_cut_mid_object_reports_its_real_column(tmp_path, newline):
    cut = '{"rid": "x", "t": 0.0, "mm": ['          # 30 characters, cut mid-object
    p = make_trace(tmp_path / "t.jsonl", n=2, rows=4)
    with open(p, "a", newline="") as f:
        f.write(cut + newline)
    with pytest.raises(TraceError) as e:
        scan(p)
    msg = str(e.value)
    assert f"{p}:4" in msg and f"column {len(cut) + 1}" in msg and "truncated" in msg, msg


def test_bad_character_mid_line_reports_its_column(tmp_path):
    p = make_trace(tmp_path / "t.jsonl", n=2, rows=4)
    with open(p, "a") as f:
        f.write('{"rid": "x", "t": 0.0, @}\n')
    with pytest.raises(TraceError, match=r"column 24\)") as e:
        scan(p)
    assert "truncated" not in str(e.value)


def test_sigterm_while_writing_a_trace_leaves_nothing(tmp_path):
    """SIGTERM (as Ctrl-C) mid-write: exit 143, one line, no output and no temporary file beside it."""
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    p = subprocess.Popen([sys.executable, "-m", "mmdiag", "trace", "synth", "-n", "3000000", "-o",
                          str(tmp_path / "big.jsonl")], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not os.listdir(tmp_path) and time.time() < deadline:   # the temporary file is being written
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and err.strip() == "mmdiag: error: terminated by SIGTERM; nothing was written", err
    assert os.listdir(tmp_path) == []
