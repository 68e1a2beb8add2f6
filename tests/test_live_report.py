"""`mmdiag report` on a live server: bench_serving result files (written by the wheel's own
result-dict expression, as bench_serving writes them) + live profiles -> acceptance report."""
import ast
import json
import zipfile
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from mmdiag.cli import main
from mmdiag.errors import ProfileError
from mmdiag.ingest.bench_serving import RESULT_KEYS, read_results, with_bench
from sglang_wheels import wheel
from runs_synth import profile_run

SOURCES = {"0.5.4.post1": "sglang/bench_serving.py", "0.5.23": "sglang/benchmark/serving.py"}


def _result_expr(version):
    """The `result = {...}` dict bench_serving's benchmark() writes to --output-file."""
    with zipfile.ZipFile(wheel(version)) as z:
        tree = ast.parse(z.read(SOURCES[version]).decode())
    bench = next(n for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef) and n.name == "benchmark")
    return next(n.value for n in ast.walk(bench) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id == "result" for t in n.targets))


class Metrics:
    """BenchmarkMetrics stand-in: the figures a run measured, 0.0 for the rest."""
    def __init__(self, **figures):
        self.__dict__.update(figures)

    def __getattr__(self, name):
        return 0.0


def write_runs(path, version, runs, *, rate=float("inf"), conc=96):
    """Append one line per run, evaluating the wheel's own result expression, then
    `file.write(json.dumps(result) + "\\n")` as bench_serving does."""
    expr = ast.Expression(_result_expr(version))
    args = SimpleNamespace(backend="sglang", dataset_name="image", sharegpt_output_len=None, random_input_len=128,
                           random_output_len=16, random_range_ratio=0.0, tag=None)
    for thr, p99, ttft in runs:
        n = 200
        metrics = Metrics(completed=n, request_throughput=thr, median_e2e_latency_ms=p99 / 3,
                          p90_e2e_latency_ms=p99 * 0.8,
                          mean_e2e_latency_ms=p99 / 2.5, p99_e2e_latency_ms=p99, median_ttft_ms=ttft,
                          p99_ttft_ms=ttft * 4, mean_itl_ms=5.0, output_throughput=thr * 16)
        ns = {"args": args, "metrics": metrics, "benchmark_duration": n / thr, "request_rate": rate,
              "max_concurrency": conc, "use_trace_timestamps": False, "server_info": {"tp_size": 2},
              "accept_length": None, "getattr": getattr}
        result = eval(compile(expr, SOURCES[version], "eval"), ns)
        with open(path, "a") as file:
            file.write(json.dumps(result) + "\n")
    return str(path)


def _profile(tmp_path, name, cpu, gil_wait=5.0):
    run = profile_run([{"recv": 20, "from_dict": 40, "broadcast": 30, "forward": 10}] * 2,
                      cpu=cpu, gil_wait=[gil_wait, gil_wait])
    path = tmp_path / f"{name}.json"
    run.save(str(path))
    return str(path)


