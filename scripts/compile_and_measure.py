#!/usr/bin/env python3
"""Compile an ONNX CNN with tvm_ternary and measure it end to end against ONNX Runtime / OpenVINO.

    python scripts/compile_and_measure.py MODEL.onnx --calib DIR|X.npy [--preprocess P] \\
        [--weight-bits 2|4|8] [--method exact] [--threads 1,2] [--json OUT.json]

Batch 1, one input at a time. Columns, all on the same graph and the same calibration images:
- ``tvm_ternary``: our library (the exported ``.so``, loaded as a user would);
- ``ort_fp32``: ONNX Runtime on the float32 graph (fp16 weights / DequantizeLinear weights made
  float32, static input shape: what our compiler imports);
- ``ort_int8``: ONNX Runtime static QDQ (u8 activations, s8 per-channel weights; u8 because its
  s8-activation paths are several times slower on x86 and would flatter us);
- ``openvino_int8``: OpenVINO on that same QDQ model (its low-precision transformations run the
  Q/DQ-wrapped convolutions in int8); skipped with a note when OpenVINO is not installed.
Latency is the median of interleaved rounds (see ``_bench_common.interleaved_medians``) per
thread count, each thread count in a fresh process started with ``TVM_NUM_THREADS`` (TVM sizes
its pool at start-up). Then a per-kernel profile of our library (where the time goes) and model bytes.
The JSON is stamped with CPU model, ISA flags, versions and the load average before and after:
on a shared machine, read the numbers with the load.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import (interleaved_medians, machine_stamp, openvino_op_sum_ms, ort_int8_qdq,  # noqa: E402
                           ort_op_sum_ms, profile_vm)

from tvm_ternary import onnx_io  # noqa: E402
from tvm_ternary import tvm_adapter as ta  # noqa: E402
from tvm_ternary.commands._options import (add_preprocess_arguments, add_quant_arguments,  # noqa: E402
                                           load_images, parse_input_shapes, preprocess_config,
                                           quant_config)
from tvm_ternary.passes.onnx_normalize import normalize_onnx  # noqa: E402


def float_model(prep) -> onnx.ModelProto:
    """The normalised float32 graph for ONNX Runtime; weights no longer listed as graph inputs
    (Caffe2-era models do that: ORT would then treat them as overridable and not fold them)."""
    model = onnx.ModelProto()
    model.CopyFrom(prep.model)
    inits = {t.name for t in model.graph.initializer}
    kept = [v for v in model.graph.input if v.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    if model.ir_version < 4:  # IR 3 demands every initializer be a graph input
        model.ir_version = 4
    if prep.opset < 13:  # per-channel QDQ needs opset 13; upgrade the float graph for all runtimes
        model = onnx.version_converter.convert_version(model, 13)
    return model


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def openvino_runner(path: Path, threads: int):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})


def kernel_profile(cm, rows: list[dict]) -> tuple[list[dict], dict]:
    """Annotate profile_vm's rows with the layer of each kernel call; a summary by kind."""
    coverage = {r["layer"]: r for r in cm.plan.coverage()}
    by_symbol: dict[str, list[str]] = {}
    for layer in cm.rewrite.fused:  # program order = the VM's call order
        by_symbol.setdefault(cm.rewrite.layer_kernels[layer], []).append(layer)
    seen: dict[str, int] = {}
    for row in rows:
        layers = by_symbol.get(row["symbol"])
        if layers:
            i = seen.get(row["symbol"], 0)
            seen[row["symbol"]] = i + 1
            row["layer"] = layers[i] if i < len(layers) else "?"
            cov = coverage.get(row["layer"], {})
            row["weights"] = cov.get("weights")
            row["macs"] = cov.get("macs")
            row["gmacs"] = round(row["macs"] / row["median_ms"] / 1e6, 1) if row["macs"] else None
            row["kind"] = "kernel " + ("depthwise" if cm.rewrite.kernels.get(row["symbol"]) == "plain"
                                       else str(row["weights"]))
        else:
            s = row["symbol"]
            row["kind"] = ("quantize/dequantize" if "quantize" in s else "max_pool (int)"
                           if "max_pool" in s else "concat (int)" if "concat" in s else "float ops")
    summary: dict[str, float] = {}
    for row in rows:
        summary[row["kind"]] = summary.get(row["kind"], 0.0) + row["median_ms"]
    return rows, summary


