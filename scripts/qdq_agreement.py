"""Top-1 agreement of our library with ONNX Runtime on a model quantized by ORT (QDQ).

For each model: normalise the float model (fp32, static shape), quantize it with
``onnxruntime.quantization.quantize_static`` (QDQ, u8 asymmetric activations, s8 per-channel
weights, min-max calibration on a spread sample of ``calib1000`` — that folder is sorted by
class, so every k-th image), compile the QDQ model with no calibration, and compare on
``val200``: top-1 agreement of the library with ORT running the same QDQ model, top-1 accuracy
of both, and the library against its own numpy reference (bit-exact).

    python scripts/qdq_agreement.py --models squeezenet mobilenetv2 --out reports/qdq_agreement.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "imagenet"
MODELS = {
    "squeezenet": ("models/squeezenet1.1.onnx", "caffe"),
    "mobilenetv2": ("models/mobilenet_v2_wint8.onnx", "torchvision"),
}


def labelled_folder(path: Path, limit: int | None = None, stride: int = 1):
    rows = [line.split(",") for line in (path / "labels.txt").read_text().split()]
    rows = rows[::stride][:limit]
    return [path / name for name, _ in rows], np.array([int(label) for _, label in rows])


def ort_quantize(model, images: np.ndarray, path: Path) -> None:
    import onnx
    import onnx.version_converter
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    # IR < 4 exports list weights as graph inputs too; ORT would treat them as overridable
    # inputs and leave them float. Keep the data input only.
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name for t in model.graph.initializer}
    data = [v for v in model.graph.input if v.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(data)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:  # per-channel DequantizeLinear (axis) needs opset 13
        model.ir_version = max(model.ir_version, 7)  # initializers need not be inputs
        model = onnx.version_converter.convert_version(model, 13)
    name = data[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(images[i : i + 1] for i in range(len(images)))

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {name: x}

    src = path.with_suffix(".float.onnx")
    onnx.save(model, src)
    quantize_static(str(src), str(path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    src.unlink()


def ort_run(path: Path, x: np.ndarray, *, optimized: bool = True) -> np.ndarray:
    """ORT on the QDQ model; ``optimized=False`` runs the graph as written (DequantizeLinear ->
    float op -> QuantizeLinear), the default fuses QDQ groups into integer kernels."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    if not optimized:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])


