"""`mmdiag replay --impl sglang`: the installed SGLang's own code in real gloo ranks,
before and after `mmdiag apply`, on a real release wheel."""
import json
import os

from sglang_wheels import site_packages
from conftest import make_trace, mmdiag_cli


def test_replay_runs_the_installed_code_before_and_after_apply(tmp_path):
    pkg = site_packages("0.5.5", tmp_path / "site")  # broadcast-always: the regression itself
    trace = make_trace(tmp_path / "t.jsonl", n=12, rows=16)
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    r = mmdiag_cli("replay", trace, "--tp", "2", "--impl", "sglang", "--sglang", str(pkg), "-q", "-o", str(before))
    assert r.returncode == 0, r.stderr
    r = mmdiag_cli("apply", "batch", "--sglang", str(pkg), "--yes")
    assert r.returncode == 0, r.stderr
    r = mmdiag_cli("replay", trace, "--tp", "2", "--impl", "sglang", "--sglang", str(pkg), "-q", "-o", str(after))
    assert r.returncode == 0, r.stderr
    b, a = json.loads(before.read_text()), json.loads(after.read_text())
    assert list(b["strategies"]) == ["commit"] and list(a["strategies"]) == ["batch"]
    assert b["config"]["sglang"]["variant"] == "broadcast-always" and a["config"]["sglang"]["patched"] == "batch"
    mm = b["trace"]["mm_requests"]
    # The release's own path: one collective per multimodal request; the patch: one per loop iteration.
    assert b["strategies"]["commit"]["ranks"][0]["replay"]["collectives"] == mm
    assert 1 <= a["strategies"]["batch"]["ranks"][0]["replay"]["collectives"] < mm
    # Timed by mmdiag's own primitives: the entry rank materializes and pickles, the other unpickles.
    r0, r1 = b["strategies"]["commit"]["ranks"][:2]
    assert min(r0["phases_ms"]["from_dict"], r0["phases_ms"]["pickle"], r1["phases_ms"]["unpickle"]) > 0
    assert r1["phases_ms"]["broadcast"] > 0
    for run in (b, a):
        (s,) = run["strategies"].values()
        assert s["ranks_agree"] is True
        assert s["ranks"][1]["phases_ms"]["from_dict"] == 0  # non-entry ranks receive, never hash


def test_strategy_option_is_refused_with_impl_sglang(tmp_path):
    pkg = site_packages("0.5.6", tmp_path / "site")
    trace = make_trace(tmp_path / "t.jsonl", n=2, rows=4)
    r = mmdiag_cli("replay", trace, "--impl", "sglang", "--sglang", str(pkg), "--strategy", "batch", timeout=60)
    assert r.returncode == 2 and "does not apply with --impl sglang" in r.stderr


def test_the_installed_tokenizer_step_hashes_before_its_scheduler(tmp_path):
    """The plug-in hands over the install's own items and runs its tokenizer step: with
    precompute applied, non-entry ranks skip hashing and the hashing shows as tokenizer time."""
    pkg = site_packages("0.5.4.post1", tmp_path / "site")  # per-rank: every rank hashes
    r = mmdiag_cli("apply", "precompute", "--sglang", str(pkg), "--yes")
    assert r.returncode == 0, r.stderr
    trace = make_trace(tmp_path / "t.jsonl", n=8, rows=64)
    out = tmp_path / "run.json"
    r = mmdiag_cli("replay", trace, "--tp", "2", "--impl", "sglang", "--sglang", str(pkg), "-q", "-o", str(out))
    assert r.returncode == 0, r.stderr
    (s,) = json.loads(out.read_text())["strategies"].values()
    assert s["name"] == "precompute" and s["ranks_agree"] is True
    assert s["tokenizer_ms"]["tokenizer_hash"] > 0


def test_verify_of_a_setting_runs_the_release_code_with_it_in_the_ranks(tmp_path):
    """0.5.23 ships precompute behind SGLANG_MM_PRECOMPUTE_HASH: `apply --verify precompute`
    writes nothing and replays the release's own code (its item classes, its hashing pool,
    its scheduler methods) with the variable off, then on, in the rank processes."""
    from sglang_wheels import tree_bytes
    from mmdiag.workflows.verify import verify
    pkg = site_packages("0.5.23", tmp_path / "site")
    files = tree_bytes(pkg)
    trace = make_trace(tmp_path / "t.jsonl", n=8, rows=32)
    res = verify(str(pkg), "precompute", trace, 2, repeat=1, keep_runs=str(tmp_path))
    assert tree_bytes(pkg) == files and res.applied.status == "settings"
    (b,), (a,) = res.before.to_dict()["strategies"].values(), res.after.to_dict()["strategies"].values()
    assert (b["name"], a["name"]) == ("revert", "precompute")
    for s in (a, b):
        assert s["ranks_agree"] is True and s["ranks"][0]["replay"]["collectives"] == 0  # the flag stays off
    assert a["tokenizer_ms"]["tokenizer_hash"] > 0 and not b["tokenizer_ms"].get("tokenizer_hash")


