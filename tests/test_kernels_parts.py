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
    assert kernel_arg_names(SMALL, "vnni512") == ["x", "weights", "codes", "bias",
                                                  "multiplier", "shift", "y"]
    # ternary s8 on avx512 runs the vpmaddubsw kernel (u8 x s8 as VNNI): +128 and a bias;
    # 8-bit weights there keep the int16 vpmaddwd path, which takes s8 as it is
    assert kernel_arg_names(SMALL, "avx512") == ["x", "weights", "codes", "bias",
                                                 "multiplier", "shift", "y"]
    w8 = dataclasses.replace(SMALL, weight_bits=8)
    assert kernel_arg_names(w8, "avx512") == ["x", "weights", "codes", "multiplier", "shift", "y"]
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
    assert c.x_shape == (5, 30) and c.out_shape == (5, 7) and c.weight_shape == (1, 8, 1, 1, 16)


def test_block_weights_roundtrip():
    rng = np.random.default_rng(0)
    v = rng.integers(-127, 128, size=(20, 6, 3, 3)).astype(np.int8)
    b = layout.block_weights(v)
    assert b.shape == (2, 2, 3, 3, 16) and b.dtype == np.int32
    np.testing.assert_array_equal(layout.unblock_weights(b, shape=v.shape), v)
    # byte j of a word is input channel 4*cb + j (little-endian)
    assert b.view(np.int8).reshape(2, 2, 3, 3, 16, 4)[0, 1, 2, 0, 5, 1] == v[5, 5, 2, 0]


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
