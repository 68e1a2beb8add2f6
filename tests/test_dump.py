"""`mmdiag trace from-dump`: SGLang request dumps (built with a real wheel's own classes,
see sglang_dumps.py) with real encoded images -> a trace; hostile and broken dumps refused."""
import base64
import io
import os
import pickle

import pytest
from click.testing import CliRunner
from PIL import Image

from mmdiag.cli import main
from mmdiag.ingest.dump import convert, load_dump, DumpError
from mmdiag.ingest.media import image_size, resolve_image
from mmdiag.trace import TraceReader
from mmdiag.workloads import feature_shape, load_model
from sglang_dumps import make_dump

QWEN = load_model("qwen2.5-vl")


def encoded(fmt, w, h, **kw):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 90)).save(buf, fmt, **kw)
    return buf.getvalue()


def data_uri(fmt, w, h, **kw):
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(encoded(fmt, w, h, **kw)).decode()


@pytest.mark.parametrize("fmt, kw", [("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}),
                                     ("JPEG", {"exif": b"Exif\x00\x00" + b"\x00" * 60000}),
                                     ("GIF", {}), ("WEBP", {}), ("WEBP", {"lossless": True}), ("BMP", {})])
def test_image_size_from_real_encodings(fmt, kw):
    for w, h in ((1120, 700), (33, 517)):
        assert image_size(encoded(fmt, w, h, **kw)) == (w, h)
    assert image_size(b"\x89PNG\r\n\x1a\n trunc") is None and image_size(b"not an image") is None


def mp4(path, w, h, frames, fps):
    """A real MPEG-4 video (PyAV), moov after mdat as encoders write it by default."""
    import av
    import numpy as np
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), i * 7 % 255, np.uint8), format="rgb24")
            c.mux(s.encode(frame))
        c.mux(s.encode())
    return str(path)


def test_video_shape_from_the_file_and_the_processor_sampling(tmp_path):
    clip = mp4(tmp_path / "clip.mp4", 320, 240, 30, 10)          # 3 s
    uri = "data:video/mp4;base64," + base64.b64encode(open(clip, "rb").read()).decode()
    dump = make_dump("0.5.23", tmp_path / "d.pkl", [
        {"rid": "v1", "created": 1.0, "text": "a", "images": [], "videos": [clip]},
        {"rid": "v2", "created": 2.0, "text": "b", "images": [], "videos": [uri]},
        {"rid": "v3", "created": 3.0, "text": "c", "images": [], "videos": ["https://example.com/v.mp4"]}],
        server_args="dict")
    out = tmp_path / "t.jsonl"
    conv = convert([dump], str(out))
    # 3 s at 2 fps -> 6 frames, 3 rows of frame pairs; 240x320 is under the 100352-pixel video
    # floor, so it scales up to 280x392: 3 * (280/14) * (392/14) = 1680 rows of 1176.
    assert [it.shape for r in _read(out)[1] for it in r.mm] == [(1680, 1176)] * 2
    assert conv.requests == 2 and any("video given as a URL" in k for k in conv.skipped)


def test_long_video_frames_are_capped_and_shrunk():
    from mmdiag.workloads import sampled_frames
    assert sampled_frames(QWEN, 30, 3.0) == 6 and sampled_frames(QWEN, 1, 0.04) is None
    n = sampled_frames(QWEN, 30 * 600, 600.0)                   # 10 minutes: 1200 at 2 fps, capped
    assert n == 768
    rows = feature_shape(QWEN, {"modality": "video", "width": 1920, "height": 1080, "frames": n})[0]
    # Per frame at most 90316800 / 768 * 2 = 235200 pixels: 1080p shrinks to 336x644 (24x46 patches).
    assert rows == 384 * 24 * 46


def test_header_far_into_a_base64_image_is_still_found():
    # Three 64 KiB APP2 segments before the frame header: past the prefix decoded first.
    jpeg = encoded("JPEG", 1120, 700)
    app = b"\xff\xe2" + (65535).to_bytes(2, "big") + b"\x00" * 65533
    big = jpeg[:2] + app * 3 + jpeg[2:]
    assert image_size(big) == (1120, 700)
    for ref in (base64.b64encode(big).decode(), "data:image/jpeg;base64," + base64.b64encode(big).decode()):
        assert resolve_image(ref).size == (1120, 700)


def _read(path):
    with TraceReader(str(path)) as r:
        return r.header, list(r)