def test_the_installed_shm_patch_moves_features_by_shared_memory_in_the_replay(tmp_path):
    """`apply shm` on a release whose recv broadcast pickles features: the replay runs the
    patch's tokenizer side (its own hashing before the window, its segment write inside it),
    so the recv broadcast carries handles and no scheduler rank hashes (the patched path
    measured, not the release with half the patch)."""
    pkg = site_packages("0.5.9", tmp_path / "site")
    r = mmdiag_cli("apply", "shm", "--sglang", str(pkg), "--yes")
    assert r.returncode == 0, r.stderr
    rows = 256
    trace = make_trace(tmp_path / "t.jsonl", n=8, rows=rows)
    out = tmp_path / "run.json"
    seg = tmp_path / "segments"
    seg.mkdir()
    r = mmdiag_cli("replay", trace, "--tp", "2", "--impl", "sglang", "--sglang", str(pkg), "-q", "-o", str(out),
                   env={"MMDIAG_STATE_DIR": str(tmp_path / "state"), "MMDIAG_SHM_DIR": str(seg)})
    assert r.returncode == 0, r.stderr
    assert os.listdir(seg) == []  # the patch's reused segments went with the replay
    (s,) = json.loads(out.read_text())["strategies"].values()
    assert s["name"] == "shm" and s["ranks_agree"] is True
    tok = s["tokenizer_ms"]
    assert tok["tokenizer_hash"] > 0 and tok["tokenizer_shm"] > 0
    for rank in s["ranks"]:
        assert rank["phases_ms"]["from_dict"] < tok["tokenizer_hash"]  # materialized from handles, never hashed
    # the recv broadcast carried handles: far fewer bytes than the features it delivered
    feature_bytes = json.loads(out.read_text())["trace"]["mm_bytes"]
    assert s["ranks"][1]["replay"]["recv_bytes"] < feature_bytes / 4


def test_a_shared_memory_release_is_replayed_with_its_transport(tmp_path):
    """0.5.10+ moves features by shared memory: `--impl sglang` replays its own code with
    features written once into segments (the release's item classes in the segments' place
    once mapped), not pickled into the recv broadcast; `--transport pickle` still runs."""
    import glob
    import os
    from mmdiag.mmpath import shm
    pkg = site_packages("0.5.23", tmp_path / "site")
    trace = make_trace(tmp_path / "t.jsonl", n=8, rows=256)
    before = set(glob.glob(os.path.join(shm.shm_dir(), "mmdiag-*")))
    runs = {}
    for tr in ("default", "pickle"):
        out = tmp_path / f"{tr}.json"
        extra = [] if tr == "default" else ["--transport", tr]
        r = mmdiag_cli("replay", trace, "--tp", "2", "--impl", "sglang", "--sglang", str(pkg), *extra,
                       "-q", "-o", str(out))
        assert r.returncode == 0, r.stderr
        runs[tr] = json.loads(out.read_text())
    assert set(glob.glob(os.path.join(shm.shm_dir(), "mmdiag-*"))) <= before
    assert runs["default"]["config"]["transport"] == "shm" and runs["pickle"]["config"]["transport"] == "pickle"
    (s,), (p,) = runs["default"]["strategies"].values(), runs["pickle"]["strategies"].values()
    assert s["ranks_agree"] is True and p["ranks_agree"] is True
    assert s["tokenizer_ms"]["tokenizer_shm"] > 0 and s["ranks"][1]["phases_ms"]["shm_map"] > 0
    assert s["ranks"][1]["replay"]["recv_bytes"] < p["ranks"][1]["replay"]["recv_bytes"] / 4


