"""numpy reference semantics: integer conv/dense, requantize edges, ternary conv vs float conv."""

import numpy as np
import pytest

from tvm_ternary.quant import quantize_weights, ternarize, to_integer_scales
from tvm_ternary.quant import reference as ref


def naive_conv(x, w, stride, pad, dil, groups):
    """Direct seven-loop convolution in Python integers: independent of the reference's im2col."""
    n, c, h, wd = x.shape
    k, cg, r, s = w.shape
    oh = (h + 2 * pad - dil * (r - 1) - 1) // stride + 1
    ow = (wd + 2 * pad - dil * (s - 1) - 1) // stride + 1
    out = np.zeros((n, k, oh, ow), np.int64)
    kg = k // groups
    for b in range(n):
        for o in range(k):
            g = o // kg
            for y in range(oh):
                for xx in range(ow):
                    acc = 0
                    for ci in range(cg):
                        for i in range(r):
                            for j in range(s):
                                iy, ix = y * stride - pad + i * dil, xx * stride - pad + j * dil
                                if 0 <= iy < h and 0 <= ix < wd:
                                    acc += int(x[b, g * cg + ci, iy, ix]) * int(w[o, ci, i, j])
                    out[b, o, y, xx] = acc
    return out


@pytest.mark.parametrize(
    "c,k,ksize,stride,pad,dil,groups",
    [
        (4, 8, 3, 1, 1, 1, 1),
        (3, 5, 7, 2, 3, 1, 1),
        (6, 4, 1, 1, 0, 1, 1),
        (8, 8, 3, 2, 1, 1, 2),
        (6, 6, 3, 1, 1, 1, 6),  # depthwise
        (4, 4, 3, 1, 2, 2, 1),  # dilation
    ],
)
@pytest.mark.parametrize("signed", [False, True])
def test_conv2d_int_matches_direct_loops(c, k, ksize, stride, pad, dil, groups, signed):
    rng = np.random.default_rng(c * 31 + k)
    lo, hi = (-128, 128) if signed else (0, 256)
    x = rng.integers(lo, hi, size=(2, c, 9, 8)).astype(np.int8 if signed else np.uint8)
    w = rng.integers(-127, 128, size=(k, c // groups, ksize, ksize)).astype(np.int8)
    got = ref.conv2d_int(x, w, stride=stride, padding=pad, dilation=dil, groups=groups)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, naive_conv(x, w, stride, pad, dil, groups))


@pytest.mark.parametrize("c, w_max, path", [(8, 127, np.float32), (64, 127, np.float64), (64, 20, np.float32)])
def test_conv2d_int_float32_and_float64_paths_are_exact(c, w_max, path):
    """float32 BLAS only where every partial sum is an integer below 2^24 (FLOAT32_EXACT)."""
    rng = np.random.default_rng(c + w_max)
    x = rng.integers(200, 256, size=(1, c, 6, 5)).astype(np.uint8)  # large values: near the bound
    w = rng.choice([-w_max, w_max], size=(3, c, 3, 3)).astype(np.int8)
    assert ref._exact_dtype(x, w) is path
    got = ref.conv2d_int(x, w, stride=1, padding=1)
    np.testing.assert_array_equal(got, naive_conv(x, w, 1, 1, 1, 1))
    one = ref.conv2d_int(x, w[:, :, 1:2, 1:2], stride=1, padding=0)  # 1x1: patches are x itself
    np.testing.assert_array_equal(one, naive_conv(x, w[:, :, 1:2, 1:2], 1, 0, 1, 1))


def test_dense_int():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(3, 40)).astype(np.uint8)
    w = rng.integers(-127, 128, size=(7, 40)).astype(np.int8)
    np.testing.assert_array_equal(ref.dense_int(x, w), x.astype(np.int64) @ w.astype(np.int64).T)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_integer_conv_equals_float_conv_of_dequantized_weights(n, bits):
    """acc * s_x * s_k must equal a float conv of the dequantized weights and activations.
    Tolerance: float32 dequantized weights carry ~1e-7 relative rounding each."""
    rng = np.random.default_rng(n + bits)
    wf = rng.normal(size=(8, 16, 3, 3)).astype(np.float32)
    iw = to_integer_scales(quantize_weights(wf, bits=bits, group_size=n))
    x = rng.integers(0, 256, size=(1, 16, 6, 6)).astype(np.uint8)
    s_x = 0.02
    acc = ref.conv2d_int(x, iw.decode_int8(), padding=1)
    got = ref.dequantize(acc, scale=s_x * iw.channel_scales)
    # Float reference: the same im2col on float64 of the dequantized operands.
    xf = x.astype(np.float64) * s_x
    wdq = iw.dequantize().astype(np.float64)
    expect = naive_float_conv(xf, wdq)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5 * np.abs(expect).max())


