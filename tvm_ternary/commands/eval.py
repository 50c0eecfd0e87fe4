"""``tvm-ternary eval``: accuracy of the quantized model against the float one on labelled images.

The float reference is ONNX Runtime fp32 (independent of our numpy executor and of TVM). The
quantized model is, by ``--backend``:

* ``tvm`` (default): the compiled library (``compiler.compile_model``), or a ``.so`` given as
  MODEL (then ``--float-model`` names its ONNX source);
* ``simulate``: the numpy reference pipeline (``make_plan`` + ``simulate``), the bit-exact
  reference of the compiled integer layers. Only when asked: never a fallback.

Calibration images: ``--calib-limit`` images sampled across ``--calib DIR`` (seeded by
``--calib-seed``), or by default sampled from ``--images`` (at most half of them) and then
*held out* of the evaluated set.

Example::

    >>> main(["eval", "squeezenet1.1.onnx", "--images", "val200", "--preprocess", "caffe",
    ...       "--backend", "simulate", "--json", "eval.json"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from tvm_ternary.commands import Command
from tvm_ternary.commands._options import (
    QUANT_FLAGS,
    add_calibration_arguments,
    add_quant_arguments,
    check_config,
    positive_int,
    quant_config,
    rgb_triple,
)
from tvm_ternary.errors import OptionError, UserError

BATCH = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="ONNX model, or a compiled .so (with --float-model)")
    parser.add_argument("--images", required=True, metavar="DIR", help="images + labels.txt (file,label; 0-based)")
    parser.add_argument("--preprocess", choices=("torchvision", "caffe", "unit"),
                        help="preset (a .so defaults to the one in its sidecar)")
    parser.add_argument("--mean", type=rgb_triple, metavar="R,G,B")
    parser.add_argument("--std", type=rgb_triple, metavar="R,G,B")
    parser.add_argument("--bgr", action="store_true", default=None, help="feed B,G,R channel order")
    parser.add_argument("--limit", type=positive_int, metavar="N", help="evaluate at most N images")
    parser.add_argument("--calib", metavar="DIR", help="calibration images (default: --calib-limit "
                        "images, at most half, sampled from --images and held out of the evaluation)")
    add_calibration_arguments(parser)
    add_quant_arguments(parser, defaults=False)  # a .so refuses them: tell given from default
    parser.add_argument("--max-drop", type=float, metavar="P", help="per-layer sensitivity policy: "
                        "as many MACs ternary as keep the top-1 points lost within P, checked on --calib "
                        "images calibration did not take (accuracy with their labels.txt, else agreement "
                        "with the float model)")
    parser.add_argument("--label-offset", type=int, metavar="K", help="label = class index - K "
                        "(default 1 for 1001-class outputs, else 0)")
    parser.add_argument("--backend", choices=("tvm", "simulate"), default="tvm",
                        help="tvm: the compiled library (default); simulate: the numpy reference")
    parser.add_argument("--float-model", metavar="MODEL.onnx", help="ONNX source of a .so MODEL")
    parser.add_argument("--input-shape", metavar="NAME:1,3,224,224", help="for a dynamic input")
    parser.add_argument("--target", help="compile target for --backend tvm (default host)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _preprocess(args, sidecar: dict | None):
    from tvm_ternary.preprocess import PreprocessConfig

    if args.preprocess is None and args.mean is None and args.std is None and args.bgr is None:
        saved = (sidecar or {}).get("preprocess")
        if saved:
            return PreprocessConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items()})
        raise UserError("say how to preprocess the images: --preprocess torchvision|caffe|unit "
                        "or --mean/--std/--bgr (wrong preprocessing is the classic accuracy bug)")
    return PreprocessConfig.from_options(preset=args.preprocess, mean=args.mean, std=args.std, bgr=args.bgr)


def _eval_target(args, *, is_library: bool):
    """The compile target of ``--backend tvm``, checked against this host *before* anything is
    built: eval runs the library in this process, where a missing CPU feature is a SIGILL."""
    from tvm_ternary import cpu_features
    from tvm_ternary.commands.compile import _target
    from tvm_ternary.errors import TargetError

    if args.target is None:
        return None
    if is_library or args.backend != "tvm":
        raise OptionError("--target applies to an ONNX MODEL with --backend tvm only "
                          "(a .so was compiled for its target; simulate needs none)")
    target = _target(args.target)
    from tvm_ternary import tvm_adapter as ta

    missing = cpu_features.missing_features(ta.target_features(target))
    if missing:
        raise TargetError(f"--target {ta.target_mcpu(target)} needs CPU features this host lacks "
                          f"({', '.join(missing)}) and eval runs the library here; use --target host, "
                          "or compile for it and evaluate on such a CPU")
    return target


def _check_labels(labels, *, num_classes: int, offset: int, images) -> None:
    """Labels must be class indices of this model: one outside 0..classes-1 (after the offset)
    can never be predicted, and would be counted as a silent miss."""
    from tvm_ternary.errors import InputDataError

    if labels is None:
        return
    valid = range(-offset, num_classes - offset)
    bad = [label for label in labels if label not in valid]
    if bad:
        raise InputDataError(
            f"{images}/labels.txt: {len(bad)} of {len(labels)} labels outside the model's "
            f"{num_classes} classes (valid {valid.start}..{valid.stop - 1}"
            f"{f' with --label-offset {offset}' if offset else ''}; e.g. {bad[0]}): wrong labels "
            "file, or a model trained on other classes")


def _split(args):
    """(calibration paths, evaluated paths, labels, how calibration was chosen)."""
    from tvm_ternary.preprocess import load_image_folder, sample_calibration

    paths, labels = load_image_folder(args.images)
    seed = args.calib_seed
    if args.calib is not None:
        calib, _ = load_image_folder(args.calib, limit=args.calib_limit, sample_seed=seed)
        how = f"{len(calib)} images sampled from {args.calib} (seed {seed})"
    else:
        # held out of --images: at most half of them, so something is left to evaluate
        held = set(sample_calibration(paths, min(args.calib_limit, len(paths) // 2), seed=seed))
        calib = [p for i, p in enumerate(paths) if i in held]
        rest = [i for i in range(len(paths)) if i not in held]
        paths = [paths[i] for i in rest]
        labels = None if labels is None else [labels[i] for i in rest]
        how = f"{len(calib)} images sampled from {args.images} (seed {seed}), held out of the evaluation"
        if not calib:
            raise UserError(f"{args.images} has too few images to hold some out for calibration; "
                            f"pass --calib DIR")
    if args.limit is not None:
        paths = paths[: args.limit]
        labels = None if labels is None else labels[: args.limit]
    return calib, paths, labels, how


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from tvm_ternary import evaluate as ev
    from tvm_ternary.onnx_io import load_model
    from tvm_ternary.passes.onnx_normalize import normalize_onnx, parse_input_shape
    from tvm_ternary.plan.summary import describe_config, plan_summary
    from tvm_ternary.preprocess import preprocess_images

    progress = not args.quiet
    is_library = args.model.endswith(".so")
    if args.json is not None:
        from tvm_ternary.commands._options import check_output

        check_output(args.json, inputs=(args.model, args.float_model, args.images), what="JSON results")
    target = _eval_target(args, is_library=is_library)
    shapes = dict([parse_input_shape(args.input_shape)]) if args.input_shape else None
    sidecar, loaded = None, None
    if is_library:
        if args.backend != "tvm":
            raise UserError("a compiled .so can only be evaluated with --backend tvm")
        given = [k for k in QUANT_FLAGS if getattr(args, k) is not None] + args.layer_bits + args.layer_group_size
        if given or args.max_drop is not None or args.calib is not None:
            raise UserError(f"{args.model} is already quantized: quantization and calibration "
                            "flags apply to an ONNX MODEL only")
        if args.float_model is None:
            raise UserError("evaluating a .so needs its ONNX source for the float reference: --float-model MODEL.onnx")
        from tvm_ternary import runtime

        loaded = runtime.load(args.model)
        sidecar = dict(loaded.sidecar)
    source = args.float_model if is_library else args.model
    onnx_model = load_model(source)
    prep = normalize_onnx(onnx_model, input_shapes=shapes)
    pre = _preprocess(args, sidecar)
    warnings = []
    # An already-quantized (QDQ) model is its own reference: ORT runs it as written (its
    # float graph without the Q/DQ pairs is not a float model: ORT's quantizer drops ReLUs
    # that the u8 range implies), and the plan is the one it carries (no calibration).
    imported = prep.is_quantized
    if imported and not is_library:
        given = [k for k in QUANT_FLAGS if getattr(args, k) is not None] + args.layer_bits + args.layer_group_size
        if given or args.max_drop is not None or args.calib is not None:
            raise UserError(f"{args.model} is already quantized (QDQ): its own scales and weights are "
                            "used; quantization and calibration flags apply to a float model only")
    if is_library or imported:
        from tvm_ternary.preprocess import load_image_folder

        calib_paths, how = [], "none (compiled library)" if is_library else "none (QDQ model: its own scales)"
        eval_paths, labels = load_image_folder(args.images, limit=args.limit)
        if is_library:
            config_json = sidecar.get("quant_config", {})
            config_text = f"as compiled: {json.dumps(config_json)}"
        else:
            config_json = {"quantization": "model (QDQ)"}
            config_text = "read from the model (QDQ scales, zero points and weights)"
    else:
        config = quant_config(args)
        check_config(prep.model, config)  # before any image is read (e.g. N > a layer's channels)
        if args.max_drop is not None and args.weight_bits not in (None, 2):
            raise UserError("--max-drop chooses each layer's weight bits itself; drop --weight-bits")
        calib_paths, eval_paths, labels, how = _split(args)
        config_json = {f: getattr(config, f) for f in config.__dataclass_fields__}
        config_json["overrides"] = [list(o) for o in config.overrides]
        config_text = describe_config(config)
    if (w := ev.overlap_warning(calib_paths, eval_paths)) is not None:
        warnings.append(w)
    x = preprocess_images(eval_paths, config=pre, input_shape=prep.input_shape, dtype="float32")

    float_fn = ev.onnxruntime_runner(onnx_model if imported else prep.model)
    float_scores, float_ips = ev.run_batched(
        float_fn, x, batch=BATCH, label="ORT on the QDQ model" if imported else "float (ORT fp32)",
        progress=progress)
    num_classes = float_scores.shape[1]
    offset = args.label_offset if args.label_offset is not None else ev.default_label_offset(num_classes)
    if args.label_offset is None and offset:
        print(f"note: the model has {num_classes} outputs: class 0 taken as background "
              f"(--label-offset {offset}); pass --label-offset 0 to change", file=sys.stderr)
    _check_labels(labels, num_classes=num_classes, offset=offset, images=args.images)

    summary, sensitivity_text, plan = None, None, None
    if is_library:
        # the library validates its declared input dtype (fp16 for a fp16 ONNX model)
        quant_fn = lambda b: loaded.run(b.astype(loaded.input_dtype))  # noqa: E731
        backend = "tvm (compiled library)"
        summary = sidecar.get("coverage")
    elif imported:
        from tvm_ternary.plan import plan_from_model, simulate
        from tvm_ternary.plan import QuantConfig

        start = time.perf_counter()
        plan = plan_from_model(prep)
        plan_seconds = time.perf_counter() - start
        summary = plan_summary(plan)
        if args.backend == "simulate":
            quant_fn = lambda b: simulate(plan, b)  # noqa: E731
            backend = "simulate (numpy reference of the compiled integer layers)"
        else:
            from tvm_ternary.compiler import compile_model

            compiled = compile_model(onnx_model, config=QuantConfig(), target=args.target,
                                     input_shapes=shapes, plan=plan, progress=progress, prepared=prep)
            quant_fn, backend = compiled.run, "tvm (compiled library)"
    else:
        x_calib = preprocess_images(calib_paths, config=pre, input_shape=prep.input_shape, dtype="float32")
        from tvm_ternary.plan import calibration_stats, make_plan, simulate

        start = time.perf_counter()
        if args.max_drop is not None:
            from tvm_ternary.plan.sensitivity import choose_precision

            from tvm_ternary.inputs import policy_check_set
            from tvm_ternary.plan.sensitivity import CHECK_IMAGES

            # the budget is checked on --calib images calibration did not take (labelled when
            # the folder has labels.txt); without such images the policy holds some out itself
            check = None if args.calib is None else policy_check_set(
                Path(args.calib), calibration={"files": [p.name for p in calib_paths]}, preprocess=pre,
                input_shape=prep.input_shape, limit=CHECK_IMAGES, seed=args.calib_seed)
            result = choose_precision(prep.model, x_calib, config=config, max_drops=(args.max_drop,),
                                      check=check, progress=progress)
            plan, config = result.choices[0].plan, result.choices[0].config
            sensitivity_text = result.table()
            config_json["overrides"] = [list(o) for o in config.overrides]
            config_json["group_overrides"] = [list(o) for o in config.group_overrides]
        else:
            stats = calibration_stats(prep.model, x_calib, progress=progress)
            plan = make_plan(prep.model, x_calib, config=config, stats=stats, progress=progress)
        plan_seconds = time.perf_counter() - start
        summary = plan_summary(plan)
        if args.backend == "simulate":
            quant_fn = lambda b: simulate(plan, b)  # noqa: E731
            backend = "simulate (numpy reference of the compiled integer layers)"
        else:
            try:
                from tvm_ternary.compiler import compile_model
            except ImportError as error:
                raise UserError(f"--backend tvm needs tvm_ternary.compiler, which this build lacks "
                                f"({error}); --backend simulate runs the numpy reference") from None
            # the normalised copy the plan was made on (normalised once per evaluation)
            compiled = compile_model(onnx_model, config=config, calib_images=x_calib, target=target,
                                     input_shapes=shapes, plan=plan, progress=progress, prepared=prep)
            quant_fn, backend = compiled.run, "tvm (compiled library)"
    quant_scores, quant_ips = ev.run_batched(quant_fn, x, batch=BATCH, label="quantized", progress=progress)
    metrics = ev.compare(float_scores, quant_scores, labels=labels, label_offset=offset)
    if (w := ev.preprocessing_warning(metrics, preprocess_name=pre.name, label_offset=offset)) is not None:
        warnings.append(w)

    result = {
        "float": metrics["float"], "quantized": metrics["quantized"],
        "agreement_top1": metrics["agreement_top1"], "n_images": metrics["n_images"],
        "config": config_json,
        "backend": args.backend, "model": str(args.model), "images": str(args.images),
        "calibration": {"images": len(calib_paths), "source": how,
                        **({} if plan is None else plan.calibration)},
        "label_offset": offset, "kl_divergence": metrics["kl_divergence"],
        "images_per_second": {"float": float_ips, "quantized": quant_ips},
        "preprocess": pre.to_dict(), "warnings": warnings,
        "reference": "ORT (QDQ model)" if imported else "float (ORT fp32)",
    }
    if summary is not None and not is_library:
        result["plan"] = {k: v for k, v in summary.items() if k != "layer_formats"}
        result["plan"]["seconds"] = plan_seconds
        result["layer_formats"] = summary["layer_formats"]
    print(_format(result, backend=backend, config_text=config_text))
    if sensitivity_text:
        print("\nsensitivity policy (--max-drop):\n" + sensitivity_text)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        except OSError as error:
            raise UserError(f"cannot write {args.json}: {error.strerror or error}") from None
        print(f"JSON written to {args.json}")
    return 0


def _format(r: dict, *, backend: str, config_text: str) -> str:
    def pct(acc, key):
        return "-" if acc is None else f"{acc[key]:.1%}"

    lines = [f"model: {r['model']}", f"backend: {backend}", f"quantization: {config_text}",
             f"calibration: {r['calibration']['source']}",
             f"evaluated: {r['n_images']} images of {r['images']}"]
    if "plan" in r:
        p = r["plan"]
        seven = f", {p['int7_mac_share']:.1%} int7" if p.get("int7_mac_share") else ""
        lines.append(f"plan: {p['ternary_mac_share']:.1%} of MACs ternary, {p['int4_mac_share']:.1%} int4, "
                     f"{p['int8_mac_share']:.1%} int8{seven}; {p['multiplications_removed']:.1%} of multiplications "
                     f"removed; weights {p['weight_bytes'] / 1e6:.2f} MB (fp32 {p['float_weight_bytes'] / 1e6:.2f} MB)")
    ips = r["images_per_second"]
    lines += ["", f"{'':<18}{'top-1':>8}{'top-5':>8}{'images/s':>10}",
              f"{r.get('reference', 'float (ORT fp32)'):<18}{pct(r['float'], 'top1'):>8}{pct(r['float'], 'top5'):>8}{ips['float']:>10.1f}",
              f"{'quantized':<18}{pct(r['quantized'], 'top1'):>8}{pct(r['quantized'], 'top5'):>8}{ips['quantized']:>10.1f}"]
    if r["float"] is not None:
        drop = 100 * (r["float"]["top1"] - r["quantized"]["top1"])
        lines.append(f"top-1 drop: {drop:.1f} points")
    lines.append(f"top-1 agreement: {r['agreement_top1']:.1%}")
    return "\n".join(lines)


COMMAND = Command(
    name="eval",
    summary="top-1/top-5 of the quantized model vs ONNX Runtime fp32 on labelled images",
    description=__doc__.split("Example::")[0].strip(),
    epilog="example:\n  tvm-ternary eval ../shared/data/imagenet/models/squeezenet1.1.onnx "
           "--images ../shared/data/imagenet/images/val200 --preprocess caffe --backend simulate",
    add_arguments=add_arguments,
    run=run,
)