def _report(*args):
    r = CliRunner().invoke(main, ["report", *args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return r


@pytest.mark.parametrize("version", list(SOURCES))
def test_wheel_result_lines_round_trip(tmp_path, version):
    path = write_runs(tmp_path / "b.jsonl", version, [(10.0, 900.0, 80.0), (11.0, 950.0, 82.0)])
    runs = read_results([path])
    assert [r["request_throughput"] for r in runs] == [10.0, 11.0]
    assert set(RESULT_KEYS) <= set(runs[0]) and runs[0]["request_rate"] == float("inf")
    live = with_bench(profile_run([{"recv": 50, "from_dict": 50}] * 2, cpu=[80.0, 40.0]), [path], "p.json")
    s = next(iter(live.strategies.values()))
    assert s.repeats_rps == [10.0, 11.0] and s.repeats_p99_ms == [900.0, 950.0]
    assert s.throughput_rps == pytest.approx(10.5) and s.latency_ms["ttft_p50"] == pytest.approx(81.0)
    assert live.trace["arrival"] == {"mode": "closed", "max_concurrency": 96}
    # CPU-ms per request from the profile's share over a run: 80% of a core at ~10.5 req/s.
    busiest = max(s.ranks, key=lambda r: r.cpu_s)
    assert 1000 * busiest.cpu_s / s.requests == pytest.approx(0.8 * 1000 * s.duration_s / s.requests)
    json.dumps(live.to_dict(), allow_nan=False)        # a live Run stays strict JSON


def test_live_acceptance_report_html_and_markdown(tmp_path):
    before = write_runs(tmp_path / "before.jsonl", "0.5.23", [(10.0, 9000, 800), (10.4, 9300, 820), (9.8, 8800, 790)])
    after = write_runs(tmp_path / "after.jsonl", "0.5.23", [(19.5, 4700, 300), (20.3, 4500, 310), (20.0, 4600, 305)])
    bp, ap = _profile(tmp_path, "bp", [100.0, 98.0]), _profile(tmp_path, "ap", [60.0, 55.0])
    for out in ("live.html", "live.md"):
        r = _report(bp, ap, "--before-bench", before, "--after-bench", after, "-o", str(tmp_path / out))
        assert r.exit_code == 0, r.output + r.stderr
        text = (tmp_path / out).read_text()
        assert "throughput" in text and "TTFT" in text and "PASS" in text.upper()
        assert "sglang.bench_serving --dataset-name image, 200 requests per run" in text
    r = _report(bp, ap, "--before-bench", before, "--after-bench", after, "--json")
    rep = json.loads(r.stdout)
    crit = {c["key"]: c for c in rep["criteria"]}
    assert crit["throughput_ratio"]["status"] == "pass" and "1.98x (19.93 / 10.07 req/s" in crit["throughput_ratio"]["measured"]
    assert crit["cpu_per_request_ratio"]["status"] == "pass" and crit["gil_wait_pct"]["status"] == "pass"
    # bench_serving at --max-concurrency saturates the server: CPU per rank and p99 are n/a there,
    # with the bench_serving run that would measure them.
    for key in ("scheduler_cpu_pct", "p99_latency_ms"):
        assert crit[key]["status"] == "n/a" and "--request-rate" in crit[key]["measure_with"]
    thr = next(m for m in rep["metrics"] if m["metric"].startswith("throughput"))
    assert "3/3 repeats" in thr["metric"] and "faster" in thr["verdict"]


def test_live_equal_load_judges_cpu_and_p99_and_a_regression_fails(tmp_path):
    kw = dict(rate=8.0, conc=None)
    before = write_runs(tmp_path / "b.jsonl", "0.5.4.post1", [(7.9, 900, 80), (8.0, 950, 82), (7.95, 920, 81)], **kw)
    after = write_runs(tmp_path / "a.jsonl", "0.5.4.post1", [(7.9, 2600, 300), (7.8, 2700, 310), (7.85, 2650, 305)], **kw)
    bp, ap = _profile(tmp_path, "bp", [50.0, 40.0]), _profile(tmp_path, "ap", [75.0, 70.0])
    r = _report(bp, ap, "--before-bench", before, "--after-bench", after, "--json")
    assert r.exit_code == 1
    crit = {c["key"]: c for c in json.loads(r.stdout)["criteria"]}
    assert crit["scheduler_cpu_pct"]["status"] == "fail" and crit["p99_latency_ms"]["status"] == "fail"
    assert crit["throughput_ratio"]["status"] == "n/a"    # an open loop both kept up with: not saturation


def test_bad_bench_inputs_are_one_line_errors(tmp_path):
    good = write_runs(tmp_path / "g.jsonl", "0.5.23", [(10.0, 900, 80)])
    other = write_runs(tmp_path / "o.jsonl", "0.5.23", [(10.0, 900, 80)], rate=4.0)
    broken = tmp_path / "x.jsonl"
    broken.write_text('{"request_throughput": 3.0, "completed": 5}\n')
    bp = _profile(tmp_path, "bp", [50.0, 50.0])
    for args, words in (((good, str(broken)), "field 'duration'"), ((good, other), "not repeats of one benchmark"),
                        ((str(tmp_path / "none.jsonl"),), "cannot read")):
        with pytest.raises(ProfileError, match=words):
            read_results(list(args))
    r = _report(bp, bp, "--before-bench", good)
    assert r.exit_code == 2 and "both sides" in r.stderr
    r = _report(bp, bp, "--before-bench", good, "--after-bench", str(broken))
    assert r.exit_code == 2 and "x.jsonl:1" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("field, value, words", [
    ("max_concurrency", "abc", "max_concurrency"), ("max_concurrency", 1.5, "max_concurrency"),
    ("request_rate", "fast", "request_rate"), ("request_rate", float("nan"), "request_rate"),
    ("request_throughput", float("inf"), "request_throughput"), ("duration", -3.0, "duration"),
    ("completed", 200.5, "completed")])
def test_odd_fields_in_a_result_line_are_one_line_errors(tmp_path, field, value, words):
    """A hand-edited or foreign line: named field, exit 2, no report written (never a traceback)."""
    good = write_runs(tmp_path / "g.jsonl", "0.5.23", [(10.0, 900, 80)])
    line = json.loads(open(good).readline())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**line, field: value}) + "\n")
    bp, out = _profile(tmp_path, "bp", [50.0, 50.0]), tmp_path / "r.md"
    r = _report(bp, bp, "--before-bench", good, "--after-bench", str(bad), "-o", str(out))
    assert r.exit_code == 2 and f"bad.jsonl:1: field '{words}'" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