def naive_float_conv(x, w):
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd))
    for i in range(3):
        for j in range(3):
            out += np.einsum("kc,nchw->nkhw", w[:, :, i, j], xp[:, :, i : i + h, j : j + wd])
    return out


def test_decode_weights_rejects_overflow():
    with pytest.raises(ValueError, match="int8 range"):
        ref.decode_weights(np.full((1, 4, 1, 1), 7, np.int8), np.full((1, 1, 1, 1), 19, np.uint8), group_size=4)


# --- requantize: a hand-written table at the rounding and saturation edges ---------------
HALF = (np.array([2**30]), np.array([31]))  # multiplier/shift for exactly 0.5


@pytest.mark.parametrize(
    "acc,signed,bits,relu,expected",
    [
        (1, False, 8, False, 0),  # 0.5 -> 0 (even)
        (3, False, 8, False, 2),  # 1.5 -> 2 (even)
        (5, False, 8, False, 2),  # 2.5 -> 2
        (7, False, 8, False, 4),  # 3.5 -> 4
        (-3, True, 8, False, -2),  # -1.5 -> -2
        (-5, True, 8, False, -2),  # -2.5 -> -2
        (510, False, 8, False, 255),  # 255 fits
        (512, False, 8, False, 255),  # 256 saturates
        (-2, False, 8, False, 0),  # unsigned floor at 0
        (254, True, 8, False, 127),
        (256, True, 8, False, 127),  # 128 saturates
        (-256, True, 8, False, -128),
        (-258, True, 8, False, -128),  # -129 saturates
        (-20, True, 8, True, 0),  # ReLU
        (30, False, 4, False, 15),  # u4 saturates at 15
        (29, False, 4, False, 14),  # 14.5 -> 14
        (14, True, 4, False, 7),
        (16, True, 4, False, 7),  # s4 saturates at 7
        (-17, True, 4, False, -8),  # -8.5 -> -8
        (-18, True, 4, False, -8),  # -9 saturates
    ],
)
def test_requantize_table(acc, signed, bits, relu, expected):
    got = ref.requantize(np.array([acc], np.int32), multiplier=HALF[0], shift=HALF[1],
                         bits=bits, signed=signed, relu=relu, channel_axis=0)
    assert got.dtype == (np.int8 if signed else np.uint8)
    assert int(got[0]) == expected


def test_requantize_residual_term_rounded_on_its_own():
    # rint(0.5 * 3) + rint(0.5 * 0) = 2; rint(0.5 * 1) + rint(0.5 * 2) = 0 + 1; rint(0.5) + rint(-0.5) = 0
    acc = np.array([[3], [1], [1]], np.int32)
    res = np.array([[0], [2], [-1]], np.int8)
    got = ref.requantize(acc, multiplier=HALF[0], shift=HALF[1], residual=res,
                         residual_multiplier=HALF[0], signed=True)
    assert got.ravel().tolist() == [2, 1, 0]


@pytest.mark.parametrize("real", [1e-6, 0.001234, 0.37, 0.5, 0.9999999, 1.0, 3.75, 1000.0])
def test_quantize_multiplier(real):
    m, s = ref.quantize_multiplier(np.array([real]))
    assert 2**30 <= int(m[0]) < 2**31
    assert int(m[0]) * 2.0 ** -int(s[0]) == pytest.approx(real, rel=2**-30)


def _requantize_exact(acc, mult, shift, res, rmult):
    """The exact rational ``(acc*M + res*R) / 2^shift`` of one channel (Python integers)."""
    from fractions import Fraction

    return [Fraction(int(a) * int(mult) + int(r) * int(rmult), 2 ** int(shift)) for a, r in zip(acc, res)]


