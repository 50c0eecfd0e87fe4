"""``tvm-ternary bench`` on a tiny compiled library: the JSON's fields, the thread pool it really
ran with (read back from TVM's runtime, not inferred from timing), the per-call profile, and
one-line errors for bad input. No speed is asserted (timed tests are not benchmarks)."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from tiny_models import tiny_cnn, tiny_images

from tvm_ternary.benchmark import in_pool, latency_stats, time_calls
from tvm_ternary.cli import main

FIELDS = ("median_ms", "p90_ms", "p99_ms", "min_ms", "mean_ms", "throughput_per_s", "threads", "cpu",
          "isa_flags", "runs", "batch")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    onnx.save(tiny_cnn(), d / "tiny.onnx")
    np.save(d / "calib.npy", tiny_images(4))
    assert main(["compile", str(d / "tiny.onnx"), "-o", str(d / "tiny.so"), "--calib", str(d / "calib.npy"),
                 "--method", "exact"]) == 0
    return d / "tiny.so"


@pytest.mark.parametrize("threads", [1, 2])
def test_bench_json_and_the_pool_it_ran_with(threads, library, tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(["bench", str(library), "--threads", str(threads), "--runs", "7", "--warmup", "2",
               "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    r = json.loads(out.read_text())
    for field in FIELDS:
        assert field in r, field
    assert r["threads"] == threads and r["threads_requested"] == threads  # the runtime's own count
    assert r["runs"] == 7 and r["batch"] == 1 and r["warmup"] == 2
    assert r["min_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["p99_ms"]
    assert r["throughput_per_s"] == pytest.approx(1e3 / r["median_ms"], rel=1e-3)
    assert r["stamp"]["versions"]["tvm"].startswith("0.27") and r["stamp"]["threads"] == threads
    assert r["cpu"] and r["cpu"] != "unknown" or not os.path.exists("/proc/cpuinfo")
    assert f"{threads} thread(s)" in text and "p99" in text


def test_threads_override_the_environment_in_a_runtime_only_process(library, tmp_path):
    """TVM_NUM_THREADS=1 in the environment (and the runtime library only): --threads 2 still
    builds a 2-worker pool, since the pool is sized on a fresh thread before its first use."""
    out = tmp_path / "b.json"
    env = dict(os.environ, TVM_NUM_THREADS="1", TVM_USE_RUNTIME_LIB="1")
    proc = subprocess.run([sys.executable, "-m", "tvm_ternary", "bench", str(library), "--threads", "2",
                           "--runs", "3", "--json", str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["threads"] == 2


def test_profile_names_every_quantized_layer(library, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["bench", str(library), "--runs", "3", "--profile", "--profile-runs", "2", "--peak",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    meta = json.loads((library.parent / "tiny.so.json").read_text())
    layers = [row["layer"] for row in r["profile"] if row["layer"]]
    assert layers == [row["layer"] for row in meta["coverage"]]  # every layer once, in program order
    assert sum(row["share"] for row in r["profile"]) == pytest.approx(1.0, abs=1e-3)
    conv1 = next(row for row in r["profile"] if row["layer"] == "conv1")
    assert conv1["gmacs_per_s"] == pytest.approx(conv1["macs"] / conv1["median_ms"] / 1e6, rel=0.01)
    assert "conv1" in printed and "GMAC/s" in printed
    if r["peak_gmacs_per_s"]:  # a VNNI library on a host where the peak benchmark builds
        assert conv1["peak_share"] == pytest.approx(conv1["gmacs_per_s"] / r["peak_gmacs_per_s"], rel=0.01)
        assert "% peak" in printed
    else:
        assert r["peak_note"].startswith("no peak") and r["peak_note"] in printed


def test_batch_runs_several_calls(library, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", str(library), "--batch", "3", "--runs", "4", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["batch"] == 3
    assert r["throughput_per_s"] == pytest.approx(3e3 / r["median_ms"], rel=1e-3)


@pytest.mark.parametrize("case", ["missing", "runs_and_seconds", "zero_threads", "json_dir", "bad_seconds"])
def test_bad_bench_input_is_one_line(case, library, tmp_path, capsys):
    args = {"missing": [tmp_path / "none.so"], "runs_and_seconds": [library, "--runs", "3", "--seconds", "1"],
            "zero_threads": [library, "--threads", "0"], "json_dir": [library, "--json", tmp_path],
            "bad_seconds": [library, "--seconds", "-1"]}[case]
    match = {"missing": "no such library", "runs_and_seconds": "not allowed with argument",
             "zero_threads": "expected a positive integer", "json_dir": "is a directory",
             "bad_seconds": "positive number of seconds"}[case]
    rc = main(["bench", *map(str, args)])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tvm-ternary: error: ") and match in lines[0], err


def test_latency_helpers():
    stats = latency_stats([float(v) for v in range(1, 101)], batch=4)
    assert stats["median_ms"] == 50.5 and stats["min_ms"] == 1.0
    assert stats["p90_ms"] == pytest.approx(90.1) and stats["p99_ms"] == pytest.approx(99.01)
    assert stats["throughput_per_s"] == pytest.approx(4e3 / 50.5, rel=1e-3)
    calls = []
    assert len(time_calls(lambda: calls.append(1), warmup=3, runs=5)) == 5 and len(calls) == 8
    assert len(time_calls(lambda: None, warmup=0, seconds=0.0, min_runs=10)) == 10
    with pytest.raises(ZeroDivisionError):  # an error on the pool's thread reaches the caller
        in_pool(2, lambda: 1 / 0)


def test_compile_and_measure_reports_bad_input_in_one_line(tmp_path):
    """The benchmark script maps the library's UserError to one line and exit 2, like the CLI."""
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "compile_and_measure.py")
    missing = tmp_path / "missing.onnx"
    proc = subprocess.run([sys.executable, script, str(missing), "--calib", str(tmp_path), "--preprocess", "unit"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"compile_and_measure.py: error: {missing}: no such file"]
    assert "Traceback" not in proc.stderr