def measure(key: str, *, workdir: Path, calib_count: int, val_limit: int | None,
            emit_onnx: bool = False) -> dict:
    from tvm_ternary import onnx_io
    from tvm_ternary.compiler import compile_model
    from tvm_ternary.passes.onnx_normalize import normalize_onnx
    from tvm_ternary.plan import QuantConfig, simulate
    from tvm_ternary.preprocess import PreprocessConfig, preprocess_images

    rel, preset = MODELS[key]
    pre = PreprocessConfig.preset(preset)
    prep = normalize_onnx(onnx_io.load_model(SHARED / rel))
    calib_paths, _ = labelled_folder(SHARED / "images" / "calib1000", calib_count, 1000 // calib_count)
    calib = preprocess_images(calib_paths, config=pre, input_shape=prep.input_shape).astype(np.float32)
    val_paths, labels = labelled_folder(SHARED / "images" / "val200", val_limit)
    val = preprocess_images(val_paths, config=pre, input_shape=prep.input_shape).astype(np.float32)

    t0 = time.perf_counter()
    qdq_path = workdir / f"{key}_qdq.onnx"
    ort_quantize(prep.model, calib, qdq_path)
    t_quant = time.perf_counter() - t0
    t0 = time.perf_counter()
    cm = compile_model(onnx_io.load_model(qdq_path), config=QuantConfig(), progress=False)
    t_compile = time.perf_counter() - t0
    ours = cm.run(val)
    theirs = ort_run(qdq_path, val)
    written = ort_run(qdq_path, val, optimized=False)
    sim = simulate(cm.plan, val[:8])
    np.savez(workdir / f"{key}_outputs.npz", ours=ours, ort=theirs, labels=labels)
    kinds: dict[str, int] = {}
    for row in cm.plan.coverage():
        kinds[row["weights"]] = kinds.get(row["weights"], 0) + 1
    result = {
        "model": key, "calib_images": len(calib), "val_images": len(val),
        "layers": kinds, "left_float": dict(cm.rewrite.left_float),
        "top1_agreement_with_ort": agreement(ours, theirs),
        "top1_agreement_with_ort_tie_aware": agreement(ours, theirs, ties=True),
        "top1_agreement_with_ort_unoptimized": agreement(ours, written),
        # the noise floor: ORT's fused integer kernels against the same graph run as written
        "top1_agreement_ort_vs_ort_unoptimized": agreement(theirs, written),
        "top1_ours": float(np.mean(ours.reshape(len(val), -1).argmax(1) == labels)),
        "top1_ort_qdq": float(np.mean(theirs.reshape(len(val), -1).argmax(1) == labels)),
        # float ops after the last integer layer (pool, softmax) differ from numpy by ulps
        "library_vs_numpy_reference_max_abs_diff_first8": float(np.abs(ours[:8] - sim).max()),
        "ort_output_ties_at_top1": int(np.sum(np.sort(theirs.reshape(len(val), -1), 1)[:, -1]
                                              == np.sort(theirs.reshape(len(val), -1), 1)[:, -2])),
        "seconds": {"ort_quantize": round(t_quant, 1), "compile": round(t_compile, 1)},
    }
    if emit_onnx:
        result["emit_onnx"] = roundtrip(cm, ours, val, labels, workdir / f"{key}_emitted.onnx")
    return result


def measure_ours(key: str, *, workdir: Path, calib_count: int, val_limit: int | None) -> dict:
    """Round trip of OUR quantization (ternary FGQ N=4, data-aware, 8-bit activations, the
    compile defaults): compile the float model with calibration, ``--emit-onnx``, compile the
    emitted QDQ file without calibration, compare on val200."""
    from tvm_ternary import onnx_io
    from tvm_ternary.compiler import compile_model
    from tvm_ternary.passes.onnx_normalize import normalize_onnx
    from tvm_ternary.plan import QuantConfig
    from tvm_ternary.preprocess import PreprocessConfig, preprocess_images

    rel, preset = MODELS[key]
    pre = PreprocessConfig.preset(preset)
    model = onnx_io.load_model(SHARED / rel)
    shape = normalize_onnx(model).input_shape
    calib_paths, _ = labelled_folder(SHARED / "images" / "calib1000", calib_count, 1000 // calib_count)
    calib = preprocess_images(calib_paths, config=pre, input_shape=shape).astype(np.float32)
    val_paths, labels = labelled_folder(SHARED / "images" / "val200", val_limit)
    val = preprocess_images(val_paths, config=pre, input_shape=shape).astype(np.float32)
    t0 = time.perf_counter()
    cm = compile_model(model, config=QuantConfig(), calib_images=calib, progress=False)
    seconds = time.perf_counter() - t0
    kinds: dict[str, int] = {}
    for row in cm.plan.coverage():
        kinds[row["weights"]] = kinds.get(row["weights"], 0) + 1
    ours = cm.run(val)
    result = {"model": key, "quantization": "ours (ternary N=4, data-aware)", "layers": kinds,
              "calib_images": len(calib), "val_images": len(val),
              "top1_ours": float(np.mean(ours.reshape(len(val), -1).argmax(1) == labels)),
              "seconds": {"compile": round(seconds, 1)}}
    result["emit_onnx"] = roundtrip(cm, ours, val, labels, workdir / f"{key}_ours_emitted.onnx")
    return result


def agreement(a: np.ndarray, b: np.ndarray, *, ties: bool = False) -> float:
    """Share of images where ``a``'s top-1 is ``b``'s; ``ties``: or is tied with it in ``b``
    (a quantized output often has two classes on the same step)."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    top = a.argmax(1)
    if not ties:
        return float(np.mean(top == b.argmax(1)))
    return float(np.mean(b[np.arange(len(b)), top] == b.max(1)))


def roundtrip(cm, ours: np.ndarray, val: np.ndarray, labels, path: Path) -> dict:
    """``compile --emit-onnx`` then compile the emitted file: same outputs? ORT agrees?"""
    from tvm_ternary import onnx_io
    from tvm_ternary.compiler import compile_model
    from tvm_ternary.export_onnx import emit_qdq_onnx
    from tvm_ternary.plan import QuantConfig

    emit_qdq_onnx(cm.plan, path)
    again = compile_model(onnx_io.load_model(path), config=QuantConfig(), progress=False).run(val)
    theirs = ort_run(path, val)
    written = ort_run(path, val, optimized=False)
    n = len(val)
    return {
        "top1_agreement_library_vs_ort_unoptimized_on_emitted": agreement(ours, written),
        "top1_agreement_ort_vs_ort_unoptimized_on_emitted": agreement(theirs, written),
        "reimport_bit_identical": bool(np.array_equal(again, ours)),
        "reimport_max_abs_diff": float(np.abs(again - ours).max()),
        "top1_agreement_ort_on_emitted_vs_library": float(np.mean(
            theirs.reshape(n, -1).argmax(1) == ours.reshape(n, -1).argmax(1))),
        "top1_ort_on_emitted": float(np.mean(theirs.reshape(n, -1).argmax(1) == labels)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--calib", type=int, default=100, help="calibration images (spread over calib1000)")
    parser.add_argument("--val-limit", type=int, default=None)
    parser.add_argument("--emit-onnx", action="store_true", help="also check the --emit-onnx round trip")
    parser.add_argument("--ours", action="store_true",
                        help="round trip of our own quantization (ternary) instead of ORT's")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qdq_agreement"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for key in args.models:
        if args.ours:
            res = measure_ours(key, workdir=args.workdir, calib_count=args.calib, val_limit=args.val_limit)
        else:
            res = measure(key, workdir=args.workdir, calib_count=args.calib, val_limit=args.val_limit,
                          emit_onnx=args.emit_onnx)
        print(json.dumps(res), flush=True)
        results.append(res)
    if args.out:
        from _bench_common import machine_stamp

        args.out.write_text(json.dumps({"machine": machine_stamp(1), "command": " ".join(sys.argv),
                                        "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