@pytest.mark.parametrize("peak", [2**8, 2**20, 2**23])
def test_requantize_with_residual_is_within_one_unit_of_the_exact_value(peak):
    """Each term rounded on its own (two half units) and float32 scales (relative 2^-24 of a
    value below 2^8 in the output range): never more than one unit from the exact rational."""
    rng = np.random.default_rng(peak)
    k, n = 6, 400
    mult = rng.integers(2**30, 2**31, size=k)
    shift = np.full(k, 31) + np.log2(peak).astype(np.int64) - 6  # outputs within +-2^7
    acc = rng.integers(-peak, peak, size=(n, k))
    res = rng.integers(-128, 128, size=(n, k))
    rmult = rng.integers(2**29, 2**31, size=k) >> (np.log2(peak).astype(np.int64) - 6)
    got = ref.requantize(acc.astype(np.int64), multiplier=mult, shift=shift, channel_axis=1, signed=True,
                         residual=res, residual_multiplier=rmult).astype(np.int64)
    for j in range(k):
        exact = _requantize_exact(acc[:, j], mult[j], shift[j], res[:, j], rmult[j])
        inside = [(g, e) for g, e in zip(got[:, j], exact) if -127 <= e <= 126]
        assert len(inside) > n // 2
        assert max(abs(g - e) for g, e in inside) <= 1
        # and it is the two terms, each rounded half to even
        t = np.rint(np.float32(acc[:, j]) * ref.requantize_scale(mult[j], shift[j])) + np.rint(
            np.float32(res[:, j]) * ref.requantize_scale(rmult[j], shift[j]))
        np.testing.assert_array_equal(got[:, j], np.clip(t, -128, 127))


@pytest.mark.parametrize("peak", [2**8, 2**20, 2**24, 2**30])
def test_requantize_without_residual_is_one_float32_product(peak):
    """y = rint(f32(acc) * f32(M 2^-s)): against exact rationals of the same float32 operands.
    The float32 product is the exact one correctly rounded, so the integers can differ only
    where the exact product lies within one float32 ulp of a half-integer."""
    from fractions import Fraction

    rng = np.random.default_rng(peak)
    k, n = 6, 400
    mult = rng.integers(2**30, 2**31, size=k)
    shift = rng.integers(8, 45, size=k)
    acc = rng.integers(-peak, peak, size=(n, k))
    got = ref.requantize(acc.astype(np.int32), multiplier=mult, shift=shift, channel_axis=1, signed=True)
    scale = ref.requantize_scale(mult, shift)
    assert scale.dtype == np.float32
    assert np.all(np.abs(scale.astype(np.float64) / (mult * 2.0 ** -shift) - 1) <= 2**-24)
    near = 0
    for j in range(k):
        s = Fraction(float(scale[j]))
        for i in range(n):
            a = Fraction(float(np.float32(acc[i, j])))  # f32(acc): exact below 2^24
            v = a * s
            f = v.numerator // v.denominator
            up = v - f > Fraction(1, 2) or (v - f == Fraction(1, 2) and f % 2 == 1)
            want = min(max(f + up, -128), 127)
            if int(got[i, j]) != want:
                ulp = abs(float(v)) * 2.0**-23
                assert abs(float(v - f) - 0.5) <= ulp, (i, j, int(got[i, j]), want)
                near += 1
    assert near <= 2


def test_requantize_scale_is_the_float64_value_rounded_once():
    mult = np.array([2**30, 2**31 - 1, 1234567891], np.int64)
    shift = np.array([31, 62, 1], np.int64)
    want = np.array([0.5, (2**31 - 1) * 2.0**-62, 1234567891 / 2], np.float64).astype(np.float32)
    np.testing.assert_array_equal(ref.requantize_scale(mult, shift), want)


def test_requantize_ties_round_half_to_even_on_every_path():
    # multiplier 2^30, shift 31: v = acc / 2 exactly; acc odd gives a tie
    acc = np.array([[1], [3], [5], [-1], [-3]], np.int64)
    got = ref.requantize(acc, multiplier=np.array([2**30]), shift=np.array([31]), signed=True)  # float32
    assert got.ravel().tolist() == [0, 2, 2, 0, -2]
    for big in (False, True):  # with a residual term (0 here); a huge accumulator elsewhere changes nothing
        a = np.concatenate([acc, [[2**31 - 1]]]) if big else acc
        got = ref.requantize(a, multiplier=np.array([2**30]), shift=np.array([31]), signed=True,
                             residual=np.zeros_like(a), residual_multiplier=np.array([2**29]))
        assert got.ravel()[:5].tolist() == [0, 2, 2, 0, -2]


def test_integer_bias():
    b = ref.integer_bias(np.array([0.5, -1.0, 0.0]), input_scale=0.5, channel_scales=np.array([0.5, 0.25, 0.0]))
    assert b.tolist() == [2, -8, 0]


def test_ternary_conv_stays_in_int32():
    """Worst case: 255 * 127 * C*R*S terms; 512x3x3 still fits int32 comfortably."""
    x = np.full((1, 512, 3, 3), 255, np.uint8)
    w = np.full((1, 512, 3, 3), 127, np.int8)
    assert int(ref.conv2d_int(x, w)[0, 0, 0, 0]) == 255 * 127 * 512 * 9
