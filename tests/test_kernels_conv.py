"""Bit-exactness of the conv2d / dense kernels against tvm_ternary.quant.reference, for every
ISA variant this CPU runs (forced through the target's mcpu)."""

from __future__ import annotations

import pytest

from kernels_harness import ISA_MCPU, host_runs, run_and_check
from tvm_ternary.schedules import ConvSpec, DenseSpec

ISAS = [isa for isa in ISA_MCPU if host_runs(isa)]

# Small layers covering: channel counts off the 4/16 blocks, strides, asymmetric padding,
# dilation, groups (block-aligned and not), batch > 1, every activation kind, group sizes
# N in {1, 2, 4, 8, C}, and each epilogue step.
CASES = {
    "3x3_u8_i32": dict(in_channels=16, height=9, width=9, out_channels=32, kernel=3, padding=1,
                       act="u8", out="i32", group_size=8),
    "3x3_s8_odd_s2": dict(in_channels=6, height=7, width=10, out_channels=20, kernel=3,
                          stride=2, padding=(1, 2, 0, 1), act="s8", out="u8", bias=True,
                          relu=True, group_size=2),
    "1x1_u4_res": dict(in_channels=32, height=5, width=6, out_channels=48, kernel=1, stride=2,
                       act="u4", out="s8", residual="s8", group_size=4),
    "7x7_stem_f32": dict(in_channels=3, height=17, width=17, out_channels=16, kernel=7,
                         stride=2, padding=3, act="u8", out="f32", float_bias=True, relu=True,
                         bias=True, group_size=3),
    "3x3_dil_s4_u4": dict(in_channels=8, height=8, width=8, out_channels=16, kernel=3,
                          padding=2, dilation=2, act="s4", out="u4", residual="u8",
                          group_size=1),
    "3x3_groups2": dict(in_channels=32, height=6, width=6, out_channels=64, kernel=3,
                        padding=1, groups=2, act="s8", out="s4", bias=True, group_size=16),
    "3x3_groups4_small": dict(in_channels=16, height=6, width=5, out_channels=16, kernel=3,
                              padding=1, groups=4, act="u8", out="i32", relu=True),
    "depthwise_s1": dict(in_channels=24, height=7, width=7, out_channels=24, kernel=3,
                         padding=1, groups=24, act="u8", out="u8", bias=True, relu=True),
    "depthwise_s2_s8": dict(in_channels=20, height=9, width=8, out_channels=20, kernel=3,
                            stride=2, padding=1, groups=20, act="s8", out="s8",
                            residual="s8"),
    "batch2_3x3": dict(batch=2, in_channels=12, height=6, width=15, out_channels=16,
                       kernel=3, padding=1, act="s8", out="f32", group_size=12),
}


def _spec(name: str, bits: int) -> ConvSpec:
    kw = dict(CASES[name])
    kw.setdefault("batch", 1)
    return ConvSpec(weight_bits=bits, **kw)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("isa", ISAS)
def test_conv_bit_exact(isa, name, bits):
    run_and_check(_spec(name, bits), isa)


@pytest.mark.parametrize("name", ["3x3_s8_odd_s2", "depthwise_s1", "3x3_groups4_small",
                                  "1x1_u4_res"])
def test_reference_schedule_bit_exact(name):
    run_and_check(_spec(name, 2), "vnni512" if host_runs("vnni512") else "plain",
                  schedule="reference")


# The VNNI depthwise kernel (compute.depthwise_vnni_compute: one vpdpbusd per kernel row): row
# widths 1-4 taps, strides, dilation, asymmetric padding, u4 / zero-point inputs, residuals and
# every output kind, one and several channel blocks, bands of output rows that do not divide.
DEPTHWISE_VNNI = {
    "3x3_s1_relu": dict(in_channels=32, height=9, width=11, kernel=3, padding=1, act="u8",
                        out="u8", bias=True, relu=True),
    "3x3_s2_res": dict(in_channels=16, height=13, width=10, kernel=3, stride=2, padding=1,
                       act="u8", out="s8", bias=True, residual="s8"),
    "3x3_dil2_pad_asym_u4": dict(in_channels=48, height=10, width=9, kernel=3, dilation=2,
                                 padding=(2, 1, 0, 2), act="u4", out="u4", relu=True),
    "1x4_s1_i32": dict(in_channels=16, height=5, width=12, kernel=(1, 4), padding=(0, 1, 0, 2),
                       act="u8", out="i32"),
    "5x2_s2_f32": dict(in_channels=32, height=11, width=7, kernel=(5, 2), stride=2, padding=2,
                       act="u8", out="f32", bias=True, float_bias=True),
    "3x1_zp": dict(in_channels=16, height=17, width=6, kernel=(3, 1), padding=(1, 0, 1, 0),
                   act="u8", out="u8", bias=True, x_zero_point=131, out_zero_point=5),
}


