"""The ternary vpmaddubsw kernels (forms avx2t / avx512t: ternary layers on AVX2 and AVX-512BW
targets without VNNI): bit-exact against the numpy reference over N, grouping, geometry,
activation kind and epilogue; exact at the int16 bound; the assembly has the intended
instructions; chunk plans never exceed the int16 bound nor straddle a group."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from kernels_harness import ISA_MCPU, build_cached, check, host_runs, run, run_and_check
from tvm_ternary import quant
from tvm_ternary import tvm_adapter as ta
from tvm_ternary.quant import reference as ref
from tvm_ternary.schedules import ConvSpec, DenseSpec, conv2d_kernel, layout, params
from tvm_ternary.schedules.compute_ternary import max_steps, plan_chunks
from tvm_ternary.schedules.spec import maddubs_form

TERNARY_ISAS = ("avx2", "avx512")
RUNNABLE = [isa for isa in TERNARY_ISAS if host_runs(isa)]

# Geometries x activation kinds x epilogues (each row one combination, to keep the sweep short).
GEOMETRY = {
    "3x3_pad_u8_relu": dict(in_channels=32, height=6, width=7, out_channels=32, kernel=3,
                            padding=1, act="u8", out="u8", bias=True, relu=True),
    "1x1_s2_u4_res": dict(in_channels=32, height=7, width=6, out_channels=48, kernel=1,
                          stride=2, act="u4", out="s8", residual="s8"),
    "3x3_s2_s8_f32": dict(in_channels=24, height=9, width=8, out_channels=16, kernel=3, stride=2,
                          padding=(1, 0, 1, 2), act="s8", out="f32", bias=True, float_bias=True),
}
# N: even divisors of C, N % 4 == 2, N not dividing C (C = 24 / 32 above), one group (N >= C)
GROUP_SIZES = [2, 4, 6, 8, 16, 32]


def _spec(geometry: str, n: int, grouping: str) -> ConvSpec:
    kw = dict(GEOMETRY[geometry])
    return ConvSpec(batch=1, group_size=min(n, kw["in_channels"]), grouping=grouping, **kw)


@pytest.mark.parametrize("grouping", ["fgq", "cluster"])
@pytest.mark.parametrize("n", GROUP_SIZES)
@pytest.mark.parametrize("geometry", list(GEOMETRY))
@pytest.mark.parametrize("isa", RUNNABLE)
def test_ternary_conv_bit_exact(isa, geometry, n, grouping):
    spec = _spec(geometry, n, grouping)
    assert maddubs_form(spec, isa) == isa + "t"
    run_and_check(spec, isa)


# 4-bit weights (|v| <= 7: pairs <= 3570 with u8, 9 steps per chunk), 7-bit weights (|v| <= 63:
# pairs <= 32130 with u8 or s8 + 128, one step per chunk) and 8-bit weights with u4 activations
# (pairs <= 3810) take the same kernel; 8-bit x u8 keeps the int16 block.
@pytest.mark.parametrize("bits,geometry", [(4, "3x3_pad_u8_relu"), (4, "1x1_s2_u4_res"),
                                           (4, "3x3_s2_s8_f32"), (7, "3x3_pad_u8_relu"),
                                           (7, "3x3_s2_s8_f32"), (8, "1x1_s2_u4_res")])
@pytest.mark.parametrize("n,grouping", [(4, "fgq"), (8, "cluster")])
@pytest.mark.parametrize("isa", RUNNABLE)
def test_wide_values_conv_bit_exact(isa, bits, geometry, n, grouping):
    spec = dataclasses.replace(_spec(geometry, n, grouping), weight_bits=bits)
    assert maddubs_form(spec, isa) == isa + "t"
    run_and_check(spec, isa)


MORE = {
    # a group spans 2 steps and C is not a multiple of N: chunks fall back to one step
    "n8_c20": dict(in_channels=20, height=5, width=5, out_channels=16, kernel=3, padding=1,
                   act="u8", out="i32", group_size=8),
    # grouped conv with block-aligned output groups, dilation, batch 2
    "groups2_dil": dict(batch=2, in_channels=32, height=7, width=7, out_channels=32, kernel=3,
                        padding=2, dilation=2, groups=2, act="s4", out="u4", residual="u8",
                        group_size=4),
    # imported-model zero points: pad holds z_x, the bias pays z_x * sum(w) back
    "zero_points": dict(in_channels=12, height=6, width=7, out_channels=16, kernel=3, padding=1,
                        act="u8", out="u8", bias=True, relu=True, x_zero_point=113,
                        out_zero_point=37, group_size=4),
    # odd width (padded accumulator), 7x7 stem-like with C = 3 < 4 (one group)
    "stem_c3": dict(in_channels=3, height=15, width=15, out_channels=16, kernel=7, stride=2,
                    padding=3, act="s8", out="u8", relu=True, group_size=3),
}


@pytest.mark.parametrize("grouping", ["fgq", "cluster"])
@pytest.mark.parametrize("name", list(MORE))
@pytest.mark.parametrize("isa", RUNNABLE)
def test_ternary_conv_more_bit_exact(isa, name, grouping):
    kw = dict(MORE[name])
    kw.setdefault("batch", 1)
    spec = ConvSpec(grouping=grouping, **kw)
    assert maddubs_form(spec, isa) is not None
    run_and_check(spec, isa)


DENSE = {
    "n1_f32": dict(batch=1, in_features=40, out_features=24, act="u8", out="f32", group_size=8),
    "n3_s8": dict(batch=3, in_features=64, out_features=32, act="s8", out="s8", bias=True,
                  relu=True, group_size=64),
    "n8_u4_n2": dict(batch=8, in_features=18, out_features=40, act="u4", out="i32",
                     group_size=2),
}


@pytest.mark.parametrize("name", list(DENSE))
@pytest.mark.parametrize("isa", RUNNABLE)
def test_ternary_dense_bit_exact(isa, name):
    spec = DenseSpec(**DENSE[name]).as_conv()
    assert maddubs_form(spec, isa) is not None
    run_and_check(spec, isa)


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("act,amax,steps", [("u8", 255, 64), ("u4", 15, 1092)])
@pytest.mark.parametrize("isa", RUNNABLE)
def test_int16_accumulation_exact_at_the_bound(isa, act, amax, steps, sign):
    """A chunk of the longest exact run of full-scale pairs: the int16 accumulator reaches
    +-64*510 = 32640 (u8) or +-1092*30 = 32760 (u4) of 32767."""
    c = 4 * steps
    spec = ConvSpec(batch=1, in_channels=c, height=2, width=3, out_channels=16, kernel=1,
                    act=act, out="i32", group_size=c)
    assert plan_chunks(spec).steps == max_steps(spec) == steps
    mod, names, built = build_cached(spec, isa)
    values = np.full((16, c, 1, 1), sign, np.int8)
    codes = np.full(spec.codes_shape, 127, np.uint8)
    x = np.full(spec.x_shape, amax, np.uint8)
    w = ref.decode_weights(values, codes, group_size=c)
    acc = ref.conv2d_int(x.transpose(0, 3, 1, 2), w).transpose(0, 2, 3, 1).astype(np.int32)
    assert abs(int(acc.flat[0])) == 127 * amax * c
    case = {"x": x, "weights": quant.pack_ternary(values), "expected": acc,
            "codes": params.kernel_codes(spec, isa=built, codes=codes)}
    check(run(mod, spec, names, case), case, spec)


@pytest.mark.parametrize("act,x_max", [("u8", 255), ("s8", 127)])
@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("isa", RUNNABLE)
def test_7bit_weights_exact_at_the_pair_bound(isa, sign, act, x_max):
    """7-bit weights at full scale (|v| = 63) times the largest activation: every vpmaddubsw
    pair is 2*255*63 = 32130 (s8: +128 shifted to 255), one int16 step, then the code (2)."""
    c = 64
    spec = ConvSpec(batch=1, in_channels=c, height=2, width=3, out_channels=16, kernel=1,
                    act=act, out="i32", group_size=c, weight_bits=7)
    assert maddubs_form(spec, isa) == isa + "t" and max_steps(spec) == 1
    mod, names, built = build_cached(spec, isa)
    values = np.full((16, c, 1, 1), 63 * sign, np.int8)
    codes = np.full(spec.codes_shape, 2, np.uint8)
    x = np.full(spec.x_shape, x_max, np.uint8 if act == "u8" else np.int8)
    w = ref.decode_weights(values, codes, group_size=c)
    acc = ref.conv2d_int(x.transpose(0, 3, 1, 2), w).transpose(0, 2, 3, 1).astype(np.int32)
    assert abs(int(acc.flat[0])) == 2 * 63 * x_max * c
    weights = layout.block_weights(values)
    case = {"x": x, "weights": weights, "expected": acc,
            "codes": params.kernel_codes(spec, isa=built, codes=codes),
            "bias": params.kernel_bias(spec, isa=built, weights=weights, codes=codes, bias=None)}
    check(run(mod, spec, names, case), case, spec)


def test_maddubs_form_choice():
    base = dict(batch=1, in_channels=16, height=4, width=4, out_channels=32, kernel=3)
    assert maddubs_form(ConvSpec(group_size=4, **base), "avx2") == "avx2t"
    assert maddubs_form(ConvSpec(group_size=4, **base), "avx512") == "avx512t"
    assert maddubs_form(ConvSpec(group_size=4, **base), "vnni512") is None
    assert maddubs_form(ConvSpec(group_size=4, weight_bits=8, **base), "avx2") is None  # 64770
    assert maddubs_form(ConvSpec(group_size=16, weight_bits=7, **base), "avx2") == "avx2t"  # 32130
    assert maddubs_form(ConvSpec(group_size=16, weight_bits=7, act="s8", **base), "avx512") == "avx512t"
    assert maddubs_form(ConvSpec(group_size=4, weight_bits=8, act="u4", **base), "avx2") == "avx2t"
    assert maddubs_form(ConvSpec(group_size=4, weight_bits=4, act="s8", **base), "avx2") == "avx2t"
    assert maddubs_form(ConvSpec(group_size=3, **base), "avx2") is None  # pairs straddle groups
    assert maddubs_form(ConvSpec(group_size=16, **base), "avx2") == "avx2t"
    dw = dict(base, in_channels=32, groups=32)
    assert maddubs_form(ConvSpec(**dw), "avx2") is None
    small_groups = dict(base, groups=4)  # 8 outputs per group: not a multiple of 16 lanes
    assert maddubs_form(ConvSpec(group_size=4, **small_groups), "avx2") == "avx2t"
    assert maddubs_form(ConvSpec(group_size=4, **small_groups), "avx512") is None


@pytest.mark.parametrize("kernel", [1, 3, 7, 9])
@pytest.mark.parametrize("act,bits", [("u8", 2), ("u4", 2), ("s8", 2), ("u8", 4), ("u8", 7), ("u4", 8)])
@pytest.mark.parametrize("n", [2, 4, 6, 8, 12, 16, 64, 256])
@pytest.mark.parametrize("grouping", ["fgq", "cluster"])
@pytest.mark.parametrize("channels", [24, 256])
def test_chunk_plan_is_exact(channels, grouping, n, act, bits, kernel):
    """Every chunk's steps share their pair codes, and no chunk exceeds the int16 bound."""
    spec = ConvSpec(batch=1, in_channels=channels, height=9, width=9, out_channels=16,
                    kernel=kernel, group_size=min(n, channels), grouping=grouping, act=act,
                    weight_bits=bits)
    plan = plan_chunks(spec)
    amax = 15 if act == "u4" else 255
    vmax = quant.value_max(bits)
    assert plan.steps * 2 * amax * vmax <= 32767
    cb_n = -(-channels // 4)
    assert cb_n % plan.span == 0
    groups = lambda c: min(c // spec.group_size, spec.n_groups_q - 1)  # noqa: E731
    for co in range(cb_n // plan.span):
        for h in (0, 1):
            pair_groups = {groups(4 * cb + 2 * h + j) for cb in
                           range(co * plan.span, (co + 1) * plan.span) for j in (0, 1)}
            assert len(pair_groups) == 1, (co, h, pair_groups)
    rs = kernel * kernel
    assert plan.rs_inside == (grouping == "cluster" and 1 < rs <= max_steps(spec))
    assert plan.steps == plan.span * (rs if plan.rs_inside else 1)


# The instructions of the ternary inner loop, per target (compile-only: runs on any host).
ASM = {"haswell": "ymm", "skylake-avx512": "zmm"}


@pytest.mark.parametrize("n,grouping,spans", [(4, "fgq", False), (16, "fgq", True),
                                              (4, "cluster", True)])
@pytest.mark.parametrize("mcpu", list(ASM))
def test_ternary_assembly(mcpu, n, grouping, spans):
    spec = ConvSpec(batch=1, in_channels=32, height=8, width=8, out_channels=32, kernel=3,
                    padding=1, act="u8", out="u8", relu=True, group_size=n, grouping=grouping)
    target = ta.make_target(mcpu)
    func = conv2d_kernel(spec, target=target)
    assert str(func.attrs["tvm_ternary.isa"]) == ta.choose_isa(target)
    asm = ta.assembly(func, target=target)
    reg = ASM[mcpu]
    count = lambda insn: len(re.findall(rf"\b{insn}\s[^\n]*%{reg}", asm))  # noqa: E731
    assert count("vpmaddubsw") > 0
    assert count("vpmaddwd") > 0
    # int16 accumulation only where a chunk has several steps; N=4 FGQ is one step per group
    assert (count("vpaddw") > 0) == spans
    if spans:  # one vpmaddwd per chunk, not per step
        assert count("vpmaddwd") < count("vpmaddubsw")
    assert "vpdpbusd" not in asm
