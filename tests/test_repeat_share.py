"""`trace synth --repeat-share`: a share of multimodal requests repeats a recent request's images."""
from __future__ import annotations

import json

from mmdiag.trace import TraceReader
from conftest import mmdiag_cli


def _items(path):
    with TraceReader(str(path)) as r:
        return [tuple((it.shape, it.content) for it in tr.mm) for tr in r if tr.mm]


def test_repeat_share_repeats_items_and_keeps_the_rest(tmp_path):
    plain, none, rep = tmp_path / "p.jsonl", tmp_path / "n.jsonl", tmp_path / "r.jsonl"
    for out, extra in ((plain, []), (none, ["--repeat-share", "0"]), (rep, ["--repeat-share", "0.5"])):
        r = mmdiag_cli("trace", "synth", "--profile", "mixed", "-n", "80", "-o", str(out), *extra)
        assert r.returncode == 0, r.stderr
    fresh = _items(none)
    contents = [c for req in fresh for _shape, c in req]
    assert len(set(contents)) == len(contents)                    # share 0: every image distinct
    assert [tuple(s for s, _ in req) for req in fresh] == [tuple(s for s, _ in req) for req in _items(plain)]
    repeated = _items(rep)
    seen, repeats = set(), 0
    for req in repeated:
        if req in seen:
            repeats += 1                                          # same shapes and content ids as before
        seen.add(req)
    assert 0.3 * len(repeated) < repeats < 0.7 * len(repeated)
    assert json.loads(rep.read_text().splitlines()[0])["source"]["repeat_share"] == 0.5


def test_bad_repeat_share_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "t.jsonl"
    r = mmdiag_cli("trace", "synth", "-n", "4", "--repeat-share", "1.5", "-o", str(out))
    assert r.returncode == 2 and r.stderr.startswith("mmdiag: error: ") and len(r.stderr.splitlines()) == 1
    assert not out.exists()


def test_content_ids_are_checked(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"schema": "mmdiag.trace/1"}\n'
                 '{"rid": "a", "t": 0, "prompt_len": 1, "mm": [{"modality": "image", "shape": [2, 3], "content": -1}]}\n')
    r = mmdiag_cli("trace", "info", str(p))
    assert r.returncode != 0 and "mm[0].content" in r.stderr