def _depthwise_spec(name: str, bits: int, table: dict = DEPTHWISE_VNNI) -> ConvSpec:
    kw = dict(table[name])
    c = kw["in_channels"]
    return ConvSpec(batch=1, out_channels=c, groups=c, weight_bits=bits, **kw)


VNNI_ISAS = [isa for isa in ("vnni512", "avxvnni") if isa in ISAS]


@pytest.mark.parametrize("bits", [2, 8])
@pytest.mark.parametrize("name", list(DEPTHWISE_VNNI))
@pytest.mark.parametrize("isa", VNNI_ISAS)
def test_depthwise_vnni_bit_exact(isa, name, bits):
    from tvm_ternary.schedules.compute import depthwise_vnni_form

    spec = _depthwise_spec(name, bits)
    assert depthwise_vnni_form(spec, isa)
    run_and_check(spec, isa)


@pytest.mark.parametrize("isa", ["vnni512", "avxvnni"])
def test_depthwise_vnni_form_choice_and_instruction(isa):
    """The VNNI depthwise kernel is built where it applies and multiplies with vpdpbusd (one per
    row of taps); signed inputs, rows wider than a word and partial channel blocks keep the
    int32 kernel."""
    from kernels_harness import ISA_MCPU
    from tvm_ternary import tvm_adapter as ta
    from tvm_ternary.schedules import conv2d_kernel
    from tvm_ternary.schedules.compute import depthwise_vnni_form

    spec = _depthwise_spec("3x3_s1_relu", 8)
    target = ta.make_target(ISA_MCPU[isa])
    asm = ta.assembly(conv2d_kernel(spec, target=target), target=target)
    assert "vpdpbusd" in asm and ("zmm" in asm) == (isa == "vnni512")
    base = dict(batch=1, height=8, width=8, padding=1, act="u8", out="u8")
    assert not depthwise_vnni_form(ConvSpec(in_channels=16, out_channels=16, groups=16, kernel=3,
                                            **{**base, "act": "s8"}), isa)
    assert not depthwise_vnni_form(ConvSpec(in_channels=16, out_channels=16, groups=16, kernel=5,
                                            **base), isa)
    assert not depthwise_vnni_form(ConvSpec(in_channels=20, out_channels=20, groups=20, kernel=3,
                                            **base), isa)
    assert not depthwise_vnni_form(spec, "avx512") and not depthwise_vnni_form(spec, "plain")


# The int16-pair depthwise kernel of avx2 / avx512 (compute.depthwise_pairs_compute: one
# vpmaddwd per two taps of a row), on the same shapes: odd and even row widths (the missing
# tap of an odd row), strides, dilation, asymmetric padding, u4 and zero points, every output.
# It takes stride 1 only; a residual and a float exit on odd row widths too.
PAIR_ISAS = [isa for isa in ("avx512", "avx2") if isa in ISAS]
DEPTHWISE_PAIRS = {
    **{n: kw for n, kw in DEPTHWISE_VNNI.items() if kw.get("stride", 1) == 1},
    "5x3_res": dict(in_channels=16, height=9, width=7, kernel=(5, 3), padding=2, act="u8",
                    out="s8", bias=True, residual="s8"),
    "3x5_f32": dict(in_channels=32, height=6, width=9, kernel=(3, 5), padding=(1, 2, 1, 0),
                    act="u8", out="f32", bias=True, float_bias=True, relu=True),
}