def time_child(spec_path: Path) -> None:
    """Timing in a fresh process per thread count: TVM sizes its thread pool from
    TVM_NUM_THREADS when the runtime starts; runtime.config_threadpool afterwards did not change
    the speed here (2 threads ran like 1), so the parent sets the variable and starts us."""
    import tvm.runtime

    from tvm_ternary.runtime import load

    spec = json.loads(spec_path.read_text())
    t, name_in = spec["threads"], spec["input_name"]
    x = np.load(spec["x"])
    lib = load(spec["lib"])
    x_tvm = tvm.runtime.tensor(x)
    main_fn = lib.vm["main"]
    fns = {"tvm_ternary": lambda: main_fn(x_tvm)}
    for name, path in spec["onnx"].items():
        fns[name] = (lambda sess: lambda: sess.run(None, {name_in: x}))(ort_session(path, t))
    if spec["openvino"]:
        ov_run = openvino_runner(spec["onnx"]["ort_int8"], t)
        fns["openvino_int8"] = lambda: ov_run(x)
    out = {"latency": interleaved_medians(fns, rounds=spec["rounds"])}
    if spec["profile_runs"]:
        out["profile"] = profile_vm(lib.vm, [x_tvm], runs=spec["profile_runs"])
        out["op_sums"] = {name: ort_op_sum_ms(Path(path), name_in, x, threads=t, runs=spec["profile_runs"])
                          for name, path in spec["onnx"].items()}
        if spec["openvino"]:
            out["op_sums"]["openvino_int8"] = openvino_op_sum_ms(Path(spec["onnx"]["ort_int8"]), x, threads=t,
                                                                 runs=spec["profile_runs"])
    Path(spec["out"]).write_text(json.dumps(out, default=str))


def run_child(work: Path, spec: dict) -> dict:
    t = spec["threads"]
    spec = dict(spec, out=str(work / f"times_{t}.json"))
    spec_path = work / f"spec_{t}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, TVM_NUM_THREADS=str(t), OMP_NUM_THREADS=str(t))
    subprocess.run([sys.executable, __file__, "--time-child", str(spec_path)], env=env, check=True)
    return json.loads(Path(spec["out"]).read_text())