def test_old_release_dump_converts_with_real_sizes(tmp_path):
    jpeg = tmp_path / "cat.jpg"
    jpeg.write_bytes(encoded("JPEG", 640, 360))
    bare = base64.b64encode(encoded("PNG", 1120, 700)).decode()
    reqs = [
        {"rid": "late", "created": 1000.75, "text": "x" * 400, "images": [data_uri("PNG", 1120, 700)]},
        {"rid": "early", "created": 1000.25, "text": "hi", "images": [str(jpeg), {"url": bare}],
         "meta_info": {"id": "early", "prompt_tokens": 5000}},
        {"rid": "text", "created": 1000.5, "input_ids": list(range(77)), "images": []},
        {"rid": "pil", "created": 1001.0, "text": "", "images": [{"pil": [1120, 700]}]},
    ]
    dump = make_dump("0.5.4.post1", tmp_path / "dump.pkl", reqs)      # ServerArgs dataclass of 0.5.4.post1
    out = tmp_path / "t.jsonl"
    conv = convert([dump], str(out))
    assert (conv.requests, conv.model, conv.model_path) == (4, "qwen2.5-vl", "Qwen/Qwen2.5-VL-7B-Instruct")
    header, got = _read(out)
    assert [r.rid for r in got] == ["early", "text", "late", "pil"] and [r.t for r in got] == [0.0, 0.25, 0.5, 0.75]
    assert got[3].mm[0].shape == (4000, 1176)                 # a PIL image's size from its pickled state
    assert header.arrival == {"mode": "recorded"} and header.model["name"] == "Qwen2.5-VL"
    assert got[2].mm[0].shape == (4000, 1176)                 # 1120x700 -> 4000 rows of 1176
    small = feature_shape(QWEN, {"modality": "image", "width": 640, "height": 360})
    assert [it.shape for it in got[0].mm] == [small, (4000, 1176)]
    # prompt_tokens counts the expanded image tokens (rows / merge^2); the trace keeps the text.
    assert got[0].prompt_len == 5000 - (small[0] + 4000) // 4
    assert got[1].prompt_len == 77 and got[1].mm == ()
    assert got[2].prompt_len == 100


def test_new_release_folder_streams_dedupes_and_counts_urls(tmp_path):
    folder = tmp_path / "dumps" / "host-a"
    folder.mkdir(parents=True)
    url = {"url": "https://example.com/cat.png"}
    one = {"rid": "r1", "created": 5.0, "text": "a", "images": [data_uri("JPEG", 1120, 700)]}
    make_dump("0.5.23", folder / "1.pkl", [one, {"rid": "r2", "created": 6.0, "text": "b", "images": [url]}],
              server_args="dict")                             # 0.5.2x may store server_args as a dict
    make_dump("0.5.23", folder / "2.pkl", [one, {"rid": "r3", "created": 7.0, "text": "c", "images": ["%%%"]}],
              server_args="dict")
    out = tmp_path / "t.jsonl"
    conv = convert([str(tmp_path / "dumps")], str(out))
    assert conv.files == 2 and conv.requests == 1
    assert sum(conv.skipped.values()) == 3 and any("URL" in k for k in conv.skipped)
    assert any("could not be read" in k for k in conv.skipped) and any("duplicate" in k for k in conv.skipped)
    conv = convert([str(tmp_path / "dumps")], str(out), default_size=(1120, 700))
    assert conv.requests == 2 and conv.defaulted == 1
    assert [it.shape for r in _read(out)[1] for it in r.mm] == [(4000, 1176)] * 2


def test_msgspec_server_args_and_odd_created_times(tmp_path):
    """0.5.23 pickles ServerArgs through _rebuild_server_args(cls, fields, bookkeeping): the model
    comes from its fields. A request whose created_time is NaN or inf is left out and counted
    (the trace's arrivals must stay ordered and finite)."""
    img = [data_uri("PNG", 1120, 700)]
    dump = make_dump("0.5.23", tmp_path / "d.pkl", [
        {"rid": "a", "created": 2.0, "text": "a", "images": img},
        {"rid": "nan", "created": float("nan"), "text": "b", "images": img},
        {"rid": "inf", "created": float("inf"), "text": "c", "images": img}], server_args="msgspec")
    assert b"_rebuild_server_args" in open(dump, "rb").read()
    out = tmp_path / "t.jsonl"
    conv = convert([dump], str(out))
    assert (conv.model, conv.model_path, conv.requests) == ("qwen2.5-vl", "Qwen/Qwen2.5-VL-7B-Instruct", 1)
    assert conv.skipped == {"request without a created_time": 2}
    assert [r.rid for r in _read(out)[1]] == ["a"]


def test_dump_without_server_args_needs_model(tmp_path):
    dump = make_dump("0.5.23", tmp_path / "d.pkl", [{"rid": "a", "created": 1.0, "text": "a", "images": []}],
                     server_args="none")
    with pytest.raises(DumpError, match="--model"):
        convert([dump], str(tmp_path / "t.jsonl"))
    assert convert([dump], str(tmp_path / "t.jsonl"), model="qwen2.5-vl").requests == 1


