"""Helpers shared by the benchmark scripts: robust timing, ONNX Runtime int8
(static QDQ) quantization, per-op sums of the peers. The machine stamp, the per-call VM
profile (:mod:`tvm_ternary.benchmark`) and the vpdpbusd peak (:mod:`tvm_ternary.peak`) live in
the package (``tvm-ternary bench`` uses them) and are re-exported here.

Scripts import it as ``from _bench_common import ...`` (the scripts folder is on sys.path when a
script runs; the others insert it explicitly).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

# re-exported: one copy of each, in the package (tvm-ternary bench uses them)
from tvm_ternary.benchmark import machine_stamp, profile_vm  # noqa: F401
from tvm_ternary.peak import measure_vnni_peak  # noqa: F401


def measure_amx_peak(threads: int) -> float | None:
    """G MAC/s of back-to-back tdpbusd (``bench_peak.py``'s ``amx_tdpbusd`` loop, median of 3);
    None where the host lacks AMX or the loop does not build."""
    import statistics
    import subprocess
    import tempfile
    from pathlib import Path

    from bench_peak import LOOPS, host_cpuinfo_flags, measure

    loop = next(lp for lp in LOOPS if lp.name == "amx_tdpbusd")
    if not set(loop.cpuinfo) <= host_cpuinfo_flags():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return statistics.median(measure(loop, threads=threads, repeat=3, workdir=Path(tmp)))
        except (OSError, subprocess.CalledProcessError, ValueError):
            return None

def exit_code_of(main, argv=None) -> int:
    """Run a script's ``main(argv)``; a :class:`~tvm_ternary.errors.UserError` (bad input: a
    group size a layer cannot take, a missing file) prints one line and gives exit code 2, as
    the ``tvm-ternary`` commands do, instead of a traceback."""
    import sys

    from tvm_ternary.errors import UserError

    try:
        return int(main(argv) or 0)
    except UserError as error:
        print(f"{Path(sys.argv[0]).name}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


def median_ms(fn, *, min_runs: int = 10, min_s: float = 0.3) -> float:
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)




def interleaved_medians(fns: dict, *, rounds: int = 10, per_round: int = 3) -> dict:
    """Median ms per callable, measured in interleaved rounds (each round runs every callable
    ``per_round`` times): on a shared machine a burst of load then hits all runtimes alike
    instead of whichever happened to run during it."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up: first-call allocation and lazy init
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"median_ms": statistics.median(t), "min_ms": min(t), "runs": len(t)}
            for name, t in times.items()}


# ---------------------------------------------------------------- ONNX Runtime int8 (static QDQ)


def ort_int8_qdq(fp32_path: Path, out_path: Path, *, input_name: str, images: np.ndarray) -> Path:
    """u8 activations, s8 per-channel weights, static QDQ, calibrated on ``images`` (one per call).

    ORT's own pre-processing (shape inference + graph optimisation) runs first, as its docs
    recommend for static quantization.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{input_name: images[i : i + 1].astype(np.float32)} for i in range(len(images))])

        def get_next(self):
            return next(self.it, None)

    pre = out_path.with_name(out_path.stem + ".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre))
    quantize_static(str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    pre.unlink(missing_ok=True)
    return out_path


# ---------------------------------------------------------------- per-op sums of the baselines
# The same robust estimate as profile_vm's sum for ONNX Runtime and OpenVINO: each op's median
# over runs, summed. A single op rarely spans a preemption, so on a loaded machine these sums
# compare the runtimes' work where end-to-end medians mostly measure the other jobs.


def ort_op_sum_ms(path: Path, input_name: str, x: np.ndarray, *, threads: int = 1, runs: int = 20) -> float:
    import json

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"ort_prof_{os.getpid()}")
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        sess.run(None, {input_name: x})
    prof = Path(sess.end_profiling())
    try:
        per_node: dict[str, list[float]] = {}
        for event in json.loads(prof.read_text()):
            if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
                per_node.setdefault(event["name"], []).append(event["dur"] / 1e3)
    finally:
        prof.unlink(missing_ok=True)
    return sum(statistics.median(t[1:] or t) for t in per_node.values())  # t[0]: warm-up run


def openvino_op_sum_ms(path: Path, x: np.ndarray, *, threads: int = 1, runs: int = 20) -> float:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True})
    request = compiled.create_infer_request()
    per_node: dict[str, list[float]] = {}
    for i in range(runs + 1):
        request.infer({0: x})
        if i:
            for info in request.profiling_info:
                per_node.setdefault(info.node_name, []).append(info.real_time.total_seconds() * 1e3)
    return sum(statistics.median(t) for t in per_node.values())