@pytest.mark.parametrize("bits", [2, 8])
@pytest.mark.parametrize("name", list(DEPTHWISE_PAIRS))
@pytest.mark.parametrize("isa", PAIR_ISAS)
def test_depthwise_pairs_bit_exact(isa, name, bits):
    from tvm_ternary.schedules.compute import depthwise_pairs_form

    spec = _depthwise_spec(name, bits, DEPTHWISE_PAIRS)
    assert depthwise_pairs_form(spec, isa)
    run_and_check(spec, isa)


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_depthwise_pairs_form_choice_and_instruction(isa):
    """Built for avx2 / avx512 targets (assembly checked on hosts that cannot run it), it
    multiplies with vpmaddwd on the ISA's registers and never with the int32 kernel's vpmulld;
    signed inputs, partial channel blocks, stride 2 and VNNI ISAs do not take it."""
    from tvm_ternary import tvm_adapter as ta
    from tvm_ternary.schedules import conv2d_kernel
    from tvm_ternary.schedules.compute import depthwise_pairs_form

    spec = _depthwise_spec("3x3_s1_relu", 8)
    target = ta.make_target(ISA_MCPU[isa])
    asm = ta.assembly(conv2d_kernel(spec, target=target), target=target)
    assert "vpmaddwd" in asm and "vpmulld" not in asm and ("zmm" in asm) == (isa == "avx512")
    base = dict(batch=1, height=8, width=8, padding=1, act="u8", out="u8")
    assert not depthwise_pairs_form(ConvSpec(in_channels=16, out_channels=16, groups=16, kernel=3,
                                             **{**base, "act": "s8"}), isa)
    assert not depthwise_pairs_form(ConvSpec(in_channels=20, out_channels=20, groups=20, kernel=3,
                                             **base), isa)
    assert depthwise_pairs_form(ConvSpec(in_channels=16, out_channels=16, groups=16, kernel=5,
                                         **base), isa)
    assert not depthwise_pairs_form(ConvSpec(in_channels=16, out_channels=16, groups=16, kernel=3,
                                             stride=2, **base), isa)
    assert not depthwise_pairs_form(spec, "vnni512") and not depthwise_pairs_form(spec, "plain")


DENSE = {
    "n1": dict(batch=1, in_features=40, out_features=24, act="u8", out="f32", group_size=8),
    "n3_s8": dict(batch=3, in_features=64, out_features=32, act="s8", out="s8", bias=True,
                  relu=True, group_size=64),
    "n8_u4": dict(batch=8, in_features=18, out_features=40, act="u4", out="i32", group_size=4),
}


@pytest.mark.parametrize("bits", [2, 8])
@pytest.mark.parametrize("name", list(DENSE))
@pytest.mark.parametrize("isa", ISAS)
def test_dense_bit_exact(isa, name, bits):
    spec = DenseSpec(weight_bits=bits, **DENSE[name])
    run_and_check(spec.as_conv(), isa)


# 1x1 convs / dense layers with one group code per output channel skip the weight decode on
# vnni512 (compute.codes_in_epilogue: the accumulator is scaled by q instead): signed inputs (the
# +128 shift and its bias term), u4, zero points, residual, output channels off the 16 lanes,
# input channels off the 4-byte words, batch > 1, every output kind.
CODES_IN_EPILOGUE = {
    "dense_u8_f32": dict(batch=1, in_channels=40, height=1, width=1, out_channels=24,
                         act="u8", out="f32", bias=True, float_bias=True),
    "dense_s8_relu_b3": dict(batch=3, in_channels=64, height=1, width=1, out_channels=32,
                             act="s8", out="s8", bias=True, relu=True),
    "1x1_u4_res_s2": dict(batch=1, in_channels=18, height=6, width=7, out_channels=20, stride=2,
                          act="u4", out="s8", residual="s8", bias=True),
    "1x1_u8_zp_i32": dict(batch=2, in_channels=16, height=3, width=5, out_channels=48,
                          act="u8", out="i32", x_zero_point=97),
    "1x1_u8_zp_u8": dict(batch=1, in_channels=36, height=5, width=5, out_channels=16,
                         act="u8", out="u8", bias=True, relu=True, x_zero_point=200,
                         out_zero_point=9),
}


@pytest.mark.skipif("vnni512" not in ISAS, reason="this CPU has no AVX512-VNNI")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name", list(CODES_IN_EPILOGUE))
def test_codes_in_epilogue_bit_exact(name, bits):
    from tvm_ternary.schedules.compute import codes_in_epilogue

    spec = ConvSpec(kernel=1, weight_bits=bits, **CODES_IN_EPILOGUE[name])
    assert spec.n_groups_q == 1 and codes_in_epilogue(spec, "vnni512")
    run_and_check(spec, "vnni512")