def test_each_release_moves_features_by_its_own_code_with_its_per_rank_clone(tmp_path):
    """`--impl sglang` on a shared-memory release runs the release's own transport: its
    ShmPointerMMData writes the segments, each rank opens them when it unpickles a handle, its
    receive (0.5.12.post1: recv_requests' barrier and unwrap; 0.5.21: _finalize_shm_features)
    and materialize take the features out. 0.5.10 .. 0.5.20 clone every feature on every rank,
    0.5.21+ map it copy-on-write: the clone's CPU shows in shm_map per request on every rank of
    0.5.12.post1 only. 0.5.9 writes segments too, but its entry rank copies each feature out
    as it unpickles it and the recv broadcast pickles the bytes. Nothing is left in /dev/shm;
    the release's way is not overridden."""
    import glob

    def segments():  # the replay's names, and the release's own (psm_: Python's; sgl_shm_: 0.5.23's)
        return {p for pat in ("mmdiag-*", "psm_*", "sgl_shm_*") for p in glob.glob(f"/dev/shm/{pat}")}
    before = segments()
    trace = make_trace(tmp_path / "t.jsonl", n=6, rows=4000, concurrency=1, text_every=0)
    runs = {}
    for v in ("0.5.9", "0.5.12.post1", "0.5.21"):
        pkg = site_packages(v, tmp_path / v)
        out = tmp_path / f"{v}.json"
        r = mmdiag_cli("replay", trace, "--tp", "2", "--impl", "sglang", "--sglang", str(pkg), "-q", "-o", str(out))
        assert r.returncode == 0, r.stderr
        runs[v] = json.loads(out.read_text())
    assert segments() <= before
    map_ms = {}
    for v, run in runs.items():
        (s,) = run["strategies"].values()
        assert s["ranks_agree"] is True
        assert run["config"]["strategies"][s["name"]]["transport"]["code"] == "sglang"
        map_ms[v] = [rk["phases_ms"]["shm_map"] / s["mm_requests"] for rk in s["ranks"]]
        assert s["tokenizer_ms"]["tokenizer_shm"] > 0  # the release's own segment write, every one of them
    assert runs["0.5.12.post1"]["config"]["shm_map"] == "clone" and "shm_map" not in runs["0.5.21"]["config"]
    assert runs["0.5.9"]["config"]["transport"] == "pickle"
    (old,) = runs["0.5.9"]["strategies"].values()
    assert old["ranks"][0]["phases_ms"]["shm_map"] > 0 and old["ranks"][1]["phases_ms"]["shm_map"] == 0
    assert old["ranks"][1]["replay"]["recv_bytes"] > runs["0.5.9"]["trace"]["mm_bytes"] / 2  # the bytes, pickled
    # an 18.8 MB copy per rank against a map: an order of magnitude apart on any host
    assert min(map_ms["0.5.12.post1"]) > 5 * max(map_ms["0.5.21"]), map_ms
    # how the release takes its features out is its own: the model's setting is refused
    r = mmdiag_cli("replay", trace, "--tp", "2", "--impl", "sglang", "--sglang", str(tmp_path / "0.5.21" / "site-packages" / "sglang"),
                   "--shm-map", "clone", "-q", "-o", str(tmp_path / "x.json"))
    assert r.returncode != 0 and "--shm-map" in r.stderr and not (tmp_path / "x.json").exists()


def test_skipping_the_hash_is_safe_only_where_it_is_drawn_once(tmp_path):
    """SGLANG_MM_SKIP_COMPUTE_HASH draws a random hash where an item is hashed. On a release
    that materializes on every rank (0.5.9, flag off) each rank draws its own, and the ranks
    disagree (mmdiag says so and exits non-zero); with SGLANG_MM_PRECOMPUTE_HASH=1 the
    tokenizer draws it once, hash and pad value travel with the item, and the ranks agree."""
    pkg = site_packages("0.5.9", tmp_path / "site")
    trace = make_trace(tmp_path / "t.jsonl", n=6, rows=32)
    alone, once = tmp_path / "alone.json", tmp_path / "once.json"
    r = mmdiag_cli("replay", trace, "--tp", "2", "--impl", "sglang", "--sglang", str(pkg), "-q", "-o", str(alone),
                   env={"SGLANG_MM_SKIP_COMPUTE_HASH": "1"})
    assert r.returncode != 0 and "different hashes or pad values" in r.stderr
    assert json.loads(alone.read_text())["strategies"]["revert"]["ranks_agree"] is False
    r = mmdiag_cli("replay", trace, "--tp", "2", "--impl", "sglang", "--sglang", str(pkg), "-q", "-o", str(once),
                   env={"SGLANG_MM_SKIP_COMPUTE_HASH": "1", "SGLANG_MM_PRECOMPUTE_HASH": "1"})
    assert r.returncode == 0, r.stderr
    (s,) = json.loads(once.read_text())["strategies"].values()
    assert s["name"] == "precompute" and s["ranks_agree"] is True


def test_skip_hash_is_refused_on_a_release_that_does_not_read_it(tmp_path):
    pkg = site_packages("0.5.7", tmp_path / "site")
    trace = make_trace(tmp_path / "t.jsonl", n=2, rows=4)
    r = mmdiag_cli("replay", trace, "--tp", "2", "--impl", "sglang", "--sglang", str(pkg), "--skip-hash", "-q",
                   timeout=120)
    assert r.returncode != 0 and "does not read SGLANG_MM_SKIP_COMPUTE_HASH (from 0.5.8)" in r.stderr
    assert r.stderr.count("\n") <= 3, r.stderr  # a one-line error, not a traceback per rank
