"""Shared helpers of tests/test_kernels_*.py: random layer data, the numpy reference result
(tvm_ternary.quant.reference, NCHW, transposed to NHWC) and running a built kernel."""

from __future__ import annotations

import numpy as np

from tvm_ternary import quant
from tvm_ternary import tvm_adapter as ta
from tvm_ternary.quant import reference as ref
from tvm_ternary.schedules import layout, params
from tvm_ternary.quant import value_max
from tvm_ternary.schedules.spec import ACT_DTYPES, OUT_DTYPES, RANGES, ConvSpec

# mcpu that forces each ISA (all run on an AVX-512 VNNI host)
# ("amx": the vnni512 kernels' AMX form, schedules/amx.py, on a CPU with amx-int8)
ISA_MCPU = {"vnni512": "znver4", "avx512": "skylake-avx512", "avxvnni": "alderlake",
            "avx2": "haswell", "plain": "generic", "amx": "sapphirerapids"}


def host_runs(isa: str) -> bool:
    host = ta.host_target()
    need = {"vnni512": ("avx512bw", "avx512vnni"), "avx512": ("avx512bw",),
            "amx": ("avx512bw", "avx512vnni", "amx-tile", "amx-int8"),
            "avxvnni": ("avx2", "avxvnni"), "avx2": ("avx2",), "plain": ()}[isa]
    return ta.target_has_features(host, *need)


def make_case(spec: ConvSpec, *, isa: str, seed: int = 0) -> dict:
    """Random inputs for ``spec`` and the expected output; keys are kernel argument names."""
    rng = np.random.default_rng(seed)
    lo, hi = RANGES[spec.act]
    x = rng.integers(lo, hi + 1, size=spec.x_shape).astype(ACT_DTYPES[spec.act])
    r, s = spec.kernel
    wshape = (spec.out_channels, spec.cin_per_group, r, s)
    vmax = value_max(spec.weight_bits)
    values = rng.integers(-vmax, vmax + 1, size=wshape).astype(np.int8)
    qmax = 127 // vmax
    codes = rng.integers(0, qmax + 1, size=spec.codes_shape).astype(np.uint8)
    if spec.grouping == "cluster":  # one code per N kernels: the same at every (r, s)
        codes = np.ascontiguousarray(np.broadcast_to(codes[:, :, :1, :1], codes.shape))
    weights = quant.pack_ternary(values) if spec.weight_bits == 2 else layout.block_weights(values)
    w = ref.decode_weights(values, codes, group_size=spec.group_size)

    # x ~ s (q - z): the reference works on q - z with zero padding (the real zero)
    x_ref = x.astype(np.int32) - spec.x_zero_point if spec.x_zero_point else x
    if spec.dense:
        acc = ref.dense_int(x_ref, w[:, :, 0, 0])  # [N, K]
        to_out = lambda a: a  # noqa: E731
        axis = 1
    else:
        acc = ref.conv2d_int(layout.nhwc_to_nchw(x_ref), w, stride=spec.stride,
                             padding=spec.padding, dilation=spec.dilation, groups=spec.groups)
        to_out = layout.nchw_to_nhwc
        acc = to_out(acc)
        axis = 3
    k = spec.out_channels
    # "codes" is the kernel argument (the ternary forms' layout); "group_codes" [K, G, R, S]
    case = {"x": x, "weights": weights, "codes": params.kernel_codes(spec, isa=isa, codes=codes),
            "group_codes": codes}
    bias = rng.integers(-5000, 5000, size=k).astype(np.int32) if spec.bias else None
    if bias is not None:
        acc = acc + bias.reshape((1,) * (acc.ndim - 1) + (k,))
    kb = params.kernel_bias(spec, isa=isa, weights=weights, codes=codes, bias=bias)
    if kb is not None:
        case["bias"] = kb
    if spec.requantize:
        olo, ohi = RANGES[spec.out]
        peak = np.abs(acc.reshape(-1, k)).max(axis=0).astype(np.float64) + 1.0
        real = (ohi - olo) / (2.0 * peak) * rng.uniform(0.5, 2.0, size=k)
        mult, shift = ref.quantize_multiplier(real)
        case["multiplier"], case["shift"] = mult, shift
        case["requant_scale"] = ref.requantize_scale(mult, shift)
        res = None
        if spec.residual is not None:
            rlo, rhi = RANGES[spec.residual]
            res = rng.integers(rlo, rhi + 1, size=spec.out_shape).astype(ACT_DTYPES[spec.residual])
            rmult, _ = ref.quantize_multiplier(real * 0 + 0.7)  # R_k in [2^30, 2^31)
            rmult = (rmult.astype(np.int64) >> rng.integers(8, 16, size=k)).astype(np.int32)
            case["residual"], case["residual_scale"] = res, ref.requantize_scale(rmult, shift)
        expected = ref.requantize(acc, multiplier=mult, shift=shift, residual=res,
                                  residual_multiplier=rmult if res is not None else None,
                                  relu=spec.relu, bits=8 if spec.out in ("u8", "s8") else 4,
                                  signed=spec.out[0] == "s", channel_axis=axis,
                                  zero_point=spec.out_zero_point,
                                  residual_zero_point=spec.residual_zero_point)
    elif spec.out == "f32":
        scale = rng.uniform(1e-4, 1e-2, size=k).astype(np.float32)
        case["scale"] = scale
        fb = None
        if spec.float_bias:
            fb = rng.uniform(-1, 1, size=k).astype(np.float32)
            case["float_bias"] = fb
        expected = ref.dequantize(acc, scale=scale, bias=fb, relu=spec.relu, channel_axis=axis)
    else:
        expected = np.maximum(acc, 0) if spec.relu else acc
        expected = expected.astype(np.int32)
    case["expected"] = expected
    return case


def run(mod, spec: ConvSpec, names: list[str], case: dict) -> np.ndarray:
    args = [ta.tensor(case[n]) for n in names[:-1]]
    y = ta.empty(spec.out_shape, OUT_DTYPES[spec.out])
    mod(*args, y)
    return y.numpy()


def check(out: np.ndarray, case: dict, spec: ConvSpec) -> None:
    exp = case["expected"]
    assert out.shape == exp.shape and out.dtype == exp.dtype, (out.shape, out.dtype, exp.dtype)
    if spec.out == "f32":
        np.testing.assert_allclose(out, exp, rtol=1e-6, atol=1e-6)
    else:
        bad = np.argwhere(out != exp)
        assert bad.size == 0, f"{len(bad)} mismatches, first at {bad[:3].tolist()}: " \
            f"got {out[tuple(bad[0])]}, want {exp[tuple(bad[0])]}"


_BUILT: dict = {}


def build_cached(spec: ConvSpec, isa: str, *, schedule=True):
    """(module, argument names) for ``spec`` forced to ``isa`` (via its mcpu), built once per
    test session."""
    from tvm_ternary.schedules import conv2d_kernel, kernel_arg_names

    key = (spec, isa, schedule)
    if key not in _BUILT:
        target = ta.make_target(ISA_MCPU[isa])
        func = conv2d_kernel(spec, target=target, schedule=schedule)
        built_isa = str(func.attrs["tvm_ternary.isa"])
        _BUILT[key] = (ta.build(func, target=target), kernel_arg_names(spec, built_isa),
                       built_isa)
    return _BUILT[key]


def run_and_check(spec: ConvSpec, isa: str, *, seed: int = 0, schedule=True) -> None:
    mod, names, built_isa = build_cached(spec, isa, schedule=schedule)
    case = make_case(spec, isa=built_isa, seed=seed)
    check(run(mod, spec, names, case), case, spec)