def test_codes_in_epilogue_only_where_exact_and_cheap():
    """Not for ternary weights (their 2-bit codes need the decode), several groups, kernels
    wider than 1x1 (codes per (r, s)) or other ISAs (their words are int16 pairs / 8 lanes)."""
    from tvm_ternary.schedules.compute import codes_in_epilogue

    base = dict(batch=1, in_channels=32, height=4, width=4, out_channels=32, act="u8", out="u8")
    assert codes_in_epilogue(ConvSpec(kernel=1, weight_bits=8, **base), "vnni512")
    assert not codes_in_epilogue(ConvSpec(kernel=1, weight_bits=2, **base), "vnni512")
    assert not codes_in_epilogue(ConvSpec(kernel=1, weight_bits=8, group_size=16, **base), "vnni512")
    assert not codes_in_epilogue(ConvSpec(kernel=3, weight_bits=8, **base), "vnni512")
    # ... unless the codes are the same at every (r, s): the cluster grouping
    assert codes_in_epilogue(ConvSpec(kernel=3, weight_bits=8, grouping="cluster", **base), "vnni512")
    assert not codes_in_epilogue(ConvSpec(kernel=3, weight_bits=8, grouping="cluster", group_size=16,
                                          **base), "vnni512")
    for isa in ("avxvnni", "avx512", "avx2", "plain"):
        assert not codes_in_epilogue(ConvSpec(kernel=1, weight_bits=8, **base), isa)


# Wider kernels with one code per output channel at every (r, s) (the cluster grouping: what an
# unpacked ternary layer runs as, compute.unpacked_spec): padding, stride 2, residual, s8 input.
CODES_IN_EPILOGUE_RS = {
    "3x3_u8_res_u8": dict(in_channels=24, height=7, width=7, out_channels=32, padding=1,
                          act="u8", out="u8", residual="u8", relu=True, bias=True),
    "3x3_s8_s2": dict(in_channels=16, height=9, width=8, out_channels=20, padding=1, stride=2,
                      act="s8", out="s8", bias=True),
    "5x5_u8_zp_i32": dict(in_channels=8, height=6, width=6, out_channels=16, kernel=5, padding=2,
                          act="u8", out="i32", x_zero_point=31),
}


@pytest.mark.skipif("vnni512" not in ISAS, reason="this CPU has no AVX512-VNNI")
@pytest.mark.parametrize("name", list(CODES_IN_EPILOGUE_RS))
def test_codes_in_epilogue_wide_kernels_bit_exact(name):
    from tvm_ternary.schedules.compute import codes_in_epilogue

    kw = {"kernel": 3, **CODES_IN_EPILOGUE_RS[name]}
    spec = ConvSpec(batch=1, weight_bits=8, grouping="cluster", **kw)
    assert spec.n_groups_q == 1 and codes_in_epilogue(spec, "vnni512")
    run_and_check(spec, "vnni512")


def test_unpacked_spec_only_for_small_ternary_maps_on_vnni512():
    """Ternary 3x3 (and wider) convs of at most UNPACK_MAX_PIXELS output pixels run as 8-bit
    words on vnni512; 1x1, depthwise, grouped, larger maps and other ISAs stay packed."""
    from tvm_ternary.schedules.compute import UNPACK_MAX_PIXELS, codes_in_epilogue, unpacked_spec

    base = dict(batch=1, in_channels=64, out_channels=32, act="u8", out="u8", padding=1)
    small = ConvSpec(height=7, width=7, kernel=3, **base)
    assert small.out_height * small.out_width <= UNPACK_MAX_PIXELS
    words = unpacked_spec(small, "vnni512")
    assert (words.weight_bits, words.group_size, words.grouping) == (8, 64, "cluster")
    assert codes_in_epilogue(words, "vnni512") and words.out_shape == small.out_shape
    assert unpacked_spec(ConvSpec(height=14, width=14, kernel=3, stride=2, **base), "vnni512")
    assert unpacked_spec(ConvSpec(height=14, width=14, kernel=3, **base), "vnni512") is None
    assert unpacked_spec(ConvSpec(height=7, width=7, kernel=1, **base), "vnni512") is None
    assert unpacked_spec(ConvSpec(height=7, width=7, kernel=3, groups=2, **base), "vnni512") is None
    assert unpacked_spec(ConvSpec(height=7, width=7, kernel=3, weight_bits=4, **base), "vnni512") is None
    for isa in ("avxvnni", "avx512", "avx2", "plain"):
        assert unpacked_spec(small, isa) is None


