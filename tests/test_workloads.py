import pytest

from mmdiag.errors import ProfileError
from mmdiag.trace import scan
from mmdiag.workloads import feature_shape, load_model, load_workload, synthesize, synth_to_file, workload_names, smart_resize


QWEN = load_model("qwen2.5-vl")


def test_qwen_geometry_matches_upstream_figures():
    # SGLANG_NOTES: a 1120x700 image gives 80x50 = 4,000 rows of 1176 floats (~18.8 MB).
    shape = feature_shape(QWEN, {"modality": "image", "width": 1120, "height": 700})
    assert shape == (4000, 1176)
    assert shape[0] * shape[1] * 4 == 18_816_000
    # Sides round to multiples of 28; video folds 2 frames into a row.
    assert smart_resize(701, 1119, 28, 3136, 12845056) == (700, 1120)
    v = feature_shape(QWEN, {"modality": "video", "width": 640, "height": 360, "frames": 32})
    assert v == (16 * 46 * 26, 1176)


def test_bundled_profiles_cover_the_incident():
    names = workload_names()
    assert {"small-image-c96", "video-large", "mixed"} <= set(names)
    small = load_workload("small-image-c96")
    assert small.data["arrival"] == {"mode": "closed", "max_concurrency": 96}


def test_synthesis_is_deterministic_and_follows_arrival_process(tmp_path):
    wl = load_workload("mixed")
    a = [r.to_json() for r in synthesize(wl, 50, seed=3)[1]]
    b = [r.to_json() for r in synthesize(wl, 50, seed=3)[1]]
    c = [r.to_json() for r in synthesize(wl, 50, seed=4)[1]]
    assert a == b and a != c
    ts = [r["t"] for r in a]
    assert ts == sorted(ts) and ts[-1] > 0
    header, reqs = synthesize(wl, 10, max_concurrency=7)
    assert header.arrival == {"mode": "closed", "max_concurrency": 7}
    assert all(r.t == 0.0 for r in reqs)
    # 400 requests at 24 req/s take about 400/24 s.
    header, reqs = synthesize(wl, 400, request_rate=24.0, seed=1)
    last = list(reqs)[-1].t
    assert 12 < last < 22


def test_synth_writes_a_valid_trace(tmp_path):
    out = tmp_path / "t.jsonl"
    assert synth_to_file("video-large", 3, str(out)) == 3
    header, st = scan(str(out))
    assert header.source["profile"] == "video-large" and st.modalities == {"video": 3}


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(ProfileError, match="small-image-c96"):
        load_workload("nope")
