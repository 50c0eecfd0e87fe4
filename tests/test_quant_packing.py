"""2-bit packed ternary weights: round trip and the exact bit layout the kernels read."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tvm_ternary.quant import pack_ternary, packed_shape, unpack_ternary

shapes = st.one_of(
    st.tuples(st.integers(1, 40), st.integers(1, 13), st.integers(1, 3), st.integers(1, 3)),
    st.tuples(st.integers(1, 40), st.integers(1, 13)),
)


@settings(max_examples=80, deadline=None)
@given(shapes.flatmap(lambda s: arrays(np.int8, s, elements=st.integers(-1, 1))))
def test_round_trip(t):
    p = pack_ternary(t)
    assert p.dtype == np.uint8 and p.shape == packed_shape(t.shape)
    np.testing.assert_array_equal(unpack_ternary(p, shape=t.shape), t)


def test_bit_layout_by_hand():
    t = np.zeros((16, 4, 1, 1), np.int8)
    t[5, :, 0, 0] = [1, -1, 0, 1]  # codes 2, 0, 1, 2 at bits 0-1, 2-3, 4-5, 6-7
    p = pack_ternary(t)
    assert p.shape == (1, 1, 1, 1, 16)
    assert p[0, 0, 0, 0, 5] == 2 | (0 << 2) | (1 << 4) | (2 << 6)
    assert p[0, 0, 0, 0, 4] == 0b01010101  # all-zero weights are code 1 in every slot


def test_padding_decodes_to_zero():
    t = np.ones((17, 5, 1, 1), np.int8)
    p = pack_ternary(t)
    assert p.shape == (2, 2, 1, 1, 16)
    # output channel 17..31 and input channels 5..7 are padding: code 1 (weight 0)
    assert np.all(p[1, :, 0, 0, 1:] == 0b01010101)
    assert p[0, 1, 0, 0, 0] == 2 | (1 << 2) | (1 << 4) | (1 << 6)


def test_rejects_non_ternary_and_bad_shapes():
    with pytest.raises(ValueError, match="-1, 0"):
        pack_ternary(np.full((2, 4), 2, np.int8))
    with pytest.raises(ValueError, match="does not fit"):
        unpack_ternary(np.zeros((1, 1, 1, 1, 16), np.uint8), shape=(32, 4))
