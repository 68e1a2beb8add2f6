"""The tokenizer stage's two axes (issue 23): the content hash and reused segments.

Hashes are checked across real processes; the pool across a real reader process that
maps a segment (and one killed with SIGKILL while it does); the replay in real gloo ranks.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mmdiag.mmpath import hashing, items, shm
from mmdiag.vocab import HASHES
from conftest import make_trace, mmdiag_cli

HASH_IN_CHILD = """
import sys, torch
from mmdiag.mmpath import hashing, items
hashing.use(sys.argv[1])
for fill in (1.0, 2.0):
    print(items.hash_feature(torch.full((300, 1176), fill)))
"""


@pytest.mark.parametrize("name", HASHES)
def test_the_content_hash_is_the_same_in_every_process_and_tells_contents_apart(name):
    outs = [subprocess.run([sys.executable, "-c", HASH_IN_CHILD, name], capture_output=True, text=True,
                           check=True).stdout.split() for _ in range(2)]
    assert outs[0] == outs[1], "two processes hash the same bytes differently"
    same, other = (int(x) for x in outs[0])
    assert same != other, "different bytes got the same hash"
    hashing.use(name)
    try:
        assert items.hash_feature(torch.full((300, 1176), 1.0)) == same  # and this process agrees
        assert 0 <= same < 2 ** 64  # the width SGLang's pad value (hash % 2**30) is taken from
    finally:
        hashing.use("sha256")


def test_xxh3_is_a_different_function_from_sha256():
    t = torch.full((64, 64), 5.0)
    got = {}
    for name in HASHES:
        hashing.use(name)
        got[name] = items.hash_feature(t)
    hashing.use("sha256")
    assert len(set(got.values())) == len(HASHES)


def test_an_unknown_hash_is_refused_with_one_line():
    r = mmdiag_cli("replay", "nothing.jsonl", "--hash", "md5")
    assert r.returncode == 2 and "md5" in r.stderr and "sha256" in r.stderr


def _pool_segments(prefix):
    return sorted(glob.glob(os.path.join(shm.shm_dir(), prefix + "*")))


READER = """
import sys, time, torch
from mmdiag.mmpath import shm
h = shm.ShmHandle(sys.argv[1], (int(sys.argv[2]),), "uint8", int(sys.argv[2]), pooled=True)
fd = shm.open_segment(h)
t = shm.map_segment(fd, h)
print(int(t[0]), flush=True)
time.sleep(float(sys.argv[3]))
"""


def _reader(h, seconds):
    p = subprocess.Popen([sys.executable, "-c", READER, h.name, str(h.nbytes), str(seconds)],
                         stdout=subprocess.PIPE, text=True)
    first = int(p.stdout.readline())
    return p, first


def test_a_pooled_segment_is_reused_only_once_every_reader_let_go_even_one_killed(tmp_path):
    prefix = f"mmdiag-test-pool-{os.getpid()}-"
    pool = shm.SegmentPool(prefix, max_bytes=1 << 20)
    try:
        h1 = pool.write(torch.full((4096,), 7, dtype=torch.uint8))
        assert h1.pooled
        reader, first = _reader(h1, 60)
        assert first == 7
        pool.settle(h1)  # every reader has opened it (the barrier after shm_open)
        # The reader still maps it: the next feature must not land in its pages.
        h2 = pool.write(torch.full((4096,), 9, dtype=torch.uint8))
        assert h2.name != h1.name
        pool.settle(h2)
        os.kill(reader.pid, signal.SIGKILL)  # a rank that dies holding the mapping frees it too
        reader.wait(timeout=10)
        h3 = pool.write(torch.full((4096,), 11, dtype=torch.uint8))
        assert h3.name in (h1.name, h2.name), "a segment nobody maps any more was not reused"
        assert pool.created == 2 and pool.reused == 1
    finally:
        pool.close()
    assert _pool_segments(prefix) == [], "close left segments behind"


def test_the_pool_stays_within_its_bound_and_overflows_to_fresh_segments():
    prefix = f"mmdiag-test-bound-{os.getpid()}-"
    pool = shm.SegmentPool(prefix, max_bytes=3 * 4096)
    try:
        hs = [pool.write(torch.zeros(4096, dtype=torch.uint8)) for _ in range(5)]  # none settled: all in flight
        assert pool.nbytes <= 3 * 4096 and pool.created == 3 and pool.overflow == 2
        assert [h.pooled for h in hs] == [True] * 3 + [False] * 2
        for h in hs[3:]:  # the fresh ones are unlinked after delivery, as every release does
            shm.unlink_segment(h)
    finally:
        pool.close()
    assert _pool_segments(prefix) == []


@pytest.mark.slow
def test_replay_with_xxh3_and_pooled_segments_agrees_records_both_and_leaves_nothing(tmp_path):
    trace = make_trace(tmp_path / "t.jsonl", n=10, rows=64, concurrency=1, text_every=0)
    before = set(glob.glob(os.path.join(shm.shm_dir(), "mmdiag-*")))
    out = tmp_path / "run.json"
    r = mmdiag_cli("replay", trace, "--tp", "2", "--strategy", "shm", "--strategy", "precompute", "--transport", "shm",
                   "--hash", "xxh3", "--segments", "pool", "--tokenizer-workers", "3", "-q", "-o", str(out))
    assert r.returncode == 0, r.stderr
    run = json.loads(out.read_text())
    assert run["config"]["hash"] == "xxh3" and run["config"]["segments"] == "pool"
    assert run["config"]["tokenizer_workers"] == 3  # the stage's capacity is computed with 3 hashing threads
    for name, st in run["strategies"].items():
        assert st["ranks_agree"] is True, name
        assert st["tokenizer_ms"]["workers"] == 3, name
        facts = run["config"]["strategies"][name]["transport"]
        # 10 requests (15 features), one request in flight: a few segments serve them all
        assert facts["pool_created"] <= 4 and facts["pool_reused"] >= 11, facts
    assert set(glob.glob(os.path.join(shm.shm_dir(), "mmdiag-*"))) <= before


@pytest.mark.parametrize("version", ["0.5.9", "0.5.10rc0", "0.5.12.post1", "0.5.23"])
def test_the_replay_feeds_sha256_as_each_release_does(version):
    """The model's sha256 copies the feature twice where the release's tensor_hash does (concat,
    then .tobytes(): to 0.5.10rc0) and hashes it in place where the release does (0.5.10+): the
    fact is read against the wheel's own tensor_hash."""
    import ast
    from sglang_wheels import pristine
    from mmdiag.sglang.facts import hashes_in_place
    tree = ast.parse((pristine(version) / "srt/managers/mm_utils.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "tensor_hash")
    copies = any(isinstance(n, ast.Attribute) and n.attr == "tobytes" for n in ast.walk(fn))
    assert hashes_in_place(version) is not copies
    hashing.use("sha256", in_place=hashes_in_place(version))
    try:
        assert hashing.zero_copy() is not copies
        t = torch.full((64, 1176), 2.0)
        hashing.use("sha256", in_place=False)
        assert items.hash_feature(t) == hashing.data_hash(t.numpy().tobytes())  # the same hash either way
    finally:
        hashing.use("sha256")
