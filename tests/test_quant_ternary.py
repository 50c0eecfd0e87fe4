"""FGQ ternarization: optimality of the exact threshold, grouping, edge cases."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tvm_ternary.quant import GroupLayout, multiplications_removed, quantize_weights, ternarize

finite = st.floats(-4, 4, allow_nan=False, width=32)


def brute_force_error(group: np.ndarray) -> float:
    """Lowest ||w - a t||^2 over every ternary pattern t, with the best a for each."""
    best = float(np.sum(group.astype(np.float64) ** 2))
    for t in itertools.product((-1, 0, 1), repeat=group.size):
        t = np.array(t, dtype=np.float64)
        nnz = np.sum(t * t)
        if nnz == 0:
            continue
        alpha = max(np.dot(group, t) / nnz, 0.0)
        best = min(best, float(np.sum((group - alpha * t) ** 2)))
    return best


def group_errors(w, tw) -> np.ndarray:
    diff = (w.astype(np.float64) - tw.dequantize()) ** 2
    members, _ = tw.layout.to_groups(diff)
    return members.sum(axis=1)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, (2, 5), elements=finite))
def test_exact_is_optimal_by_brute_force(w):
    tw = ternarize(w, group_size=5, method="exact")
    for row, err in zip(w, group_errors(w, tw)):
        assert err <= brute_force_error(row) + 1e-5 * (1 + float(np.sum(row.astype(np.float64) ** 2)))


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 12), st.integers(1, 3), st.integers(1, 3)),
           elements=finite),
    st.data(),
)
def test_exact_never_worse_than_twn_and_codes_ternary(w, data):
    n = data.draw(st.integers(1, w.shape[1]))
    grouping = data.draw(st.sampled_from(["fgq", "cluster"]))
    exact = ternarize(w, group_size=n, method="exact", grouping=grouping)
    twn = ternarize(w, group_size=n, method="twn", grouping=grouping)
    assert set(np.unique(exact.codes)) <= {-1, 0, 1}
    assert exact.codes.dtype == np.int8 and exact.codes.shape == w.shape
    assert np.all(group_errors(w, exact) <= group_errors(w, twn) + 1e-5)
    assert np.all(exact.scales >= 0) and np.all(np.isfinite(exact.scales))


@pytest.mark.parametrize("grouping,scale_shape", [("fgq", (3, 3, 2, 2)), ("cluster", (3, 3))])
def test_short_last_group(grouping, scale_shape):
    # C = 10, N = 4: groups of 4, 4 and 2 channels.
    w = np.random.default_rng(1).normal(size=(3, 10, 2, 2)).astype(np.float32)
    tw = ternarize(w, group_size=4, grouping=grouping)
    assert tw.scales.shape == scale_shape
    members = tw.layout.members_per_group()
    per_kernel_position = 1 if grouping == "fgq" else 4  # cluster groups span R x S = 2 x 2
    first_row = members[0] if grouping == "cluster" else members[0, :, 0, 0]
    assert first_row.tolist() == [4 * per_kernel_position, 4 * per_kernel_position, 2 * per_kernel_position]
    # The short group is fitted on its own two channels only.
    last = w[0, 8:10, 0, 0] if grouping == "fgq" else w[0, 8:10].ravel()
    alone = ternarize(last.reshape(1, -1), group_size=last.size)
    got = tw.scales[0, 2, 0, 0] if grouping == "fgq" else tw.scales[0, 2]
    assert got == pytest.approx(alone.scales[0, 0], rel=1e-6)


def test_fgq_groups_run_along_input_channels():
    w = np.zeros((1, 8, 1, 1), np.float32)
    w[0, :4, 0, 0] = 1.0  # first group all 1
    w[0, 4:, 0, 0] = [3.0, 0, 0, 0]  # second group one large weight
    tw = ternarize(w, group_size=4)
    np.testing.assert_allclose(tw.scales.ravel(), [1.0, 3.0])
    np.testing.assert_array_equal(tw.codes.ravel(), [1, 1, 1, 1, 1, 0, 0, 0])


def test_all_zero_group_gets_zero_scale():
    w = np.zeros((2, 8), np.float32)
    w[1, :4] = [0.5, -0.5, 0.1, 0]
    for method in ("exact", "twn"):
        tw = ternarize(w, group_size=4, method=method)
        assert np.all(np.isfinite(tw.scales))
        assert tw.scales[0].tolist() == [0.0, 0.0] and tw.scales[1, 1] == 0.0
        assert np.all(tw.codes[0] == 0)


def test_already_ternary_is_lossless():
    rng = np.random.default_rng(2)
    t = rng.integers(-1, 2, size=(8, 16, 3, 3)).astype(np.float32)
    w = (t * 0.0421).astype(np.float16).astype(np.float32)  # a trained-ternary layer in fp16
    for method in ("exact", "twn"):
        tw = ternarize(w, group_size=4, method=method)
        assert tw.already_ternary
        np.testing.assert_array_equal(tw.dequantize(), w)
    assert not ternarize(rng.normal(size=(8, 16)).astype(np.float32), group_size=4).already_ternary


@pytest.mark.parametrize("n", [0, -1, 17])
def test_bad_group_size(n):
    with pytest.raises(ValueError, match="group size"):
        ternarize(np.ones((2, 16), np.float32), group_size=n)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weight(bad):
    w = np.ones((2, 4), np.float32)
    w[1, 2] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        ternarize(w, group_size=2)


def test_bad_method_and_grouping():
    with pytest.raises(ValueError, match="method"):
        ternarize(np.ones((2, 4), np.float32), group_size=2, method="median")
    with pytest.raises(ValueError, match="grouping"):
        ternarize(np.ones((2, 4), np.float32), group_size=2, grouping="rows")


@pytest.mark.parametrize("n,expected", [(1, 0.0), (2, 0.5), (4, 0.75), (8, 0.875), (64, 1 - 1 / 64)])
def test_multiplications_removed_fgq(n, expected):
    layout = GroupLayout(weight_shape=(32, 64, 3, 3), group_size=n, grouping="fgq")
    assert multiplications_removed(layout) == pytest.approx(expected)


def test_multiplications_removed_cluster():
    layout = GroupLayout(weight_shape=(32, 64, 3, 3), group_size=4, grouping="cluster")
    assert multiplications_removed(layout) == pytest.approx(1 - 1 / 36)


@pytest.mark.parametrize("bits,vmax", [(4, 7), (8, 127)])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_multibit_weights(bits, vmax, n):
    w = np.random.default_rng(3).normal(size=(6, 8, 3, 3)).astype(np.float32)
    q = quantize_weights(w, bits=bits, group_size=n)
    assert np.abs(q.codes).max() == vmax
    # Round to nearest: each weight within half a step of its group's scale.
    step = q.layout.broadcast_to_weights(q.scales)
    assert np.all(np.abs(w - q.dequantize()) <= 0.5 * step + 1e-6)


def test_dense_layout_round_trip():
    w = np.arange(5 * 7, dtype=np.float32).reshape(5, 7)
    for grouping in ("fgq", "cluster"):
        layout = GroupLayout(weight_shape=w.shape, group_size=3, grouping=grouping)
        members, mask = layout.to_groups(w)
        assert mask.sum() == w.size
        np.testing.assert_array_equal(layout.from_groups(members), w)