class Payload:
    """Would create a file when unpickled by a plain pickle.load."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _cli(*args):
    r = CliRunner().invoke(main, ["trace", "from-dump", *args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return r


def test_hostile_truncated_and_foreign_dumps_are_one_line_errors(tmp_path):
    victim = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pkl"
    hostile.write_bytes(pickle.dumps({"server_args": None, "requests": [(Payload(str(victim)), {}, 1.0, 2.0)]}))
    real = make_dump("0.5.4.post1", tmp_path / "real.pkl",
                     [{"rid": "a", "created": 1.0, "text": "a", "images": [data_uri("PNG", 56, 56)]}])
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(open(real, "rb").read()[:300])
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps([1, 2, 3]))
    out = tmp_path / "t.jsonl"
    for path, words in ((hostile, "refused: the pickle references io.open"),
                        (cut, "truncated or not a pickle"), (other, "not an SGLang request dump"),
                        (tmp_path / "missing.pkl", "no such file")):
        r = _cli(str(path), "-o", str(out))
        assert r.exit_code == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.output + r.stderr
    assert not victim.exists() and not out.exists()
    with pytest.raises(DumpError, match="os.system"):
        load_dump(str(_write(tmp_path / "sys.pkl", b"cos\nsystem\n(S'touch " + str(victim).encode() + b"'\ntR.")))
    assert not victim.exists()
    pickle.loads(hostile.read_bytes())     # the payload is live: a plain load creates the file
    assert victim.exists()


def _write(path, data):
    path.write_bytes(data)
    return path


def test_cli_converts_and_reports_what_it_left_out(tmp_path):
    dump = make_dump("0.5.4.post1", tmp_path / "d.pkl", [
        {"rid": "a", "created": 1.0, "text": "a", "images": [data_uri("PNG", 1120, 700)]},
        {"rid": "b", "created": 2.0, "text": "b", "images": ["data:image/png;base64,AAAA"]}])
    out = tmp_path / "t.jsonl"
    r = _cli(dump, "-o", str(out))
    assert r.exit_code == 0, r.stderr
    assert "wrote 1 request from" in r.stdout and "image whose size could not be read: 1" in r.stdout
    r = _cli(dump, "-o", str(out), "--default-size", "12")
    assert r.exit_code == 2 and "WxH" in r.stderr
    assert os.path.getsize(out) > 0


def test_a_gap_a_replay_would_wait_out_is_refused_or_shortened(tmp_path):
    """One request created a day after the others (a clock reset, a dump of another day): refused
    with the request, the file and the option, nothing written; --max-gap cuts the gap and says so."""
    img = [data_uri("PNG", 56, 56)]
    dump = make_dump("0.5.4.post1", tmp_path / "d.pkl", [
        {"rid": "a", "created": 1000.0, "text": "a", "images": img},
        {"rid": "b", "created": 1000.5, "text": "b", "images": img},
        {"rid": "late", "created": 1000.5 + 86400, "text": "c", "images": img}])
    out = tmp_path / "t.jsonl"
    r = _cli(dump, "-o", str(out))
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert all(w in r.stderr for w in ("'late'", "86400 s after 'b'", dump, "--max-gap")), r.stderr
    assert not out.exists()
    r = _cli(dump, "-o", str(out), "--max-gap", "2")
    assert r.exit_code == 0 and "1 idle gap(s) over 2 s shortened" in r.stdout, r.stderr
    header, reqs = _read(out)
    assert [(q.rid, q.t) for q in reqs] == [("a", 0.0), ("b", 0.5), ("late", 2.5)]
    assert header.source["gaps_shortened"] == 1
    assert _cli(dump, "-o", str(out), "--max-gap", "0").exit_code == 2
    r = _cli(dump, "-o", str(tmp_path / "no" / "t.jsonl"))   # the output is checked before the dumps are read
    assert r.exit_code == 2 and "directory does not exist" in r.stderr and "'late'" not in r.stderr, r.stderr


def test_left_out_counts_read_right_for_many():
    """Each reason is worded for one request: the count follows it ("...: 50"), never "50 entry"."""
    from collections import Counter

    from mmdiag.ingest.dump import Conversion, skipped_text
    conv = Conversion(skipped=Counter({"entry that is not (GenerateReqInput, output, created, finished)": 50,
                                       "request without a created_time": 1}))
    assert skipped_text(conv) == ("entry that is not (GenerateReqInput, output, created, finished): 50; "
                                  "request without a created_time: 1")
