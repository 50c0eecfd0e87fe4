"""Kernel building blocks: ISA choice from targets, intrinsics (LLVM-verified, right
instruction), compile-only variants for every ISA, spec validation, layout helpers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kernels_harness import ISA_MCPU, host_runs
from tvm_ternary import tvm_adapter as ta
from tvm_ternary.schedules import ConvSpec, DenseSpec, Tiling, conv2d_kernel, default_tiling
from tvm_ternary.schedules import kernel_arg_names, layout

SMALL = ConvSpec(batch=1, in_channels=16, height=6, width=6, out_channels=32, kernel=3,
                 padding=1, act="s8", out="u8", relu=True)


@pytest.mark.parametrize("mcpu,isa", [
    ("znver4", "vnni512"), ("icelake-server", "vnni512"), ("cascadelake", "vnni512"),
    ("skylake-avx512", "avx512"), ("x86-64-v4", "avx512"), ("alderlake", "avxvnni"),
    ("haswell", "avx2"), ("znver3", "avx2"), ("x86-64", "plain"), ("generic", "plain"),
])
def test_choose_isa(mcpu, isa):
    assert ta.choose_isa(ta.make_target(mcpu)) == isa


def test_host_target_is_concrete():
    t = ta.host_target()
    assert ta.target_mcpu(t) not in ("", "generic", "native")
    assert ta.choose_isa(t) in ta.ISAS


# Instruction the inner loop must contain per ISA (the intrinsic really lowered to it).
INSN = {"vnni512": "vpdpbusd\t%zmm", "avxvnni": "vpdpbusd\t%ymm", "avx512": "vpmaddwd\t%zmm",
        "avx2": "vpmaddwd\t%ymm"}


@pytest.mark.parametrize("mcpu", ["znver4", "sapphirerapids", "skylake-avx512", "alderlake",
                                  "haswell", "x86-64"])
def test_compiles_for_every_isa(mcpu):
    """Compile-only (LLVM verification included) for each ISA, whether or not the host runs it."""
    target = ta.make_target(mcpu)
    func = conv2d_kernel(SMALL, target=target)
    isa = str(func.attrs["tvm_ternary.isa"])
    assert isa == ta.choose_isa(target)
    asm = ta.assembly(func, target=target)
    if isa in INSN:
        assert INSN[isa] in asm, f"{INSN[isa]!r} not emitted for {mcpu}"


def test_reference_is_unscheduled_and_plain():
    func = conv2d_kernel(SMALL, target=ta.make_target("znver4"), schedule="reference")
    assert str(func.attrs["tvm_ternary.isa"]) == "plain"
    assert "global_symbol" not in func.attrs


def test_kernel_args_follow_spec():
    assert kernel_arg_names(SMALL, "vnni512") == ["x", "weights", "codes", "bias", "requant_scale", "y"]
    # ternary s8 on avx512 runs the vpmaddubsw kernel (u8 x s8 as VNNI): +128 and a bias;
    # 8-bit weights there keep the int16 vpmaddwd path, which takes s8 as it is
    assert kernel_arg_names(SMALL, "avx512") == ["x", "weights", "codes", "bias", "requant_scale", "y"]
    w8 = dataclasses.replace(SMALL, weight_bits=8)
    assert kernel_arg_names(w8, "avx512") == ["x", "weights", "codes", "requant_scale", "y"]
    # a residual adds its own float32 scale (reference.requantize)
    res = dataclasses.replace(w8, act="s8", out="s8", residual="s8")
    assert kernel_arg_names(res, "avx512") == ["x", "weights", "codes", "requant_scale", "residual",
                                               "residual_scale", "y"]
    f32 = ConvSpec(batch=1, in_channels=4, height=3, width=3, out_channels=4, kernel=1,
                   out="f32", float_bias=True)
    assert kernel_arg_names(f32, "plain") == ["x", "weights", "codes", "scale", "float_bias", "y"]
    func = conv2d_kernel(SMALL, target=ta.make_target("znver4"))
    assert [p.name for p in func.params] == kernel_arg_names(SMALL, "vnni512")


@pytest.mark.parametrize("kwargs,match", [
    (dict(groups=3), "groups=3 must divide"),
    (dict(act="u16"), "act must be one of"),
    (dict(out="s16"), "out must be one of"),
    (dict(weight_bits=3), "weight_bits must be one of"),
    (dict(residual="s8", out="i32"), "residual is only fused"),
    (dict(float_bias=True, out="u8"), "float_bias needs"),
    (dict(padding=(1, 2, 3)), "padding must be"),
    (dict(height=1, kernel=3), "empty output"),
    (dict(group_size=0), "group_size must be"),
])
def test_spec_validation(kwargs, match):
    base = dict(batch=1, in_channels=16, height=6, width=6, out_channels=32, kernel=3)
    with pytest.raises(ValueError, match=match):
        ConvSpec(**{**base, **kwargs})


def test_tiling_validation_and_defaults():
    with pytest.raises(ValueError, match="decode_at"):
        Tiling(ow_block=4, oc_tiles=2, decode_at="never")
    with pytest.raises(ValueError, match="must divide"):
        conv2d_kernel(SMALL, target=ta.make_target("znver4"), tiling=Tiling(4, 3))
    resnet = ConvSpec(batch=1, in_channels=64, height=56, width=56, out_channels=64,
                      kernel=3, padding=1)
    t = default_tiling(resnet, isa="vnni512")
    assert (t.ow_block, t.oc_tiles) == (14, 2)
    dense = DenseSpec(batch=1, in_features=64, out_features=1000).as_conv()
    assert 63 % default_tiling(dense, isa="vnni512").oc_tiles == 0


def test_dense_spec_maps_to_conv():
    d = DenseSpec(batch=5, in_features=30, out_features=7, weight_bits=4)
    c = d.as_conv()
    assert c.x_shape == (5, 30) and c.out_shape == (5, 7) and c.weight_shape == (1, 1, 1, 8, 16)


def test_block_weights_roundtrip():
    rng = np.random.default_rng(0)
    v = rng.integers(-127, 128, size=(20, 6, 3, 3)).astype(np.int8)
    b = layout.block_weights(v)
    assert b.shape == (2, 3, 3, 2, 16) and b.dtype == np.int32  # [kb, r, s, cb, ki]
    np.testing.assert_array_equal(layout.unblock_weights(b, shape=v.shape), v)
    # byte j of a word is input channel 4*cb + j (little-endian)
    assert b.view(np.int8).reshape(2, 3, 3, 2, 16, 4)[0, 2, 0, 1, 5, 1] == v[5, 5, 2, 0]
    assert b.view(np.int8).reshape(2, 3, 3, 2, 16, 4)[1, 1, 2, 0, 3, 2] == v[19, 2, 1, 2]


@pytest.mark.parametrize("to", ["nhwc", "nchw"])
def test_transpose_kernel(to):
    x = np.arange(2 * 3 * 4 * 5, dtype=np.int8).reshape(2, 3, 4, 5)
    func = layout.transpose_kernel(x.shape, "int8", to=to)
    mod = ta.build(func, target=ta.host_target())
    want = layout.nchw_to_nhwc(x) if to == "nhwc" else layout.nhwc_to_nchw(x)
    y = ta.empty(want.shape, "int8")
    mod(ta.tensor(x), y)
    np.testing.assert_array_equal(y.numpy(), want)


def test_time_ms_runs():
    target = ta.make_target(ISA_MCPU["plain"] if not host_runs("vnni512") else "znver4")
    func = layout.transpose_kernel((1, 2, 3, 4), "float32", to="nhwc")
    mod = ta.build(func, target=target)
    ms = ta.time_ms(mod, [ta.tensor(np.zeros((1, 2, 3, 4), np.float32)),
                          ta.empty((1, 3, 4, 2), "float32")], number=2, repeat=2)
    assert len(ms) == 2 and all(m >= 0 for m in ms)


@pytest.mark.parametrize("tiling", [Tiling(3, 1, "root"), Tiling(5, 2, "tile"), Tiling(1, 1)])
def test_explicit_tilings_bit_exact(tiling):
    """Knobs MetaSchedule may set: padded pixel blocks, decode at root, 1x1 tiles."""
    from kernels_harness import check, make_case, run

    spec = ConvSpec(batch=2, in_channels=12, height=7, width=9, out_channels=32, kernel=3,
                    padding=1, act="s8", out="s8", bias=True, group_size=4)
    target = ta.make_target("znver4" if host_runs("vnni512") else "generic")
    func = conv2d_kernel(spec, target=target, tiling=tiling)
    isa = str(func.attrs["tvm_ternary.isa"])
    mod = ta.build(func, target=target)
    case = make_case(spec, isa=isa)
    check(run(mod, spec, kernel_arg_names(spec, isa), case), case, spec)


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
@pytest.mark.parametrize("channels", [(64, 64), (16, 8, 24), (3, 5), (128, 128, 256)])
def test_concat_region_op_equals_numpy(channels, dtype):
    """The integer NHWC concat copies blocks of channels per input: any count, any order."""
    from tvm_ternary.schedules.region_ops import concat_func

    rng = np.random.default_rng(len(channels))
    shapes = [(2, 3, 5, c) for c in channels]
    info = np.iinfo(dtype)
    xs = [rng.integers(info.min, info.max + 1, size=sh).astype(dtype) for sh in shapes]
    target = ta.host_target()
    mod = ta.build(concat_func(shapes=shapes, dtype=dtype), target=target)
    y = ta.empty((2, 3, 5, sum(channels)), dtype)
    mod(*[ta.tensor(x) for x in xs], y)
    np.testing.assert_array_equal(y.numpy(), np.concatenate(xs, axis=3))


def test_default_tiling_prefers_an_unpadded_tile():
    """SqueezeNet's stem (OW = 111 = 3 x 37): more output blocks per tile rather than a padded
    accumulator width; a width with a large divisor keeps its tile."""
    stem = ConvSpec(batch=1, in_channels=3, height=224, width=224, out_channels=64, kernel=3,
                    stride=2, weight_bits=8, act="s8", out="u8", bias=True, relu=True)
    t = default_tiling(stem, isa="vnni512")
    assert stem.out_width % t.ow_block == 0 and t.ow_block * t.oc_tiles >= 8
    assert (t.ow_block, t.oc_tiles) == (3, 4)
    prime = ConvSpec(batch=1, in_channels=16, height=17, width=17, out_channels=32, kernel=1)
    t = default_tiling(prime, isa="vnni512")  # 17 x 1 or padded: 17 has no useful divisor
    assert t.ow_block * t.oc_tiles <= 28


@pytest.mark.parametrize("cin,cout,hw,tile", [
    (24, 144, 56, (8, 3)),  # 9 output blocks: 3 a tile (28 x 1 ran 3x slower)
    (32, 48, 28, (7, 3)),
    (32, 16, 112, (14, 1)),  # one block a tile: at most ONE_BLOCK_PIXELS pixels
    (144, 16, 56, (14, 1)),
    (128, 16, 55, (11, 1)),
    (64, 48, 13, (13, 1)),  # 13 pixels, unpadded, before 3 blocks of a padded width
])
def test_default_tiling_of_an_odd_number_of_output_blocks_on_vnni512(cin, cout, hw, tile):
    spec = ConvSpec(batch=1, in_channels=cin, height=hw, width=hw, out_channels=cout, kernel=1,
                    act="s8", out="u8", bias=True, relu=True)
    t = default_tiling(spec, isa="vnni512")
    assert (t.ow_block, t.oc_tiles) == tile


def test_three_output_blocks_a_tile_is_bit_exact():
    """Run where the host has AVX-512 VNNI; elsewhere the cross-compiled kernel is checked for
    its vpdpbusd inner loop."""
    from kernels_harness import run_and_check

    spec = ConvSpec(batch=1, in_channels=24, height=16, width=16, out_channels=144, kernel=1,
                    act="s8", out="u8", bias=True, relu=True, group_size=4)
    assert default_tiling(spec, isa="vnni512").oc_tiles == 3
    if host_runs("vnni512"):
        run_and_check(spec, "vnni512")
    else:
        target = ta.make_target(ISA_MCPU["vnni512"])
        assert "vpdpbusd" in ta.assembly(conv2d_kernel(spec, target=target), target=target)


@pytest.mark.parametrize("shape", [(1, 13, 13, 1000), (2, 7, 5, 32), (1, 3, 3, 10)])
def test_global_mean_region_op(shape):
    """NHWC float32 -> [N, C, 1, 1] mean over H, W. Tolerance: float32 sums in another order
    than numpy's pairwise sum (relative 1e-6 of the sum of magnitudes)."""
    from tvm_ternary.schedules.region_ops import global_mean_func

    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    mod = ta.build(global_mean_func(shape=shape), target=ta.host_target())
    y = ta.empty((shape[0], shape[3], 1, 1), "float32")
    mod(ta.tensor(x), y)
    want = x.transpose(0, 3, 1, 2).mean(axis=(2, 3), keepdims=True)
    tol = 1e-6 * np.abs(x).mean(axis=(1, 2)).reshape(want.shape) + 1e-7
    assert (np.abs(y.numpy() - want) <= tol).all()


