#!/usr/bin/env python3
"""Per-layer benchmark: our ternary / 8-bit-weight kernels against ONNX Runtime fp32 and int8.

    python scripts/bench_kernels.py --model resnet50 --threads 1 --batch 1 --json out.json
    python scripts/bench_kernels.py --target haswell --group-size 4 --layers l1_3x3,fc --skip-ort

Every distinct conv kernel of the model plus its dense layer, side by side in one run, each in
its role in the model (``ROLES``: the stem's s8 input, a downsample's s8 output, a residual add):
``tvm_ternary`` (the model's kernel: 2-bit weights, precise weights for the stem and the fc,
fused bias + [residual] + [ReLU] + requantize), ``tvm_ternary_w8`` (8-bit weights, same
epilogue), ``ort_fp32``, ``ort_int8`` (static QDQ u8s8 made by
onnxruntime.quantization from a one-layer model of the same role with random calibration data) and
``openvino_int8`` when OpenVINO is installed (skipped with a note otherwise).  The table gives
G MAC/s and % of this CPU's vpdpbusd peak, measured by a back-to-back vpdpbusd loop compiled
with gcc at run time (for kernels of the AMX form, ``form`` "amx" in the JSON: of the tdpbusd
peak, ``bench_peak.py``'s ``amx_tdpbusd`` loop).  The JSON is a list of records (layer, runtime, threads, batch,
median_ms, gmacs, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tvm_ternary import quant  # noqa: E402
from tvm_ternary import tvm_adapter as ta  # noqa: E402
from tvm_ternary.errors import TargetError  # noqa: E402
from tvm_ternary.schedules import ConvSpec, DenseSpec, conv2d_kernel, kernel_arg_names  # noqa: E402
from tvm_ternary.schedules import layout, params  # noqa: E402
from tvm_ternary.schedules.amx import AMX_FEATURES, amx_form  # noqa: E402
from tvm_ternary.schedules.compute import unpacked_spec  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (machine_stamp, measure_amx_peak, measure_vnni_peak,  # noqa: E402
                           median_ms as _median_ms)

# (name, C, K, kernel, stride, input H=W, count in the model, role); padding = kernel // 2.
# The role is the layer's place in the model, hence its kernel's epilogue, as the compiler makes it:
#   stem    first conv: s8 input (the normalised image), precise weights (the policy's 8 bits)
#   relu    u8 -> u8 with bias + ReLU
#   ds      a downsample (projection) conv: s8 out, no ReLU (the residual of the block's last conv)
#   res_s8  the block's last conv adding the downsample's s8 output, then ReLU
#   res_u8  the block's last conv adding the block input (u8), then ReLU
#   fc      the classifier: precise weights, float32 out
# Until stop 15 every conv was timed as `relu` with ternary weights, the easier variant for the
# 20 downsample / residual convs of ResNet-50 and a ternary stem / fc the model never runs.
_R18 = [("conv1_7x7", 3, 64, 7, 2, 224, 1, "stem"),
        ("l1_3x3", 64, 64, 3, 1, 56, 2, "relu"), ("l1_3x3_r", 64, 64, 3, 1, 56, 2, "res_u8"),
        ("l2_3x3_s2", 64, 128, 3, 2, 56, 1, "relu"), ("l2_3x3", 128, 128, 3, 1, 28, 1, "relu"),
        ("l2_3x3_rs", 128, 128, 3, 1, 28, 1, "res_s8"), ("l2_3x3_r", 128, 128, 3, 1, 28, 1, "res_u8"),
        ("l2_ds_1x1_s2", 64, 128, 1, 2, 56, 1, "ds"),
        ("l3_3x3_s2", 128, 256, 3, 2, 28, 1, "relu"), ("l3_3x3", 256, 256, 3, 1, 14, 1, "relu"),
        ("l3_3x3_rs", 256, 256, 3, 1, 14, 1, "res_s8"), ("l3_3x3_r", 256, 256, 3, 1, 14, 1, "res_u8"),
        ("l3_ds_1x1_s2", 128, 256, 1, 2, 28, 1, "ds"),
        ("l4_3x3_s2", 256, 512, 3, 2, 14, 1, "relu"), ("l4_3x3", 512, 512, 3, 1, 7, 1, "relu"),
        ("l4_3x3_rs", 512, 512, 3, 1, 7, 1, "res_s8"), ("l4_3x3_r", 512, 512, 3, 1, 7, 1, "res_u8"),
        ("l4_ds_1x1_s2", 256, 512, 1, 2, 14, 1, "ds")]
_R50 = [("conv1_7x7", 3, 64, 7, 2, 224, 1, "stem"),
        ("l1_1x1_64_64", 64, 64, 1, 1, 56, 1, "relu"), ("l1_3x3", 64, 64, 3, 1, 56, 3, "relu"),
        ("l1_ds_1x1", 64, 256, 1, 1, 56, 1, "ds"), ("l1_1x1_64_256_rs", 64, 256, 1, 1, 56, 1, "res_s8"),
        ("l1_1x1_64_256_r", 64, 256, 1, 1, 56, 2, "res_u8"), ("l1_1x1_256_64", 256, 64, 1, 1, 56, 2, "relu"),
        ("l2_1x1_256_128", 256, 128, 1, 1, 56, 1, "relu"), ("l2_3x3_s2", 128, 128, 3, 2, 56, 1, "relu"),
        ("l2_1x1_128_512_rs", 128, 512, 1, 1, 28, 1, "res_s8"),
        ("l2_1x1_128_512_r", 128, 512, 1, 1, 28, 3, "res_u8"), ("l2_ds_1x1_s2", 256, 512, 1, 2, 56, 1, "ds"),
        ("l2_1x1_512_128", 512, 128, 1, 1, 28, 3, "relu"), ("l2_3x3", 128, 128, 3, 1, 28, 3, "relu"),
        ("l3_1x1_512_256", 512, 256, 1, 1, 28, 1, "relu"), ("l3_3x3_s2", 256, 256, 3, 2, 28, 1, "relu"),
        ("l3_1x1_256_1024_rs", 256, 1024, 1, 1, 14, 1, "res_s8"),
        ("l3_1x1_256_1024_r", 256, 1024, 1, 1, 14, 5, "res_u8"), ("l3_ds_1x1_s2", 512, 1024, 1, 2, 28, 1, "ds"),
        ("l3_1x1_1024_256", 1024, 256, 1, 1, 14, 5, "relu"), ("l3_3x3", 256, 256, 3, 1, 14, 5, "relu"),
        ("l4_1x1_1024_512", 1024, 512, 1, 1, 14, 1, "relu"), ("l4_3x3_s2", 512, 512, 3, 2, 14, 1, "relu"),
        ("l4_1x1_512_2048_rs", 512, 2048, 1, 1, 7, 1, "res_s8"),
        ("l4_1x1_512_2048_r", 512, 2048, 1, 1, 7, 2, "res_u8"), ("l4_ds_1x1_s2", 1024, 2048, 1, 2, 14, 1, "ds"),
        ("l4_1x1_2048_512", 2048, 512, 1, 1, 7, 2, "relu"), ("l4_3x3", 512, 512, 3, 1, 7, 2, "relu")]
MODELS = {"resnet18": (_R18, 512), "resnet50": (_R50, 2048)}
ROLES = ("stem", "relu", "ds", "res_s8", "res_u8", "fc")


def model_layers(model: str, batch: int):
    """[(name, spec kwargs, count, role)] for the model's distinct conv kernels and its fc layer."""
    convs, fc_in = MODELS[model]
    out = [(name, dict(batch=batch, in_channels=c, out_channels=k, height=hw, width=hw,
                       kernel=r, stride=st, padding=r // 2), n, role)
           for name, c, k, r, st, hw, n, role in convs]
    out.append(("fc", dict(batch=batch, in_features=fc_in, out_features=1000), 1, "fc"))
    return out


# ---------------------------------------------------------------- our kernels


def bench_ours(spec: ConvSpec, threads: int, mcpu: str | None = None) -> float:
    target = ta.make_target(mcpu, num_cores=threads) if mcpu else ta.host_target(num_cores=threads)
    # the kernel the compiler builds for the layer: a ternary 3x3 on a small map runs unpacked
    spec = unpacked_spec(spec, ta.choose_isa(target)) or spec
    func = conv2d_kernel(spec, target=target)
    isa = str(func.attrs["tvm_ternary.isa"])
    mod = ta.build(func, target=target)
    rng = np.random.default_rng(0)
    r, s = spec.kernel
    wshape = (spec.out_channels, spec.cin_per_group, r, s)
    vmax = quant.value_max(spec.weight_bits)
    values = rng.integers(-vmax, vmax + 1, size=wshape).astype(np.int8)
    codes = rng.integers(0, 127 // vmax + 1, size=spec.codes_shape).astype(np.uint8)
    weights = quant.pack_ternary(values) if spec.weight_bits == 2 else layout.block_weights(values)
    k = spec.out_channels
    data = {"x": _activations(rng, spec.act, spec.x_shape), "weights": weights,
            "codes": params.kernel_codes(spec, isa=isa, codes=codes),
            "scale": np.full(k, 1e-3, np.float32),
            "requant_scale": np.full(k, 2.0**-10, np.float32),
            "residual_scale": np.full(k, 2.0**-10, np.float32),
            "residual": _activations(rng, spec.residual, spec.out_shape) if spec.residual else None,
            "bias": params.kernel_bias(spec, isa=isa, weights=weights, codes=codes,
                                       bias=np.zeros(k, np.int32) if spec.bias else None)}
    names = kernel_arg_names(spec, isa)
    args = [ta.tensor(data[n]) for n in names[:-1]]
    args.append(ta.empty(spec.out_shape, {"f32": "float32", "u8": "uint8", "s8": "int8"}[spec.out]))
    # one call per sample and the median, as for ONNX Runtime: robust to a shared machine
    ta.time_ms(mod, args, number=5, repeat=1)  # warm-up
    reps = int(min(400, max(20, 300.0 / max(spec.macs / 2e8, 0.01))))
    return statistics.median(ta.time_ms(mod, args, number=1, repeat=reps))


def _activations(rng, fmt: str, shape) -> np.ndarray:
    if fmt == "u8":
        return rng.integers(0, 256, size=shape).astype(np.uint8)
    return rng.integers(-128, 128, size=shape).astype(np.int8)


def our_spec(kw: dict, *, bits: int, group_size: int, role: str, grouping: str = "fgq"):
    """The layer's kernel as the compiler makes it for its role (see ROLES above)."""
    if role == "fc":
        c = kw["in_features"]
        return DenseSpec(weight_bits=bits, group_size=min(group_size, c), out="f32",
                         **kw).as_conv()
    c = kw["in_channels"]
    epilogue = {"stem": dict(act="s8", out="u8", relu=True), "relu": dict(out="u8", relu=True),
                "ds": dict(out="s8", relu=False), "res_s8": dict(out="u8", relu=True, residual="s8"),
                "res_u8": dict(out="u8", relu=True, residual="u8")}[role]
    return ConvSpec(weight_bits=bits, group_size=min(group_size, c), bias=True,
                    grouping=grouping if bits == 2 else "fgq", **epilogue, **kw)


# ---------------------------------------------------------------- ONNX Runtime


def _onnx_layer(kw: dict, role: str, path: Path) -> dict:
    """A one-layer float model of the layer in its role (Conv [+ Add residual] [+ Relu]); its inputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if role == "fc":
        n, c, k = kw["batch"], kw["in_features"], kw["out_features"]
        w = rng.normal(0, 0.05, size=(k, c)).astype(np.float32)
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
        xshape, yshape = [n, c], [n, k]
    else:
        n, c, k, r = kw["batch"], kw["in_channels"], kw["out_channels"], kw["kernel"]
        w = rng.normal(0, 0.05, size=(k, c, r, r)).astype(np.float32)
        p, st = kw["padding"], kw["stride"]
        conv_out = "y" if role == "ds" else "conv"
        nodes = [helper.make_node("Conv", ["x", "w", "b"], [conv_out], kernel_shape=[r, r],
                                  strides=[st] * 2, pads=[p] * 4)]
        xshape = [n, c, kw["height"], kw["width"]]
        yshape = [n, k, (kw["height"] + 2 * p - r) // st + 1, (kw["width"] + 2 * p - r) // st + 1]
        if role.startswith("res"):
            nodes.append(helper.make_node("Add", ["conv", "r"], ["sum"]))
            conv_out = "sum"
        if role != "ds":
            nodes.append(helper.make_node("Relu", [conv_out], ["y"]))
    inputs = {"x": rng.normal(0, 1, size=xshape) if role == "stem" else rng.uniform(0, 1, size=xshape)}
    if role.startswith("res"):
        # the downsample's output is signed, a block input is a ReLU output
        inputs["r"] = rng.normal(0, 1, size=yshape) if role == "res_s8" else rng.uniform(0, 1, size=yshape)
    inputs = {name: v.astype(np.float32) for name, v in inputs.items()}
    inits = [numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(rng.normal(0, 0.1, size=k).astype(np.float32), "b")]
    graph = helper.make_graph(nodes, "layer",
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(v.shape))
                               for name, v in inputs.items()],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return inputs


def _quantize_qdq(fp32: Path, out: Path, inputs: dict) -> None:
    """Static QDQ int8 model (u8 activations, s8 per-channel weights): the int8 peer's graph."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(1)
            # calibration data drawn like the timed inputs (signed where they are signed)
            self.it = iter([{name: (v + rng.normal(0, 0.01, size=v.shape)).astype(np.float32)
                             for name, v in inputs.items()} for _ in range(4)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)


def bench_ort(kw: dict, role: str, threads: int, *, int8: bool) -> float:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fp32.onnx"
        inputs = _onnx_layer(kw, role, path)
        if int8:
            _quantize_qdq(path, Path(d) / "int8.onnx", inputs)
            path = Path(d) / "int8.onnx"
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return _median_ms(lambda: sess.run(None, inputs))


def bench_openvino(kw: dict, role: str, threads: int) -> float:
    """OpenVINO on the same QDQ int8 graph (its low-precision transformations run it in int8)."""
    import openvino as ov

    with tempfile.TemporaryDirectory() as d:
        fp32 = Path(d) / "fp32.onnx"
        inputs = _onnx_layer(kw, role, fp32)
        _quantize_qdq(fp32, Path(d) / "int8.onnx", inputs)
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(Path(d) / "int8.onnx")), "CPU",
                                      {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        return _median_ms(lambda: request.infer(inputs))


# ---------------------------------------------------------------- driver


def weight_bytes(kw: dict, dense: bool, group_size: int) -> dict:
    c, k = (kw["in_features"], kw["out_features"]) if dense else (kw["in_channels"],
                                                                  kw["out_channels"])
    r = 1 if dense else kw["kernel"]
    groups = -(-c // min(group_size, c)) * k * r * r
    n = k * c * r * r
    return {"bytes_2bit": quant.packed_bytes(shape=(k, c, r, r), num_groups=groups),
            "bytes_int8": n + 4 * k, "bytes_fp32": 4 * n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--group-size", type=int, default=64, help="FGQ group size N of ours")
    ap.add_argument("--layers", default="", help="comma-separated subset of layer names")
    ap.add_argument("--grouping", choices=("fgq", "cluster"), default="fgq",
                    help="grouping of ours: fgq (N channels at one r, s) or cluster (N kernels)")
    ap.add_argument("--target", default=None, metavar="MCPU",
                    help="LLVM mcpu our kernels are built for (default: the host), e.g. haswell "
                         "(avx2) or skylake-avx512 (avx512 without VNNI); it must run here")
    ap.add_argument("--precise-bits", type=int, choices=(7, 8), default=8,
                    help="weight bits of the stem and the fc, as the compiler's --precise-bits (default 8)")
    ap.add_argument("--skip-ort", action="store_true")
    a = ap.parse_args(argv)
    try:
        mcpu = None if a.target is None else ta.check_mcpu(a.target)
    except TargetError as error:
        ap.error(str(error))  # one line, exit 2

    if os.environ.get("TVM_NUM_THREADS") != str(a.threads):
        # TVM sizes its thread pool once per process: resizing it later did not change the
        # speed of loaded kernels, so start over with the pool we want.
        os.environ["TVM_NUM_THREADS"] = str(a.threads)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    stamp = machine_stamp(a.threads)
    peak = measure_vnni_peak(a.threads)
    stamp["vnni_peak_gmacs"] = peak
    target = ta.make_target(mcpu) if mcpu else ta.host_target()
    # kernels of the AMX form (schedules/amx.py) are measured against the tdpbusd peak
    amx_peak = measure_amx_peak(a.threads) if ta.target_has_features(target, *AMX_FEATURES) else None
    stamp["amx_peak_gmacs"] = amx_peak
    stamp["kernel_target"] = {"mcpu": ta.target_mcpu(target), "isa": ta.choose_isa(target)}
    print(json.dumps(stamp))
    try:
        import openvino  # noqa: F401

        has_openvino = True
    except ImportError:
        has_openvino = False
        print("note: openvino_int8 skipped (openvino not installed: pip install openvino)")
    records = []
    subset = set(filter(None, a.layers.split(",")))
    for name, kw, count, role in model_layers(a.model, a.batch):
        if subset and name not in subset:
            continue
        dense = role == "fc"
        runs, forms = {}, {}
        # "tvm_ternary" is the model's own kernel (precise weights for the stem and the fc, as the
        # policy keeps them); "tvm_ternary_w8" the same epilogue with 8-bit weights
        precise = role in ("stem", "fc")
        for rt, bits in (("tvm_ternary", a.precise_bits if precise else 2), ("tvm_ternary_w8", 8)):
            spec = our_spec(kw, bits=bits, group_size=a.group_size, role=role, grouping=a.grouping)
            same = rt == "tvm_ternary_w8" and bits == runs["tvm_ternary"][2]
            runs[rt] = (runs["tvm_ternary"][0] if same else bench_ours(spec, a.threads, mcpu), spec.macs, bits)
            forms[rt] = "amx" if amx_form(spec, ta.choose_isa(target), target) else ta.choose_isa(target)
        if not a.skip_ort:
            macs = runs["tvm_ternary"][1]
            runs["ort_fp32"] = (bench_ort(kw, role, a.threads, int8=False), macs, 32)
            runs["ort_int8"] = (bench_ort(kw, role, a.threads, int8=True), macs, 8)
            if has_openvino:
                runs["openvino_int8"] = (bench_openvino(kw, role, a.threads), macs, 8)
        for rt, (ms, macs, bits) in runs.items():
            gmacs = macs / ms / 1e6
            form_peak = amx_peak if forms.get(rt) == "amx" else peak
            rec = {"layer": name, "runtime": rt, "role": role, "weight_bits": bits,
                   "threads": a.threads, "batch": a.batch,
                   "median_ms": round(ms, 4), "gmacs": round(gmacs, 1), "count": count,
                   "macs": macs, "form": forms.get(rt),
                   "pct_peak": round(100 * gmacs / form_peak, 1) if form_peak else None,
                   "kernel_target": stamp["kernel_target"], "grouping": a.grouping,
                   **weight_bytes(kw, dense, a.group_size), "cpu": stamp["cpu"]}
            records.append(rec)
            print(f"{name:18s} {rt:15s} {ms:8.3f} ms {gmacs:7.1f} GMAC/s "
                  f"{rec['pct_peak'] if form_peak else '-':>6}% peak"
                  f"{' (amx)' if forms.get(rt) == 'amx' else ''}", flush=True)
    ratios = []
    for name in dict.fromkeys(r["layer"] for r in records):
        by = {r["runtime"]: r["median_ms"] for r in records if r["layer"] == name}
        peers = [by[p] for p in ("ort_int8", "openvino_int8") if p in by]
        if peers:
            ratios.append(min(peers) / by["tvm_ternary"])
    if ratios:
        gm = float(np.exp(np.mean(np.log(ratios))))
        print(f"geomean(best int8 peer / tvm_ternary) over {len(ratios)} layers: {gm:.2f}")
    print("bytes per layer (2-bit+codes+scales / int8 / fp32):")
    for r in records:
        if r["runtime"] == "tvm_ternary":
            print(f"  {r['layer']:18s} {r['bytes_2bit']:>10d} {r['bytes_int8']:>10d} "
                  f"{r['bytes_fp32']:>10d}")
    if a.json:
        a.json.write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