def print_profile(rows, summary, *, total_ms: float) -> None:
    print(f"\nper-kernel profile (1 thread, median per call; sum {sum(summary.values()):.2f} ms, "
          f"end-to-end {total_ms:.2f} ms):")
    head = ("#", "function", "layer", "weights", "output shape", "ms", "%", "GMAC/s")
    table = [head]
    tot = sum(summary.values()) or 1.0
    for i, r in enumerate(rows):
        table.append((str(i), r["symbol"], r.get("layer", "-"), str(r.get("weights") or "-"),
                      "x".join(map(str, r["shapes"][-1])) if r["shapes"] else "-", f"{r['median_ms']:.3f}",
                      f"{100 * r['median_ms'] / tot:.1f}", str(r.get("gmacs") or "-")))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print("by kind: " + ", ".join(f"{k} {v:.2f} ms ({100 * v / tot:.0f}%)"
                                 for k, v in sorted(summary.items(), key=lambda kv: -kv[1])))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--time-child"]:
        time_child(Path(argv[1]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, metavar="MODEL.onnx")
    ap.add_argument("--calib", type=Path, required=True, metavar="DIR|X.npy", help="calibration images")
    ap.add_argument("--calib-limit", type=int, default=64)
    ap.add_argument("--input-shape", action="append", default=[], metavar="NAME:1,3,224,224")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (3 runs each)")
    ap.add_argument("--profile-runs", type=int, default=20)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--keep", type=Path, metavar="DIR", help="keep the .so and ONNX files here")
    ap.add_argument("--skip-ort", action="store_true")
    add_quant_arguments(ap)
    add_preprocess_arguments(ap)
    a = ap.parse_args(argv)
    threads = [int(t) for t in a.threads.split(",")]

    stamp = machine_stamp(max(threads))
    print(json.dumps(stamp))
    config = quant_config(a)
    model = onnx_io.load_model(a.model)
    shapes = parse_input_shapes(a.input_shape)
    prep = normalize_onnx(model, input_shapes=shapes)
    images = load_images(a.calib, preprocess=preprocess_config(a), input_shape=prep.input_shape,
                         limit=a.calib_limit, what="calibration")

    from tvm_ternary.compiler import compile_model
    from tvm_ternary.runtime import load

    t0 = time.perf_counter()
    cm = compile_model(model, config=config, calib_images=images, input_shapes=shapes,
                       target=ta.host_target(num_cores=max(threads)))
    compile_s = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"compiled in {compile_s:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in cm.seconds.items())}); "
          f"peak memory {peak_mb:.0f} MB")

    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="cam_"))
    work.mkdir(parents=True, exist_ok=True)
    lib_path = work / f"{a.model.stem}.so"
    cm.export(lib_path)
    fp32_path = work / f"{a.model.stem}.fp32.onnx"
    onnx.save(float_model(prep), str(fp32_path))
    sizes = {"tvm_ternary_so": lib_path.stat().st_size, "fp32_onnx": fp32_path.stat().st_size,
             "source_onnx": a.model.stat().st_size}
    paths = {}
    notes = []
    if not a.skip_ort:
        int8_path = ort_int8_qdq(fp32_path, work / f"{a.model.stem}.int8.onnx",
                                 input_name=prep.input_name, images=images)
        sizes["int8_onnx"] = int8_path.stat().st_size
        paths = {"ort_fp32": fp32_path, "ort_int8": int8_path}
    try:
        import openvino  # noqa: F401

        have_ov = not a.skip_ort
    except ImportError:
        have_ov = False
        notes.append("openvino_int8 skipped: openvino not installed (pip install -e '.[openvino]')")

    x = images[:1].astype(np.float32)
    np.save(work / "x.npy", x)
    results, child_out = {}, {}
    for t in threads:
        child_out[t] = run_child(work, {
            "threads": t, "input_name": prep.input_name, "x": str(work / "x.npy"), "lib": str(lib_path),
            "onnx": {k: str(v) for k, v in paths.items()}, "openvino": have_ov, "rounds": a.rounds,
            "profile_runs": a.profile_runs if t == 1 else 0})
        results[t] = child_out[t]["latency"]
    lib = load(lib_path)
    # sanity: the library computes what the float model computes, up to quantization
    y_ours = lib.run(images[: min(8, len(images))].astype(lib.input_dtype))
    agreement = None
    if "ort_fp32" in paths:
        sess = ort_session(paths["ort_fp32"], 1)
        y_ref = np.concatenate([sess.run(None, {prep.input_name: images[i : i + 1]})[0]
                                for i in range(len(y_ours))])
        agreement = float((y_ours.reshape(len(y_ours), -1).argmax(1)
                           == y_ref.reshape(len(y_ref), -1).argmax(1)).mean())

    if 1 not in child_out:
        raise SystemExit("the per-kernel profile runs at 1 thread: include 1 in --threads")
    prof_rows, prof_summary = kernel_profile(cm, child_out[1]["profile"])
    op_sums = {"tvm_ternary": sum(prof_summary.values()), **child_out[1]["op_sums"]}
    stamp["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]

    print(f"\n{a.model.name}: end-to-end latency, batch 1, median ms (load average before "
          f"{stamp['loadavg']}, after {stamp['loadavg_after']} on {stamp['cores']} cores)")
    names = list(results[threads[0]])
    # min next to the median: on a loaded machine the min is the better estimate of an idle one
    print(f"{'runtime':16s}" + "".join(f"{f'{t}T median (min)':>20s}" for t in threads))
    for name in names:
        print(f"{name:16s}" + "".join(f"{results[t][name]['median_ms']:11.2f} ({results[t][name]['min_ms']:6.2f})"
                                      for t in threads))
    for t in threads:
        ours = results[t]["tvm_ternary"]["median_ms"]
        ratios = ", ".join(f"{n} / ours = {results[t][n]['median_ms'] / ours:.2f}" for n in names[1:])
        print(f"  {t}T: {ratios}")
    print("1 thread, sum over ops of each op's median (each runtime's own profiler; robust to load): "
          + ", ".join(f"{k} {v:.2f} ms" for k, v in op_sums.items()))
    print("model bytes: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()))
    if agreement is not None:
        print(f"top-1 agreement with ort_fp32 on the first {len(y_ours)} calibration images: {agreement:.0%}")
    for note in notes:
        print("note: " + note)
    print_profile(prof_rows, prof_summary, total_ms=results[1]["tvm_ternary"]["median_ms"]
                  if 1 in results else float("nan"))

    if a.json:
        a.json.write_text(json.dumps({
            "model": str(a.model), "stamp": stamp, "quant_config": asdict(cm.plan.config),
            "isa": cm.isa, "compile_seconds": round(compile_s, 2), "compile_steps": cm.seconds,
            "peak_memory_mb": round(peak_mb), "latency_ms": {str(t): r for t, r in results.items()},
            "op_sum_ms_1thread": op_sums,
            "bytes": sizes, "top1_agreement_ort_fp32_calib8": agreement, "notes": notes,
            "profile_1thread": prof_rows, "profile_summary_ms": prof_summary}, indent=1, default=str))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    from _bench_common import exit_code_of

    sys.exit(exit_code_of(main))
