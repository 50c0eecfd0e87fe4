"""``tvm-ternary compile``: ONNX model in, ternary shared library (+ sidecar JSON) out."""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

from . import Command
from ._options import (
    add_preprocess_arguments,
    add_quant_arguments,
    add_calibration_arguments,
    check_output,
    parse_input_shapes,
    preprocess_config,
    quant_config,
)

DESCRIPTION = """\
Quantize a float ONNX CNN (ternary weights by default, 8-bit activations) and compile it for an
x86 CPU. A model that is already quantized (QDQ ONNX from onnxruntime.quantization, NNCF,
brevitas, ...) is compiled as it is: its activation scales and zero points, its weights (ternary
per group where they are, else 4/8-bit), no --calib. Every eligible conv/dense runs as a tvm_ternary kernel with its epilogue fused;
activations stay integer between quantized layers. Writes OUT.so (weights embedded) and
OUT.so.json (inputs, outputs, preprocessing, quantization config, target, required CPU
features, per-layer coverage). Prints the coverage report, compile time and peak memory."""

EPILOG = """\
example:
  tvm-ternary compile ../shared/data/imagenet/models/squeezenet1.1.onnx -o squeezenet.so \\
      --preprocess caffe --calib ../shared/data/imagenet/images/calib1000"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx", type=Path, help="float ONNX model")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="OUT.so", help="library to write")
    parser.add_argument("--target", default="host", metavar="host|MCPU",
                        help="CPU to compile for: host (detected) or an LLVM mcpu such as znver4, "
                             "icelake-server, skylake-avx512, haswell")
    parser.add_argument("--calib", type=Path, metavar="DIR|FILE.npy",
                        help="calibration images: a folder (with --preprocess) or a stacked .npy "
                             "(required for a float model; a QDQ model carries its own scales)")
    add_calibration_arguments(parser)
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME:1,3,224,224",
                        help="static input shape (needed when the model's batch is dynamic)")
    parser.add_argument("--tuning-db", type=Path, metavar="DIR", help="apply tuned schedules from this database")
    parser.add_argument("--quiet", action="store_true", help="no progress bars on stderr")
    parser.add_argument("--emit-onnx", type=Path, metavar="PATH.onnx",
                        help="also write the quantized model as standard QDQ ONNX (int8 weights "
                             "q_g*t per channel, our activation scales); ONNX Runtime runs it and "
                             "compile re-imports it to the same library")
    parser.add_argument("--max-drop", type=float, metavar="P",
                        help="per-layer sensitivity policy: ternary / 4 / 8-bit per layer, as many "
                             "MACs ternary as keep the top-1 points lost within P, checked on --calib "
                             "images calibration did not take (accuracy with the folder's labels.txt, "
                             "else agreement with the float model; a seeded quarter of the calibration "
                             "images is held out when none are left)")
    add_quant_arguments(parser)
    add_preprocess_arguments(parser)


def run(args: argparse.Namespace) -> int:

    start = time.perf_counter()
    config = quant_config(args)
    preprocess = preprocess_config(args)
    check_output(args.output, inputs=(args.model, args.calib), what="library", library=True)
    if args.emit_onnx is not None:
        check_output(args.emit_onnx, inputs=(args.model, args.calib, args.output), what="QDQ ONNX model")
    import tvm_ternary

    compiled = tvm_ternary.compile(args.model, calib=args.calib, config=config, target=args.target,
                                   preprocess=preprocess, calib_limit=args.calib_limit,
                                   calib_seed=args.calib_seed,
                                   input_shapes=parse_input_shapes(args.input_shape),
                                   tuning_db=args.tuning_db, max_drop=args.max_drop,
                                   progress=not args.quiet)
    meta = compiled.export(args.output)
    print(format_coverage(meta))
    if args.emit_onnx is not None:
        from ..export_onnx import emit_qdq_onnx

        emit_qdq_onnx(compiled.plan, args.emit_onnx)
        print(f"wrote {args.emit_onnx}: the quantized model as QDQ ONNX")
    if args.tuning_db is not None:
        print(format_schedules(compiled.rewrite.schedules, args.tuning_db))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in compiled.seconds.items())
    print(f"wrote {args.output} and {args.output}.json for {meta['target']['mcpu']} ({meta['target']['isa']}); "
          f"compile time {time.perf_counter() - start:.1f} s ({steps}); peak memory {peak_mb:.0f} MB")
    return 0


def _target(name):
    """The target of ``--target`` (None or "host": this CPU); an unknown CPU is a one-line error."""
    from ..api import _target as target_of

    return target_of(name)


def format_schedules(schedules: dict, path) -> str:
    """Which kernels got a tuned schedule from the database and which kept the default."""
    tuned = [k for k, v in schedules.items() if v.startswith("tuned")]
    lines = [f"tuning database {path}: {len(tuned)} of {len(schedules)} kernels tuned"]
    lines += [f"  {name}: {status}" for name, status in schedules.items()]
    return "\n".join(lines)


def format_coverage(meta: dict) -> str:
    rows = meta["coverage"]
    head = ("layer", "op", "weights", "reason", "fused", "status", "kernel", "w-err", "out-err")
    table = [head] + [(r["layer"], r["op"], r["weights"], r["reason"], r["fused"], r["status"],
                       r.get("kernel_format") or "-",
                       "-" if r["weight_error"] is None else f"{r['weight_error']:.3f}",
                       "-" if r["output_error"] is None else f"{r['output_error']:.3f}") for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in table]
    counts = {}
    macs = {}
    for r in rows:
        kind = r["weights"] if r["status"] == "kernel" else "float"
        counts[kind] = counts.get(kind, 0) + 1
        macs[kind] = macs.get(kind, 0) + (r["macs"] or 0)
    total = sum(macs.values()) or 1
    summary = ", ".join(f"{counts[k]} {k} ({100 * macs[k] / total:.1f}% of MACs)" for k in sorted(counts))
    already = sum(1 for r in rows if r["already_ternary"])
    if meta.get("quantization") == "model":
        lines.append("quantization: read from the model (QDQ scales, zero points and weights); "
                     "no calibration")
    lines.append(f"coverage: {len(rows)} conv/dense layers: {summary}"
                 + (f"; {already} already ternary, kept exactly" if already else ""))
    lines.append(f"integer ops between layers: {len(meta['integer_ops'])} ({', '.join(sorted(set(meta['integer_ops']))) or 'none'})")
    floats = meta.get("float_ops", {})
    lines.append("float ops (run in float32, outside the integer region): "
                 + (", ".join(f"{op} x{n}" for op, n in floats.items()) or "none"))
    return "\n".join(lines)


COMMAND = Command(name="compile", summary="quantize an ONNX CNN and compile it to a shared library",
                  add_arguments=add_arguments, run=run, description=DESCRIPTION, epilog=EPILOG)
