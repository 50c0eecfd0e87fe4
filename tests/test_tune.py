"""``tvm-ternary tune`` and ``compile --tuning-db``: RPC tuning through a tracker and server the
test starts on 127.0.0.1, interrupt and resume, bad input.

The tuned layer is the tiny CNN's ``fire_squeeze`` (1x1, 16->8 at 4x4): its space has two
configurations and the untuned default (decode_at=root, a parallel launch for a few hundred
MACs) is ~50x slower than the other, so "tuned" is not a matter of timing noise.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
from tiny_models import tiny_cnn, tiny_images

from tvm_ternary.cli import main

RPC_KEY = "tt-test"
QUANT = ["--method", "exact"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tune_model")
    onnx.save(tiny_cnn(conv_head=True), d / "tiny.onnx")
    np.save(d / "calib.npy", tiny_images(16))
    return d / "tiny.onnx", d / "calib.npy"


@pytest.fixture(scope="module")
def rpc_tracker():
    """A TVM RPC tracker and one server (key RPC_KEY) on 127.0.0.1, killed at the end."""
    from tvm_ternary import tvm_tuning_adapter as tta

    tport, sport = free_port(), free_port()
    procs = []
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(tport),
             "--port-end", str(tport + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True))
        deadline = time.monotonic() + 90
        while tta.tracker_reachable("127.0.0.1", tport, timeout_s=1):
            assert time.monotonic() < deadline and procs[0].poll() is None, "tracker did not start"
            time.sleep(0.5)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{tport}", "--key", RPC_KEY,
             "--host", "127.0.0.1", "--port", str(sport), "--port-end", str(sport + 1)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        while RPC_KEY not in tta.tracker_keys("127.0.0.1", tport):
            assert time.monotonic() < deadline and procs[1].poll() is None, "RPC server did not register"
            time.sleep(0.5)
        yield tport
    finally:
        # each in its own process group: the server serves sessions from popen workers of its
        # own, which outlive a plain terminate() of the server
        for proc in procs:
            _kill_group(proc, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGKILL)
                proc.wait()
            _kill_group(proc, signal.SIGKILL)  # workers left behind by the server


def _kill_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def host_mcpu() -> str:
    from tvm_ternary import tvm_adapter as ta

    return ta.host_cpu()


def tune_args(model, calib, db, *extra):
    return ["tune", str(model), "--db", str(db), "--calib", str(calib), *QUANT, *extra]


def record_lines(db: Path) -> list[str]:
    (folder,) = [p for p in db.iterdir() if p.is_dir()]
    return (folder / "database_tuning_record.json").read_text().splitlines()


def test_rpc_tune_one_layer_then_compile_uses_it_bit_exact(model_files, rpc_tracker, tmp_path, capsys):
    from tvm_ternary.compiler import compile_model
    from tvm_ternary.plan import QuantConfig, simulate
    from tvm_ternary.tuning import TunedKernels, open_database

    model, calib = model_files
    db = tmp_path / "db"
    rc = main(tune_args(model, calib, db, "--layers", "fire_squeeze", "--trials-per-task", "2",
                        "--target", host_mcpu(), "--rpc-tracker", f"127.0.0.1:{rpc_tracker}",
                        "--rpc-key", RPC_KEY))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"on {RPC_KEY} via 127.0.0.1:{rpc_tracker}" in out
    assert len(record_lines(db)) == 2  # the default and the one other configuration

    lib = tmp_path / "tiny.so"
    assert main(["compile", str(model), "-o", str(lib), "--calib", str(calib), *QUANT,
                 "--target", host_mcpu(), "--tuning-db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "1 of 8 kernels tuned" in out, out
    rows = {r["layer"]: r["schedule"] for r in json.loads(Path(f"{lib}.json").read_text())["coverage"]}
    assert rows["fire_squeeze"].startswith("tuned (ow_block=4, oc_tiles=1, decode_at=tile"), rows
    assert rows["conv1"] == "default (no records)" and rows["dw"].startswith("default (no search space")

    # the tuned kernel computes the same numbers: bit-exact against the numpy reference
    target = host_mcpu()
    kernels = TunedKernels(open_database(db, target=target, create=False))
    cm = compile_model(model, config=QuantConfig(method="exact"), calib_images=tiny_images(16),
                       target=target, kernels=kernels, progress=False)
    assert [k for k, v in cm.rewrite.schedules.items() if v.startswith("tuned")] == \
        [cm.rewrite.layer_kernels["fire_squeeze"]]
    x = tiny_images(3, seed=5)
    np.testing.assert_array_equal(cm.run(x), simulate(cm.plan, x))


# Two full tunes (~2 minutes on 2 cores): on demand. The default run keeps Ctrl-C and SIGKILL
# of a tune in tests/test_reliability.py (exit 130, no process left, records kept).
@pytest.mark.slow
def test_sigint_keeps_records_and_second_run_continues(model_files, tmp_path):
    model, calib = model_files
    db = tmp_path / "db"
    cmd = [sys.executable, "-m", "tvm_ternary", *tune_args(model, calib, db, "--layers", "conv1,res_a",
                                                           "--trials-per-task", "3")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:  # interrupt right after the first batch was measured
            lines.append(line)
            if "trials, best" in line:
                workers = psutil.Process(proc.pid).children(recursive=True)  # MetaSchedule's
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines) + rest
    assert proc.returncode == 130, out
    assert "interrupted: every measured record is kept" in out
    assert workers, "no worker seen: the check below would prove nothing"
    _, alive = psutil.wait_procs(workers, timeout=10)  # issue 11: none outlives the tune
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [p.cmdline() for p in alive]
    kept = record_lines(db)
    assert len(kept) >= 3  # conv1: default + a batch of two

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    final = record_lines(db)
    assert final[: len(kept)] == kept  # nothing measured before the interrupt was lost or rewritten
    assert len(final) == 6  # both kernels end with 3 records: topped up, nothing measured twice
    assert "already tuned" in again.stdout or len(kept) < 3


# ---------------------------------------------------------------- bad input


def test_unreachable_tracker(model_files, tmp_path, capsys):
    model, calib = model_files
    rc = main(tune_args(model, calib, tmp_path / "db", "--target", host_mcpu(),
                        "--rpc-tracker", f"127.0.0.1:{free_port()}", "--rpc-key", "x"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "unreachable" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "db").exists()


def test_unknown_rpc_key(model_files, rpc_tracker, tmp_path, capsys):
    model, calib = model_files
    rc = main(tune_args(model, calib, tmp_path / "db", "--target", host_mcpu(),
                        "--rpc-tracker", f"127.0.0.1:{rpc_tracker}", "--rpc-key", "no-such-device"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no device with key 'no-such-device'" in err and RPC_KEY in err, err


def test_rpc_options_need_each_other_and_an_mcpu(model_files, tmp_path, capsys):
    model, calib = model_files
    assert main(tune_args(model, calib, tmp_path / "db", "--rpc-tracker", "127.0.0.1:9190")) == 2
    assert "go together" in capsys.readouterr().err
    assert main(tune_args(model, calib, tmp_path / "db", "--rpc-tracker", "127.0.0.1:9190", "--rpc-key", "k")) == 2
    assert "needs --target MCPU" in capsys.readouterr().err


def test_target_the_host_cannot_run_without_rpc(model_files, tmp_path, capsys, monkeypatch):
    from tvm_ternary import cpu_features

    model, calib = model_files
    monkeypatch.setattr(cpu_features, "host_features", lambda: frozenset({"sse2", "avx", "avx2"}))
    rc = main(tune_args(model, calib, tmp_path / "db", "--target", "znver4"))
    err = capsys.readouterr().err
    assert rc == 2 and "needs CPU features this host lacks" in err and "avx512" in err, err
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_unwritable_db_dir(model_files, tmp_path, capsys, where):
    model, calib = model_files
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    db = blocker if where == "file" else blocker / "db"
    assert main(tune_args(model, calib, db)) == 2
    err = capsys.readouterr().err
    assert "not a directory" in err or "cannot create" in err, err
    assert blocker.read_text() == "not a directory"


def _existing_db(tmp_path):
    from tvm_ternary import tvm_adapter as ta
    from tvm_ternary.tuning import open_database

    return open_database(tmp_path / "db", target=ta.host_target(), create=True).path


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_corrupt_db_is_reported_and_left_untouched(model_files, tmp_path, capsys):
    model, calib = model_files
    folder = _existing_db(tmp_path)
    (folder / "database_tuning_record.json").write_text('[0, [truncated\n')
    before = _snapshot(folder)
    assert main(tune_args(model, calib, tmp_path / "db")) == 2
    assert "corrupt tuning database" in capsys.readouterr().err
    assert main(["compile", str(model), "-o", str(tmp_path / "m.so"), "--calib", str(calib),
                 "--tuning-db", str(tmp_path / "db")]) == 2
    assert "corrupt tuning database" in capsys.readouterr().err
    assert _snapshot(folder) == before


def test_db_from_another_tvm_version_is_refused(model_files, tmp_path, capsys):
    model, calib = model_files
    folder = _existing_db(tmp_path)
    meta = json.loads((folder / "tvm_ternary_db.json").read_text())
    (folder / "tvm_ternary_db.json").write_text(json.dumps({**meta, "tvm_version": "0.19.0"}))
    before = _snapshot(folder)
    assert main(tune_args(model, calib, tmp_path / "db")) == 2
    err = capsys.readouterr().err
    assert "written by TVM 0.19.0" in err and len(err.strip().splitlines()) == 1
    assert _snapshot(folder) == before


def test_compile_with_a_db_lacking_this_cpu(model_files, tmp_path, capsys):
    model, calib = model_files
    (tmp_path / "db" / "icelake-server-000000000000").mkdir(parents=True)
    assert main(["compile", str(model), "-o", str(tmp_path / "m.so"), "--calib", str(calib),
                 "--tuning-db", str(tmp_path / "db")]) == 2
    err = capsys.readouterr().err
    assert "no tuning records for" in err and "icelake-server-000000000000" in err


def test_knobs_round_trip_through_a_trace():
    """The space writes its knobs into every trace and reads them back (tuned vs default)."""
    from tvm_ternary import tvm_adapter as ta
    from tvm_ternary.schedules import ConvSpec, Tiling
    from tvm_ternary.tuning import kernel_task
    from tvm_ternary.tuning.space import schedule_with, tiling_of_trace

    target = ta.host_target()
    spec = ConvSpec(batch=1, in_channels=32, height=8, width=8, out_channels=32, kernel=3, padding=1,
                    act="u8", out="u8", relu=True, bias=True)
    task = kernel_task(spec, isa=ta.choose_isa(target), target=target, name="k")
    parts, mod = task.workload()
    assert task.space_size == sum(len(ows) for _, _, ows in task.choices()) >= 4
    for oct_, dec, ows in task.choices():
        tiling = Tiling(ow_block=ows[-1], oc_tiles=oct_, decode_at=dec)
        trace = schedule_with(task, parts, mod, tiling).trace.simplified(remove_postproc=True)
        assert tiling_of_trace(trace) == tiling
