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
    load_calibration,
    parse_input_shapes,
    preprocess_config,
    quant_config,
)

DESCRIPTION = """\
Quantize a float ONNX CNN (ternary weights by default, 8-bit activations) and compile it for an
x86 CPU. Every eligible conv/dense runs as a tvm_ternary kernel with its epilogue fused;
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
                        help="calibration images: a folder (with --preprocess) or a stacked .npy (required)")
    add_calibration_arguments(parser)
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME:1,3,224,224",
                        help="static input shape (needed when the model's batch is dynamic)")
    parser.add_argument("--tuning-db", type=Path, metavar="DIR", help="apply tuned schedules from this database")
    add_quant_arguments(parser)
    add_preprocess_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from .. import onnx_io
    from ..errors import OptionError, UserError

    start = time.perf_counter()
    config = quant_config(args)
    preprocess = preprocess_config(args)
    if args.calib is None:
        raise OptionError("--calib DIR|FILE.npy is required: activation scales come from calibration images")
    if not args.output.parent.is_dir():
        raise UserError(f"{args.output.parent}: output directory does not exist")
    if args.output.is_dir():
        raise UserError(f"{args.output}: is a directory, expected a library file name (OUT.so)")
    model = onnx_io.load_model(args.model)
    shapes = parse_input_shapes(args.input_shape)

    from ..compiler import compile_model
    from ..passes.onnx_normalize import normalize_onnx

    prep = normalize_onnx(model, input_shapes=shapes)
    images, calibration = load_calibration(args.calib, preprocess=preprocess, input_shape=prep.input_shape,
                                           limit=args.calib_limit, seed=args.calib_seed)
    target = _target(None if args.target == "host" else args.target)
    kernels = None
    if args.tuning_db is not None:
        from ..tuning import TunedKernels, open_database

        kernels = TunedKernels(open_database(args.tuning_db, target=target, create=False))
    compiled = compile_model(model, config=config, calib_images=images, target=target,
                             input_shapes=shapes, kernels=kernels)
    meta = compiled.export(args.output, preprocess=preprocess, calibration=calibration)
    print(format_coverage(meta))
    if kernels is not None:
        print(format_schedules(compiled.rewrite.schedules, kernels.tdb.path))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in compiled.seconds.items())
    print(f"wrote {args.output} and {args.output}.json for {meta['target']['mcpu']} ({meta['target']['isa']}); "
          f"compile time {time.perf_counter() - start:.1f} s ({steps}); peak memory {peak_mb:.0f} MB")
    return 0


def _target(name):
    from .. import tvm_adapter as ta
    from ..errors import OptionError

    try:
        return ta.as_target(name)
    except Exception as error:  # TVM raises its own error types for an unknown mcpu
        raise OptionError(f"--target {name!r}: not a CPU LLVM knows ({error})") from None


def format_schedules(schedules: dict, path) -> str:
    """Which kernels got a tuned schedule from the database and which kept the default."""
    tuned = [k for k, v in schedules.items() if v.startswith("tuned")]
    lines = [f"tuning database {path}: {len(tuned)} of {len(schedules)} kernels tuned"]
    lines += [f"  {name}: {status}" for name, status in schedules.items()]
    return "\n".join(lines)


def format_coverage(meta: dict) -> str:
    rows = meta["coverage"]
    head = ("layer", "op", "weights", "reason", "fused", "status", "w-err", "out-err")
    table = [head] + [(r["layer"], r["op"], r["weights"], r["reason"], r["fused"], r["status"],
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
    lines.append(f"coverage: {len(rows)} conv/dense layers: {summary}"
                 + (f"; {already} already ternary, kept exactly" if already else ""))
    lines.append(f"integer ops between layers: {len(meta['integer_ops'])} ({', '.join(sorted(set(meta['integer_ops']))) or 'none'})")
    floats = meta.get("float_ops", {})
    lines.append("float ops (run in float32, outside the integer region): "
                 + (", ".join(f"{op} x{n}" for op, n in floats.items()) or "none"))
    return "\n".join(lines)


COMMAND = Command(name="compile", summary="quantize an ONNX CNN and compile it to a shared library",
                  add_arguments=add_arguments, run=run, description=DESCRIPTION, epilog=EPILOG)