def _quantize_reference(x, scale, lo, hi, zero_point=0):
    return np.clip(np.rint(x.astype(np.float64) / np.float64(scale)) + zero_point, lo, hi)


@pytest.mark.parametrize("fma", [True, False], ids=["fma", "divide"])
@pytest.mark.parametrize("scale", [0.7431, 1 / 3, 0.5, 3.0 * 2**-7, 0.0123456789012345, 1e-3])
def test_quantize_without_division_is_exact(scale, fma):
    """With FMA the input quantize divides by one FMA correction of a reciprocal multiply
    (ta.exact_quotient, Markstein): the same rint(f64(x) / f64(s)) as numpy, at ties too."""
    if fma and not ta.target_has_features(ta.host_target(), "fma"):
        pytest.skip("the host has no FMA: the compile flow divides there (the other case)")
    from tvm_ternary.schedules.region_ops import quantize_func

    shape = (1, 3, 24, 40)
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 100 * scale).astype(np.float32)
    flat = x.reshape(-1)
    # exact ties k + 1/2 where float32 can hold (k + 1/2) * s, and their float32 neighbours
    ties = ((np.arange(400) - 200) + 0.5) * scale
    flat[:400] = ties.astype(np.float32)
    flat[400:800] = np.nextafter(flat[:400], np.float32(np.inf))
    flat[800:1200] = np.nextafter(flat[:400], np.float32(-np.inf))
    mod = ta.build(quantize_func(shape=shape, scale=scale, bits=8, signed=True, fma=fma),
                   target=ta.host_target())
    y = ta.empty((1, 24, 40, 3), "int8")
    mod(ta.tensor(x), y)
    want = _quantize_reference(x, scale, -128, 127).astype(np.int8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(y.numpy(), want)


def test_exact_quotient_matches_division():
    """Random float32 numerators against random float64 scales: the correction step gives the
    correctly rounded float64 quotient, the rounding to integers that follows cannot differ."""
    from hypothesis import given, settings, strategies as st
    from tvm import te

    n = 4096

    @settings(max_examples=6, deadline=None)
    @given(st.floats(1e-4, 1e2, allow_nan=False), st.integers(0, 2**31 - 1))
    def check(scale, seed):
        x = te.placeholder((n,), "float32", name="x")
        y = te.compute((n,), lambda i: ta.exact_quotient(x[i].astype("float64"), scale), name="y")
        sch = ta.schedule_of(ta.create_prim_func([x, y]))
        sch.vectorize(sch.split(sch.get_loops(sch.get_sblock("y"))[0], [None, 8])[1])
        mod = ta.build(ta.scheduled_func(sch), target=ta.host_target())
        xs = (np.random.default_rng(seed).standard_normal(n) * 200 * scale).astype(np.float32)
        out = ta.empty((n,), "float64")
        mod(ta.tensor(xs), out)
        np.testing.assert_array_equal(out.numpy(), xs.astype(np.float64) / np.float64(scale))

    check()


@pytest.mark.parametrize("residual", [None, "s8"])
@pytest.mark.parametrize("mcpu", ["znver4", "skylake-avx512", "haswell"])
def test_requantize_is_float32_multiplies(mcpu, residual):
    """f32(acc) * f32 scale (and a residual's own f32 product), rounded and clipped in float32
    lanes (16 per zmm), with no int64 lane work (no widening multiply, no variable 64-bit
    shift), and no FMA: a contracted multiply-add would round once where the reference rounds
    each term."""
    spec = ConvSpec(batch=1, in_channels=16, height=5, width=5, out_channels=32, kernel=1,
                    act="u8", out="u8" if residual is None else "s8", residual=residual, bias=True,
                    relu=residual is None, group_size=4)
    target = ta.make_target(mcpu)
    asm = ta.assembly(conv2d_kernel(spec, target=target), target=target)
    assert "vcvtdq2ps" in asm and "vmulps" in asm
    assert not any(op in asm for op in ("vpmuldq", "vpmullq", "vpsravq", "vpsrlvq", "vfmadd"))


@pytest.mark.parametrize("mcpu, fma", [("haswell", True), ("znver4", True), ("sandybridge", False)])
def test_input_quantize_divides_without_fma_hardware(mcpu, fma):
    """The FMA-corrected quotient only where the target has FMA: elsewhere LLVM would call libm's
    fma per element, so the quantize divides (the same result)."""
    import tvm

    from tvm_ternary.passes.region_funcs import RegionFuncs
    from tvm_ternary.schedules.region_ops import quantize_func

    target = ta.make_target(mcpu)
    assert RegionFuncs(tvm.IRModule(), target=target).fma is fma
    asm = ta.assembly(quantize_func(shape=(1, 3, 8, 8), scale=0.3, bits=8, signed=True, fma=fma),
                      target=target)
    assert ("vdivpd" in asm or "divpd" in asm) is not fma