# Zero points of imported QDQ models (ONNX Runtime's asymmetric u8): padding holds z_x, the
# bias pays z_x * sum(w) back, the requantizer subtracts z_residual and adds z_out.
ZERO_POINT_CASES = {
    "3x3_u8_zp_res_relu": dict(in_channels=12, height=6, width=7, out_channels=20, kernel=3,
                               padding=1, act="u8", out="u8", bias=True, relu=True,
                               residual="u8", x_zero_point=113, out_zero_point=37,
                               residual_zero_point=90, group_size=4),
    "3x3_s8_zp_s2": dict(in_channels=6, height=7, width=8, out_channels=16, kernel=3, stride=2,
                         padding=(1, 2, 0, 1), act="s8", out="s8", bias=True, x_zero_point=-7,
                         out_zero_point=11, group_size=2),
    "depthwise_u8_zp": dict(in_channels=16, height=7, width=7, out_channels=16, kernel=3,
                            padding=1, groups=16, act="u8", out="u8", bias=True, relu=True,
                            x_zero_point=128, out_zero_point=3),
    "1x1_u8_zp_f32": dict(in_channels=20, height=3, width=5, out_channels=24, kernel=1,
                          act="u8", out="f32", bias=True, x_zero_point=200, group_size=20),
}


@pytest.mark.parametrize("bits", [2, 8])
@pytest.mark.parametrize("name", list(ZERO_POINT_CASES))
@pytest.mark.parametrize("isa", ISAS)
def test_conv_zero_points_bit_exact(isa, name, bits):
    run_and_check(ConvSpec(batch=1, weight_bits=bits, **ZERO_POINT_CASES[name]), isa)


@pytest.mark.parametrize("isa", ISAS)
def test_dense_zero_points_bit_exact(isa):
    spec = DenseSpec(batch=2, in_features=40, out_features=24, act="u8", out="u8", bias=True,
                     group_size=8, x_zero_point=131, out_zero_point=60)
    run_and_check(spec.as_conv(), isa)


def test_requantize_ties_round_half_even():
    """multiplier 2^30, shift 31 halves the accumulator: every odd acc is an exact tie."""
    import numpy as np

    from kernels_harness import build_cached, check, make_case, run
    from tvm_ternary.quant import reference as ref
    from tvm_ternary.schedules import params

    spec = ConvSpec(**{**CASES["3x3_u8_i32"], "out": "s8", "batch": 1})
    mod, names, built = build_cached(spec, ISAS[0])
    case = make_case(spec, isa=built)
    k = spec.out_channels
    case["multiplier"] = np.full(k, 2**30, np.int32)
    case["shift"] = np.full(k, 31, np.int32)
    case["requant_scale"] = ref.requantize_scale(case["multiplier"], case["shift"])  # 0.5: exact
    w = params.decoded_weights(spec, weights=case["weights"], codes=case["group_codes"])
    acc = ref.conv2d_int(case["x"].transpose(0, 3, 1, 2), w, padding=1).transpose(0, 2, 3, 1)
    assert (acc % 2 == 1).any()
    case["expected"] = ref.requantize(acc, multiplier=case["multiplier"], shift=case["shift"],
                                      signed=True, channel_axis=3)
    check(run(mod, spec, names, case), case, spec)


SLOW = {
    "resnet_3x3_64": dict(in_channels=64, height=28, width=28, out_channels=64, kernel=3,
                          padding=1, act="u8", out="u8", bias=True, relu=True, group_size=16),
    "resnet_1x1_s2": dict(in_channels=64, height=28, width=28, out_channels=128, kernel=1,
                          stride=2, act="s8", out="s8", residual="s8", group_size=64),
    "stem_7x7": dict(in_channels=3, height=56, width=56, out_channels=64, kernel=7, stride=2,
                     padding=3, act="s8", out="u8", relu=True),
    "odd_everything": dict(batch=4, in_channels=37, height=13, width=11, out_channels=50,
                           kernel=(3, 5), stride=(2, 1), padding=(0, 2, 1, 1),
                           dilation=(1, 2), act="u4", out="f32", group_size=5),
}


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("name", list(SLOW))
@pytest.mark.parametrize("isa", ISAS)
def test_conv_bit_exact_larger(isa, name, bits):
    kw = dict(SLOW[name])
    kw.setdefault("batch", 1)
    run_and_check(ConvSpec(weight_bits=bits, **kw), isa, seed=1)
