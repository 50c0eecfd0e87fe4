#!/usr/bin/env python3
"""SqueezeNet 1.1's (or MobileNetV2's) distinct layer kernels, as the compiler builds them at FGQ
N=4, one at a time: bit-exact against the numpy reference (``tests/kernels_harness``), then the
median of repeated calls, per target. The input quantize of the model is timed too.

    python scripts/bench_squeezenet_kernels.py --target rocketlake,haswell,skylake-avx512 --json out.json
    python scripts/bench_squeezenet_kernels.py --model mobilenetv2 --target rocketlake

Compare two trees by running it with ``PYTHONPATH`` set to each (e.g. main and a branch) in the
same sitting. The layer specs: the stem 8-bit on s8 input (caffe preprocessing), conv10 8-bit with
a float output (it feeds the global average pool), the rest ternary u8 -> u8 with bias + ReLU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # kernels_harness: random layer data + numpy reference

import kernels_harness as kh  # noqa: E402

from tvm_ternary import tvm_adapter as ta  # noqa: E402
from tvm_ternary.benchmark import machine_stamp  # noqa: E402
from tvm_ternary.schedules import ConvSpec, DenseSpec, conv2d_kernel, kernel_arg_names  # noqa: E402
from tvm_ternary.schedules.region_ops import quantize_func  # noqa: E402

_TERNARY = dict(batch=1, weight_bits=2, group_size=4, act="u8", out="u8", bias=True, relu=True)
LAYERS = {
    "conv1 3x3 s2 3->64 @224 (8-bit, s8 in)": ConvSpec(
        batch=1, in_channels=3, height=224, width=224, out_channels=64, kernel=3, stride=2,
        weight_bits=8, group_size=3, act="s8", out="u8", bias=True, relu=True),
    "fire3 squeeze 1x1 128->16 @55": ConvSpec(in_channels=128, height=55, width=55, out_channels=16,
                                              kernel=1, **_TERNARY),
    "fire2 expand 1x1 16->64 @55": ConvSpec(in_channels=16, height=55, width=55, out_channels=64,
                                            kernel=1, **_TERNARY),
    "fire2 expand 3x3 16->64 @55": ConvSpec(in_channels=16, height=55, width=55, out_channels=64,
                                            kernel=3, padding=1, **_TERNARY),
    "fire9 expand 3x3 64->256 @13": ConvSpec(in_channels=64, height=13, width=13, out_channels=256,
                                             kernel=3, padding=1, **_TERNARY),
    "conv10 1x1 512->1000 @13 (8-bit, f32 out)": ConvSpec(
        batch=1, in_channels=512, height=13, width=13, out_channels=1000, kernel=1, weight_bits=8,
        group_size=512, act="u8", out="f32", bias=True, relu=True),
}

_DW = dict(batch=1, weight_bits=8, group_size=1, act="u8", out="u8", bias=True, relu=True,
           kernel=3, padding=1)


def _dw(c: int, hw: int, stride: int) -> ConvSpec:
    return ConvSpec(in_channels=c, height=hw, width=hw, out_channels=c, groups=c, stride=stride, **_DW)


# MobileNetV2's depthwise convs (8-bit weights, u8 -> u8 with bias + ReLU6 as the clip), each
# distinct shape once, its widest ternary expand and the classifier (a GEMV at batch 1; timed
# with its weights in cache, unlike in the network).
MOBILENET_LAYERS = {
    "dw 32@112 s1": _dw(32, 112, 1),
    "dw 96@112 s2": _dw(96, 112, 2),
    "dw 144@56 s1": _dw(144, 56, 1),
    "dw 144@56 s2": _dw(144, 56, 2),
    "dw 192@28 s1": _dw(192, 28, 1),
    "dw 192@28 s2": _dw(192, 28, 2),
    "dw 384@14 s1": _dw(384, 14, 1),
    "dw 576@14 s1": _dw(576, 14, 1),
    "dw 576@14 s2": _dw(576, 14, 2),
    "dw 960@7 s1": _dw(960, 7, 1),
    "expand 1x1 16->96 @112": ConvSpec(in_channels=16, height=112, width=112, out_channels=96,
                                       kernel=1, **_TERNARY),
    "fc 1280->1000 (8-bit, f32 out)": DenseSpec(batch=1, in_features=1280, out_features=1000,
                                                weight_bits=8, act="u8", out="f32",
                                                bias=True).as_conv(),
}
MODELS = {"squeezenet": LAYERS, "mobilenetv2": MOBILENET_LAYERS}


def _median(mod, args, macs: int) -> float:
    ta.time_ms(mod, args, number=5, repeat=1)  # warm-up
    reps = int(min(300, max(30, 200.0 / max(macs / 2e8, 0.01))))
    return statistics.median(ta.time_ms(mod, args, number=1, repeat=reps))


def bench_layer(spec: ConvSpec, target) -> dict:
    func = conv2d_kernel(spec, target=target)
    isa = str(func.attrs["tvm_ternary.isa"])
    mod = ta.build(func, target=target)
    case = kh.make_case(spec, isa=isa, seed=1)
    names = kernel_arg_names(spec, isa)
    kh.check(kh.run(mod, spec, names, case), case, spec)  # raises on a mismatch
    args = [ta.tensor(case[n]) for n in names[:-1]] + [ta.empty(spec.out_shape, kh.OUT_DTYPES[spec.out])]
    ms = _median(mod, args, spec.macs)
    return {"isa": isa, "median_ms": ms, "gmacs": round(spec.macs / ms / 1e6, 1)}


def bench_quantize(target) -> dict:
    shape = (1, 3, 224, 224)
    mod = ta.build(quantize_func(shape=shape, scale=0.7431, bits=8, signed=True), target=target)
    x = (np.random.default_rng(0).standard_normal(shape) * 60).astype(np.float32)
    args = [ta.tensor(x), ta.empty((1, 224, 224, 3), "int8")]
    return {"median_ms": _median(mod, args, 0)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=None, help="comma-separated LLVM mcpus (default: host)")
    ap.add_argument("--model", choices=sorted(MODELS), default="squeezenet")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    mcpus = a.target.split(",") if a.target else [None]  # None: the host (with its AMX)
    records = []
    for mcpu in mcpus:
        target = ta.make_target(mcpu, num_cores=1) if mcpu else ta.host_target(num_cores=1)
        mcpu = mcpu or ta.host_cpu()
        for name, spec in MODELS[a.model].items():
            rec = {"target": mcpu, "layer": name, **bench_layer(spec, target)}
            records.append(rec)
            print(f"{mcpu:16s} {rec['isa']:8s} {name:42s} {rec['median_ms']:.4f} ms  {rec['gmacs']:6.1f} GMAC/s",
                  flush=True)
        rec = {"target": mcpu, "layer": "input quantize 1x3x224x224 f32 -> s8 NHWC", **bench_quantize(target)}
        records.append(rec)
        print(f"{mcpu:16s} {'':8s} {rec['layer']:42s} {rec['median_ms']:.4f} ms", flush=True)
    if a.json:
        a.json.write_text(json.dumps({"stamp": machine_stamp(1), "threads": 1, "model": a.model,
                                     "records": records}, indent=1))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
