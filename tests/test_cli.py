"""The command line as one application: light --help, ranged options, one JSON convention.

Every test walks the click app itself (commands and options are read from it, never listed
here), so a new command or option is covered the day it is added.
"""
from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from mmdiag.cli import main
from mmdiag.vocab import PROFILE_SCHEMA

HEAVY = ("torch", "numpy", "matplotlib", "scipy", "viztracer")


def commands(group=main, path=()):
    """(path, command) for every command and group of the app."""
    yield path, group
    for name, cmd in getattr(group, "commands", {}).items():
        yield from commands(cmd, path + (name,))


def _strict(text: str):
    def refuse(c):
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(text, parse_constant=refuse)


def test_no_help_imports_torch():
    """`mmdiag --help` and every command's --help start without torch, numpy, matplotlib, scipy."""
    paths = [list(p) for p, _ in commands()]
    code = (f"import sys\nfrom mmdiag.cli import main\nfor p in {paths!r}:\n"
            "    try:\n        main(p + ['--help'], prog_name='mmdiag')\n    except SystemExit as e:\n"
            "        assert e.code == 0, (p, e.code)\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "[]", r.stderr[-2000:]


def _bad_values(opt: click.Option) -> list[str]:
    t = opt.type
    bad = ["abc"]
    if t.min is not None:
        bad.append(str(t.min - 1 if isinstance(t, click.IntRange) else t.min - 1.0))
    if t.max is not None:
        bad.append(str(t.max + 1))
    return bad


def _numeric_options():
    for path, cmd in commands():
        for p in cmd.params:
            if isinstance(p, click.Option) and isinstance(p.type, (click.types._NumberParamTypeBase,)):
                yield path, cmd, p


def test_every_numeric_option_has_a_range():
    unranged = [f"{' '.join(path)} {p.opts[-1]}" for path, _, p in _numeric_options()
                if not isinstance(p.type, (click.IntRange, click.FloatRange))
                or (p.type.min is None and p.type.max is None)]
    assert not unranged, f"give these a click.IntRange/FloatRange (mmdiag/cli/options.py): {unranged}"


def test_bad_numbers_are_one_line_errors_with_exit_2():
    """--port 99999, --port -5, --tp abc, ...: for every numeric option of every command."""
    runner = CliRunner()
    checked = 0
    for path, cmd, opt in _numeric_options():
        args = ["x" for a in cmd.params if isinstance(a, click.Argument) and a.required]
        for value in _bad_values(opt):
            r = runner.invoke(main, [*path, opt.opts[-1], value, *args])
            errors = [ln for ln in r.stderr.splitlines() if ln.startswith("mmdiag: error: ")]
            assert r.exit_code == 2 and "Traceback" not in r.output, (path, opt.opts, value, r.output)
            assert len(errors) == 1 and opt.opts[-1] in errors[0], (path, opt.opts, value, r.stderr)
            checked += 1
    assert checked > 20


def test_json_errors_are_json_on_stdout(tmp_path):
    """doctor --json where there is no SGLang: valid JSON on stdout, the one line on stderr, exit 2."""
    r = CliRunner().invoke(main, ["doctor", "--json", "--sglang", str(tmp_path / "nope")])
    assert r.exit_code == 2
    d = _strict(r.stdout)
    assert "nope" in d["error"] and d["fix"] and d["exit_code"] == 2
    assert r.stderr.startswith("mmdiag: error: ") and len(r.stderr.strip().splitlines()) == 1
    r = CliRunner().invoke(main, ["report", "a.json", "b.json", "--json", "--criteria", "x", "--bogus"])
    assert r.exit_code == 2 and "--bogus" in _strict(r.stdout)["error"]


@pytest.fixture
def raw_profile(tmp_path):
    f = tmp_path / "rank0.raw"
    f.write_text("thread (1): MainThread;main (x.py:1);run_forward_step (x.py:2) 30\n")
    return f


def test_json_is_strict_and_files_follow_their_extension(tmp_path, raw_profile):
    """A live profile has no throughput (NaN inside): --json prints null, never a bare NaN;
    -o picks the format by extension and refuses one the Run cannot be written as."""
    r = CliRunner().invoke(main, ["profile", "--from-raw", str(raw_profile), "--json"])
    assert r.exit_code == 0, r.output
    d = _strict(r.stdout)
    assert d["schema"] == PROFILE_SCHEMA and d["strategies"][next(iter(d["strategies"]))]["throughput_rps"] is None
    md = tmp_path / "p.md"
    r = CliRunner().invoke(main, ["profile", "--from-raw", str(raw_profile), "-o", str(md)])
    assert r.exit_code == 0 and md.read_text().count("|") > 10, r.output
    r = CliRunner().invoke(main, ["profile", "--from-raw", str(raw_profile), "-o", str(tmp_path / "p.html")])
    assert r.exit_code == 0 and "<table" in (tmp_path / "p.html").read_text(), r.output  # a page of the Run
    r = CliRunner().invoke(main, ["profile", "--from-raw", str(raw_profile), "-o", str(tmp_path / "p.csv")])
    assert r.exit_code == 2 and "p.csv" in r.stderr and "run.json" in r.stderr, r.output
    assert not (tmp_path / "p.csv").exists()


def test_old_json_file_form_still_writes_with_a_deprecation_line(tmp_path, raw_profile):
    out = tmp_path / "p.json"
    r = CliRunner().invoke(main, ["profile", "--from-raw", str(raw_profile), "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "deprecated" in r.stderr and "-o" in r.stderr
    assert _strict(out.read_text())["schema"] == PROFILE_SCHEMA


def test_help_and_readme_say_what_the_strategy_modules_say():
    """The README's strategy table, replay's help and apply's choices are derived from the
    registry: a strategy module's words change, these change with them (or this fails)."""
    import os
    import re

    from mmdiag import render
    from mmdiag.strategies import REGISTRY, catalog

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    block = re.search(r"<!-- strategies:[^\n]*-->\n(.*?)\n<!-- /strategies -->", readme, re.S)
    assert block and block.group(1) + "\n" == render.render(catalog(), "markdown"), \
        "README strategy table is stale: paste `mmdiag strategies --format markdown`"
    help_text = " ".join(CliRunner().invoke(main, ["replay", "--help"], terminal_width=200).output.split())
    for name, cls in REGISTRY.items():
        assert f"{name} {' '.join(cls.summary.split())}" in help_text, name
    apply_choices = next(p for p in main.commands["apply"].params if p.name == "strategy").type.choices
    from mmdiag.mmpath.hashing import PATCHABLE as PATCHABLE_HASHES  # a content hash stacks on a strategy
    from mmdiag.vocab import SEGMENTS_POOL  # and so does the segment pool
    assert tuple(apply_choices) == tuple(n for n, c in REGISTRY.items() if c.patch) + PATCHABLE_HASHES + (SEGMENTS_POOL,)


def test_sizes_are_decimal_mb_as_the_readme_says(tmp_path):
    """The README's 18.8 MB for a 1120x700 Qwen image (4000x1176 float32) is what the tool prints."""
    import os
    import re

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    said = float(re.search(r"\(4000x1176 float32, ([\d.]+) MB\)", readme).group(1))
    trace = tmp_path / "t.jsonl"
    r = CliRunner().invoke(main, ["trace", "synth", "--profile", "small-image-c96", "-n", "2", "-o", str(trace)])
    assert r.exit_code == 0, r.output
    info = _strict(CliRunner().invoke(main, ["trace", "info", str(trace), "--json"]).stdout)
    assert info["max_request_mb"] == said == round(4000 * 1176 * 4 / 1e6, 1)


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    import io

    from mmdiag import progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    for stream, kind in ((io.StringIO(), progress.Lines), (Tty(), progress.Bar)):
        with progress.stderr(stream=stream, every_s=0.0) as p:
            assert isinstance(p, kind)
            for done in (1, 2, 4):
                p({"label": "commit", "done": done, "total": 4})
            p({"label": "revert", "done": 1, "total": 4})
        out = stream.getvalue()
        assert "commit" in out and "revert" in out and "4/4" in out, out
        if kind is progress.Lines:   # every update is a plain line when every_s is 0
            assert len(out.splitlines()) == 4 and "\r" not in out


def test_help_and_readme_list_the_output_formats_of_the_renderer_table():
    """Which extensions -o takes is mmdiag.render's table, for the result types the commands' -o
    write: main's help is built from it, and the README's list must say the same."""
    import os
    import re

    from mmdiag import render
    from mmdiag.cli.app import OUTPUT_KINDS

    assert set(OUTPUT_KINDS) >= {"Run", "Recommendation", "Report"}
    help_text = " ".join(CliRunner().invoke(main, ["--help"], terminal_width=200).output.split())
    assert f"picks the format: {render.describe_formats(OUTPUT_KINDS)}." in help_text
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    said = re.search(r"whose extension picks the format \((.*?)\), atomically", " ".join(readme.split()))
    assert said and said.group(1) == render.describe_formats(OUTPUT_KINDS, code="`"), \
        f"README's -o formats are stale: write ({render.describe_formats(OUTPUT_KINDS, code='`')})"


@pytest.mark.parametrize("ext", [".json", ".txt", ".md"])
def test_replay_suggests_recommend_only_on_a_file_it_reads(monkeypatch, tmp_path, ext):
    """After `replay -o run<ext>`, the `next:` line names a file `mmdiag recommend` reads (the
    JSON Run); a .txt or .md Run gets how to write one instead, never `recommend run.md`."""
    import re

    from runs_synth import video_run

    from mmdiag import api

    monkeypatch.setattr(api, "replay", lambda *a, **kw: video_run())
    path = tmp_path / f"run{ext}"
    r = CliRunner().invoke(main, ["replay", str(tmp_path / "t.jsonl"), "-o", str(path), "-q"], terminal_width=400)
    assert r.exit_code == 0, r.output
    assert path.exists()
    named = re.findall(r"mmdiag recommend (\S+)", r.stdout)
    if ext != ".json":
        assert str(path) not in named and f"-o {tmp_path / 'run.json'}" in r.stdout, r.stdout
        return
    assert named == [str(path)], r.stdout
    rec = CliRunner().invoke(main, ["recommend", named[0], "--json"])
    assert rec.exit_code == 0, rec.output


def test_file_errors_say_what_to_do_and_trace_info_speaks_mb(tmp_path):
    """Issue 20 (also seen): each of these errors has its "what to do" half after the "; ", a
    JSON error is never "at at column", and `trace info` prints sizes in MB and no Python dict."""
    import re

    folder = tmp_path / "dir"
    folder.mkdir()
    cases = [
        (["trace", "info", str(folder)], "is a directory, not a trace file"),
        (["trace", "synth", "-n", "2", "-o", str(tmp_path / "missing" / "t.jsonl")], "directory does not exist"),
        (["trace", "from-dump", str(tmp_path / "nothing"), "-o", str(tmp_path / "t.jsonl")], "no such file or folder"),
        (["replay", str(tmp_path / "t.jsonl"), "-o", str(tmp_path / "missing" / "run.json")], "directory does not exist"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"schema": "mmdiag.trace/1", "model": "unterminated}\n')
    cases.append((["trace", "info", str(bad)], "Unterminated string starting at column"))
    for argv, what in cases:
        r = CliRunner().invoke(main, argv)
        line = r.output.strip().splitlines()[-1]
        assert r.exit_code == 2 and what in line, (argv, r.output)
        assert re.search(r"; \S.{8,}$", line.split(what, 1)[1]), f"no what-to-do: {line}"
        assert "at at" not in line
    trace = tmp_path / "t.jsonl"
    assert CliRunner().invoke(main, ["trace", "synth", "-n", "3", "-o", str(trace)]).exit_code == 0
    text = CliRunner().invoke(main, ["trace", "info", str(trace)]).output
    assert "{" not in text and "_gb" not in text and re.search(r"^mm_mb\s+56\.4$", text, re.M), text
    assert re.search(r"^modalities\s+image=3$", text, re.M)


def test_readme_claims_follow_the_code():
    """Issue 20 (also seen): the benchmark table has a column for every strategy but the baseline
    (from the registry), the block rule's example is what block_length gives, and the stopping
    rule's numbers are profiles/defaults.toml's [quick]."""
    import os
    import re

    from mmdiag import api
    from mmdiag.live.profile import block_length
    from mmdiag.strategies import BASELINE, catalog

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    header = next(ln for ln in readme.splitlines() if ln.startswith("| profile | revert"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == [s["name"] for s in catalog()
                                                                      if s["name"] != BASELINE]
    flat = " ".join(readme.split())
    d, blk = re.search(r"`--duration (\d+)` samples in ([\d.]+) s blocks", flat).groups()
    assert block_length(float(d)) == pytest.approx(float(blk))
    q = api.quick()
    said = re.search(r"significant or (\d+) repeats; no further round starts that would take the replay past "
                     r"(\d+) s", flat)
    assert said and (int(said.group(1)), int(said.group(2))) == (q["max_repeats"], q["budget_s"])
