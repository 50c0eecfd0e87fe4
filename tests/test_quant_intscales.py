"""Integer group scales: int8 decode range, extra error, lossless trained-ternary weights."""

import numpy as np
import pytest

from tvm_ternary.quant import (
    code_max,
    quantize_weights,
    relative_error,
    ternarize,
    to_integer_scales,
)
from tvm_ternary.quant.reference import decode_weights


@pytest.mark.parametrize("bits,code_bits,qmax", [(2, 7, 127), (2, 4, 15), (4, 7, 18), (4, 4, 15), (8, 7, 1)])
def test_code_max(bits, code_bits, qmax):
    assert code_max(bits=bits, code_bits=code_bits) == qmax


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64])
@pytest.mark.parametrize("grouping", ["fgq", "cluster"])
def test_decode_fits_int8_and_matches_reference_decode(n, grouping):
    w = np.random.default_rng(n).normal(size=(16, 64, 3, 3)).astype(np.float32)
    iw = to_integer_scales(ternarize(w, group_size=n, grouping=grouping))
    decoded = iw.decode_int8()
    assert decoded.dtype == np.int8 and np.abs(decoded.astype(int)).max() <= 127
    np.testing.assert_array_equal(
        decode_weights(iw.values, iw.kernel_group_codes(), group_size=n), decoded
    )
    assert iw.kernel_group_codes().shape == (16, -(-64 // n), 3, 3)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_extra_error_is_negligible_next_to_ternarization(n):
    w = np.random.default_rng(0).normal(size=(64, 128, 3, 3)).astype(np.float32)
    tw = ternarize(w, group_size=n)
    base = relative_error(w, tw.dequantize())
    seven = relative_error(w, to_integer_scales(tw, code_bits=7).dequantize())
    four = relative_error(w, to_integer_scales(tw, code_bits=4).dequantize())
    assert base <= seven < base * 1.005  # 7-bit codes: < 0.5 % more error
    assert seven <= four < base * 1.05  # 4-bit codes: < 5 % more error


def test_lossless_for_per_channel_alpha():
    rng = np.random.default_rng(1)
    t = rng.integers(-1, 2, size=(8, 32, 3, 3)).astype(np.float32)
    alpha = rng.uniform(0.01, 0.1, size=(8, 1, 1, 1)).astype(np.float32)
    w = t * alpha
    iw = to_integer_scales(ternarize(w, group_size=4))
    assert iw.lossless
    np.testing.assert_allclose(iw.dequantize(), w, rtol=1e-6, atol=0)


def test_eight_bit_weights_are_per_channel_int8():
    w = np.random.default_rng(2).normal(size=(8, 16, 3, 3)).astype(np.float32)
    iw = to_integer_scales(quantize_weights(w, bits=8, group_size=4))
    assert set(np.unique(iw.group_codes)) == {1}
    np.testing.assert_array_equal(iw.decode_int8(), iw.values)
    assert relative_error(w, iw.dequantize()) < 0.01


def test_bad_code_bits():
    tw = ternarize(np.ones((2, 4), np.float32), group_size=2)
    with pytest.raises(ValueError, match="group-code bits"):
        to_integer_scales(tw, code_bits=5)
