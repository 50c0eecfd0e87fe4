"""Timing a compiled library as a user runs it: latency statistics, TVM's thread pool, per-call
profile, machine stamp. Runtime only (works with ``TVM_USE_RUNTIME_LIB=1``); used by
``tvm-ternary bench``, ``scripts/reproduce_table.py`` and the other benchmark scripts.

Why a fresh thread per thread count: TVM's CPU pool is a ``thread_local`` object created on
the calling thread's first parallel launch, with as many workers as ``TVM_NUM_THREADS`` said
then (default: half the logical CPUs, i.e. 1 on a 2-vCPU VM); ``runtime.config_threadpool``
afterwards can only lower the count, never raise it. So :func:`in_pool` sets the variable and
runs the work on a new Python thread, whose pool is then built with exactly that many workers.

Example::

    >>> stats = latency_stats([2.0, 1.0, 4.0, 3.0], batch=2)
    >>> stats["median_ms"], stats["min_ms"], stats["throughput_per_s"]
    (2.5, 1.0, 800.0)
    >>> in_pool(1, lambda: 42)
    (42, 1)
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from pathlib import Path

import numpy as np

# flags worth knowing when reading a result (names as /proc/cpuinfo spells them)
STAMP_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_vpopcntdq",
               "avx512vbmi", "amx_int8")
THREADS_ENV = "TVM_NUM_THREADS"


def in_pool(threads: int, fn):
    """``(fn(), pool size)`` with ``fn`` run on a fresh thread whose TVM pool has ``threads``
    workers (see the module docstring); the pool size is read back from the runtime."""
    import tvm.runtime

    result: dict = {}

    def work():
        try:
            result["value"] = fn()
            result["threads"] = int(tvm.runtime.num_threads())
        except BaseException as error:  # re-raised on the caller's thread
            result["error"] = error

    before = os.environ.get(THREADS_ENV)
    os.environ[THREADS_ENV] = str(threads)  # read by the runtime at every parallel launch
    try:
        worker = threading.Thread(target=work, name=f"tvm-pool-{threads}")
        worker.start()
        worker.join()
    finally:
        if before is None:
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = before
    if "error" in result:
        raise result["error"]
    return result["value"], result["threads"]


def time_calls(fn, *, warmup: int = 10, runs: int | None = None, seconds: float | None = None,
               min_runs: int = 10) -> list[float]:
    """Milliseconds of each of ``runs`` calls of ``fn`` (or as many as fit in ``seconds``, at
    least ``min_runs``), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if runs is not None:
            if len(times) >= runs:
                break
        elif len(times) >= min_runs and time.perf_counter() - start >= (seconds or 0.0):
            break
    return times


def latency_stats(times_ms: list[float], *, batch: int) -> dict:
    """median / p90 / p99 / min / mean ms and samples per second at the median."""
    t = np.asarray(times_ms, np.float64)
    median = float(statistics.median(times_ms))
    return {"median_ms": round(median, 6), "p90_ms": round(float(np.percentile(t, 90)), 6),
            "p99_ms": round(float(np.percentile(t, 99)), 6), "min_ms": round(float(t.min()), 6),
            "mean_ms": round(float(t.mean()), 6), "runs": len(times_ms),
            "throughput_per_s": round(batch * 1e3 / median, 2) if median > 0 else None}


def machine_stamp(threads: int | None) -> dict:
    """CPU model, ISA flags, thread count, versions and load average, for a result JSON."""
    cpu, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    from . import __version__

    versions = {"python": platform.python_version(), "tvm_ternary": __version__, "numpy": np.__version__}
    from importlib.metadata import version

    for name, dist in (("tvm", "apache-tvm"), ("onnxruntime", "onnxruntime"), ("openvino", "openvino"),
                       ("torch", "torch")):
        try:
            versions[name] = version(dist)
        except Exception:  # not installed (or a source build without metadata)
            pass
    llvm_cpu = None
    try:  # the compiler's name for the host CPU; absent in a runtime-only TVM
        from tvm.target import codegen

        llvm_cpu = str(codegen.llvm_get_system_cpu())
    except Exception:
        pass
    return {"cpu": cpu, "llvm_cpu": llvm_cpu, "isa_flags": [f for f in STAMP_FLAGS if f in flags],
            "threads": threads, "versions": versions, "cores": os.cpu_count(),
            "loadavg": [round(v, 2) for v in os.getloadavg()],
            "nice": os.getpriority(os.PRIO_PROCESS, 0)}  # < 0: run with priority over other jobs


def profile_vm(vm, args, *, runs: int = 20) -> list[dict]:
    """Median wall time of every non-builtin call of ``vm["main"](*args)``, in call order.

    TVM 0.27's Relax VM has no ``profile()``; its ``set_instrument`` hook is called before and
    after every Call instruction, so timing between the two gives each kernel's time with the
    layer's real shapes and memory state (~1 us of hook overhead per call). Each record:
    symbol, shapes (arguments; the last one is the output of a call_tir), median_ms.
    """
    records: list[list] = []  # per run: [(symbol, shapes, ms)]
    state = {"t0": 0.0, "run": None}

    def instrument(func, symbol, before, ret, *call_args):
        symbol = str(symbol)
        if symbol.startswith("vm.builtin"):
            return 0
        if before:
            state["t0"] = time.perf_counter()
        else:
            shapes = [tuple(int(d) for d in a.shape) for a in call_args if hasattr(a, "shape")]
            state["run"].append((symbol, shapes, (time.perf_counter() - state["t0"]) * 1e3))
        return 0

    vm.set_instrument(instrument)
    try:
        for i in range(runs + 1):
            state["run"] = []
            vm["main"](*args)
            if i:  # the first run warms up
                records.append(state["run"])
    finally:
        vm.set_instrument(lambda *a: 0)
    return [{"symbol": symbol, "shapes": shapes, "median_ms": statistics.median(run[j][2] for run in records)}
            for j, (symbol, shapes, _) in enumerate(records[0])]


