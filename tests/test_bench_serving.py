"""bench_serving's vocabulary, checked against the wheels' own source, and `trace synth` speaking it."""
import ast
import json
import zipfile
from typing import Tuple

import pytest
from click.testing import CliRunner

from mmdiag.cli import main
from mmdiag.errors import ProfileError
from mmdiag.ingest import bench_serving as bs
from mmdiag.trace import scan, TraceReader
from mmdiag.workloads import ImageDataset, feature_shape, load_model, synthesize_images
from conftest import mmdiag_cli
from sglang_wheels import wheel

# One wheel per bench_serving layout: module sglang/bench_serving.py, then sglang/benchmark/.
LAYOUTS = {"0.5.4.post1": "sglang/bench_serving.py", "0.5.9": "sglang/bench_serving.py",
           "0.5.23": "sglang/benchmark/datasets/image.py"}
ARGS = {"0.5.4.post1": "sglang/bench_serving.py", "0.5.9": "sglang/bench_serving.py",
        "0.5.23": "sglang/benchmark/serving.py"}


def _wheel_source(version: str, member: str) -> ast.Module:
    with zipfile.ZipFile(wheel(version)) as z:
        return ast.parse(z.read(member).decode())


def _upstream_parse(version: str):
    """The wheel's own parse_image_resolution, compiled alone (it needs nothing but Tuple)."""
    tree = _wheel_source(version, LAYOUTS[version])
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "parse_image_resolution")
    ns = {"Tuple": Tuple}
    exec(compile(ast.Module([fn], []), LAYOUTS[version], "exec"), ns)
    return ns["parse_image_resolution"]


def _argparse_defaults(version: str) -> dict[str, object]:
    out = {}
    for node in ast.walk(_wheel_source(version, ARGS[version])):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args \
                and isinstance(node.args[0], ast.Constant):
            for kw in node.keywords:
                if kw.arg == "default" and isinstance(kw.value, ast.Constant):
                    out[node.args[0].value.lstrip("-").replace("-", "_")] = kw.value.value
    return out


@pytest.mark.parametrize("version", list(LAYOUTS))
def test_resolutions_and_defaults_match_the_wheel(version):
    upstream = _upstream_parse(version)
    for text in list(bs.presets()) + ["700x1120", "1080x1920", " 360X640 ", "28x28"]:
        ours = bs.parse_image_resolution(text)
        assert ours.fixed and ours.min_wh == tuple(upstream(text)), text
    for bad in ("8k", "1080x", "0x5", "axb"):
        with pytest.raises(ValueError):
            upstream(bad)
        with pytest.raises(ProfileError, match="not a resolution"):
            bs.parse_image_resolution(bad)
    args = _argparse_defaults(version)
    for key, value in bs.defaults().items():
        assert args[key] == value, (version, key)


def test_random_resolution_bounds_as_0_5_23_reads_them():
    r = bs.parse_image_resolution("random:360x640-720x1280")
    assert (r.min_wh, r.max_wh, r.fixed) == ((640, 360), (1280, 720), False)
    with pytest.raises(ProfileError, match="exceeds"):
        bs.parse_image_resolution("random:720x1280-360x640")


def _synth(n=40, **kw):
    ds = ImageDataset.from_options(**{k: kw.pop(k) for k in list(kw) if k in ImageDataset.__dataclass_fields__})
    header, reqs = synthesize_images("qwen2.5-vl", n, ds, **kw)
    return header, list(reqs)


def test_image_dataset_shapes_come_from_model_geometry():
    qwen = load_model("qwen2.5-vl")
    header, reqs = _synth(image_count=2, image_resolution="720p")
    want = feature_shape(qwen, {"modality": "image", "width": 1280, "height": 720})
    assert all([it.shape for it in r.mm] == [want, want] for r in reqs)
    # 700 high, 1120 wide: 4000 rows of 1176 (SGLANG_NOTES), whichever way round.
    for res in ("700x1120", "1120x700"):
        _, reqs = _synth(n=1, image_resolution=res)
        assert reqs[0].mm[0].shape == (4000, 1176)
    _, reqs = _synth(n=60, image_count=3, random_image_count=True, image_resolution="random:100x100-400x600")
    assert {len(r.mm) for r in reqs} == {1, 2, 3}
    assert len({r.mm[0].shape for r in reqs}) > 10


def test_arrivals_and_text_lengths_follow_bench_serving():
    # Defaults: --request-rate inf, no concurrency cap: every request at time 0.
    header, reqs = _synth(n=20)
    assert header.arrival == {"mode": "closed", "max_concurrency": 20} and {r.t for r in reqs} == {0.0}
    assert {r.prompt_len for r in reqs} <= set(range(1, 1025)) and len({r.prompt_len for r in reqs}) > 5
    _, reqs = _synth(n=30, random_input_len=100, random_range_ratio=1.0)
    assert {r.prompt_len for r in reqs} == {100}
    # Poisson at R: the first at 0 (bench_serving sends it at once), mean gap near 1/R.
    header, reqs = _synth(n=400, request_rate=20)
    assert header.arrival == {"mode": "poisson", "request_rate": 20.0} and reqs[0].t == 0.0
    assert 15 < reqs[-1].t < 25
    # Both: a closed loop that admits no request before its Poisson time.
    header, reqs = _synth(n=10, request_rate="8", max_concurrency=4)
    assert header.arrival == {"mode": "closed", "max_concurrency": 4, "request_rate": 8.0}
    assert reqs[-1].t > 0
    assert header.source["bench_serving"]["request_rate"] == 8.0


@pytest.mark.parametrize("opts, msg", [
    (("--image-resolution", "8k"), "not a resolution"),
    (("--image-count", "0"), "'--image-count': 0 is not in the range 1<=x"),
    (("--image-resolution", "360p", "--profile", "mixed"), "not both"),
    (("--request-rate", "fast"), "--request-rate 'fast' is not a number"),
    (("--request-rate", "-1"), "must be positive"),
    (("--random-range-ratio", "2", "--image-count", "1"), "--random-range-ratio"),
    (("--model", "qwen2.5-vl"), "--model goes with the image options"),
])
def test_bad_bench_options_are_one_line_errors(tmp_path, opts, msg):
    out = tmp_path / "t.jsonl"
    r = CliRunner().invoke(main, ["trace", "synth", *opts, "-n", "2", "-o", str(out)])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_cli_writes_the_benchmarked_workload(tmp_path):
    out = tmp_path / "t.jsonl"
    r = mmdiag_cli("trace", "synth", "--image-resolution", "360p", "--image-count", "2", "--num-prompts", "5",
                   "--request-rate", "inf", "--max-concurrency", "3", "-o", str(out))
    assert r.returncode == 0, r.stderr
    header, st = scan(str(out))
    assert st.requests == 5 and st.items == 10 and header.arrival == {"mode": "closed", "max_concurrency": 3}
    with TraceReader(str(out)) as tr:
        shapes = {it.shape for req in tr for it in req.mm}
    assert shapes == {feature_shape(load_model("qwen2.5-vl"), {"modality": "image", "width": 640, "height": 360})}
    assert json.loads(open(out).readline())["source"]["bench_serving"]["image_resolution"] == "360p"