def label_profile(rows: list[dict], coverage: list[dict], *, peak_gmacs: float | None = None) -> list[dict]:
    """Name each kernel call's layer (the n-th call of a kernel is the n-th layer the sidecar's
    coverage lists with that kernel) and add its G MAC/s, its share of ``peak_gmacs`` (the
    host's vpdpbusd peak, when known) and its share of the summed time."""
    layers: dict[str, list[dict]] = {}
    for row in coverage:
        if row.get("kernel"):
            layers.setdefault(row["kernel"], []).append(row)
    seen: dict[str, int] = {}
    total = sum(r["median_ms"] for r in rows) or 1.0
    out = []
    for r in rows:
        r = dict(r, layer=None, weights=None, macs=None, gmacs_per_s=None, peak_share=None)
        owners = layers.get(r["symbol"], [])
        i = seen.get(r["symbol"], 0)
        seen[r["symbol"]] = i + 1
        if i < len(owners):
            cov = owners[i]
            r.update(layer=cov["layer"], weights=cov["weights"], macs=cov.get("macs"))
            if r["macs"] and r["median_ms"] > 0:
                r["gmacs_per_s"] = round(r["macs"] / r["median_ms"] / 1e6, 3)
                if peak_gmacs:
                    r["peak_share"] = round(r["gmacs_per_s"] / peak_gmacs, 6)
        r["share"] = round(r["median_ms"] / total, 4)
        out.append(r)
    return out


def bench_library(path, *, threads: int | None = None, batch: int | None = None, warmup: int = 10,
                  runs: int | None = None, seconds: float | None = 1.0, profile_runs: int = 0,
                  peak: bool = False) -> dict:
    """Load ``path`` (runtime only) and time it with a pool of ``threads`` (default: TVM's own
    choice, ``TVM_NUM_THREADS`` or half the logical CPUs). ``batch`` samples per timed call
    (default the model's batch; a multiple of it runs one library call per model batch).
    The result: :func:`latency_stats`'s fields, threads read back from the runtime, batch,
    warmup, the stamp, and with ``profile_runs`` the labelled per-call profile (with ``peak``
    each layer's share of the host's measured vpdpbusd peak at the same thread count)."""
    from .errors import UserError
    from .runtime import load

    model = load(path)
    model_batch = model.input_shape[0]
    batch = batch or model_batch
    if batch % model_batch:
        raise UserError(f"--batch {batch} is not a multiple of the library's batch {model_batch}")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(model_batch, *model.input_shape[1:])).astype(np.float32)

    def work():
        import tvm.runtime

        dev = tvm.runtime.cpu(0)
        inputs = [tvm.runtime.tensor(x, dev) for _ in range(batch // model_batch)]
        main = model.vm["main"]

        def one_batch():
            for t in inputs:
                main(t)

        times = time_calls(one_batch, warmup=warmup, runs=runs, seconds=seconds)
        prof = profile_vm(model.vm, [inputs[0]], runs=profile_runs) if profile_runs else None
        return times, prof

    if threads is None:  # the pool this thread already has, as `run` and a serving process get it
        import tvm.runtime

        times, prof = work()
        pool = int(tvm.runtime.num_threads())
    else:
        (times, prof), pool = in_pool(threads, work)
    result = {"library": str(path), "input_shape": list(model.input_shape), "batch": batch,
              "threads": pool, "threads_requested": threads, "warmup": warmup,
              **latency_stats(times, batch=batch)}
    stamp = machine_stamp(pool)
    result.update(cpu=stamp["cpu"], isa_flags=stamp["isa_flags"], stamp=stamp,
                  target=model.sidecar.get("target"), quant_config=model.sidecar.get("quant_config"))
    if peak:
        from .peak import measure_vnni_peak

        isa = (model.sidecar.get("target") or {}).get("isa")
        result["peak_gmacs_per_s"] = measure_vnni_peak(pool) if isa == "vnni512" else None
        if result["peak_gmacs_per_s"] is None:
            result["peak_note"] = (f"no peak: the library's ISA is {isa}, the peak benchmark is AVX512-VNNI"
                                   if isa != "vnni512" else "no peak: the vpdpbusd benchmark did not build or run (gcc?)")
    if prof is not None:
        result["profile"] = label_profile(prof, model.sidecar.get("coverage", []),
                                          peak_gmacs=result.get("peak_gmacs_per_s"))
    return result


def format_profile(rows: list[dict]) -> str:
    """The per-call table: time, share of the summed time, G MAC/s of the kernels."""
    with_peak = any(r.get("peak_share") is not None for r in rows)
    head = ("#", "function", "layer", "weights", "output", "ms", "%", "GMAC/s") + (("% peak",) if with_peak else ())
    table = [head]
    for i, r in enumerate(rows):
        out_shape = "x".join(map(str, r["shapes"][-1])) if r["shapes"] else "-"
        table.append((str(i), r["symbol"], r["layer"] or "-", r["weights"] or "-", out_shape,
                      f"{r['median_ms']:.3f}", f"{100 * r['share']:.1f}",
                      "-" if r["gmacs_per_s"] is None else f"{r['gmacs_per_s']:.1f}")
                     + ((("-" if r.get("peak_share") is None else f"{100 * r['peak_share']:.1f}"),) if with_peak else ()))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.append(f"sum of per-call medians: {sum(r['median_ms'] for r in rows):.3f} ms")
    return "\n".join(lines)
