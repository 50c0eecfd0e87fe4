"""Data-aware quantization: lower output error than the exact threshold, consistent statistics."""

import numpy as np
import pytest

from tvm_ternary.quant import quantize_weights, ternarize
from tvm_ternary.quant.data_aware import LayerStatistics, fit_layer


def make_layer(seed, k=16, c=24, r=3, p=3000):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(k, c, r, r)).astype(np.float32)
    d = c * r * r
    x = np.maximum(rng.normal(size=(p, d)) @ rng.normal(size=(d, d)) * 0.1 + 0.3, 0)  # ReLU-like, correlated
    y = x @ w.reshape(k, -1).T + rng.normal(size=k)
    stats = LayerStatistics.empty(in_features=d, out_features=k)
    for chunk in np.array_split(np.arange(p), 3):  # accumulate in batches like calibration does
        stats.accumulate(x[chunk], y[chunk])
    return w, x, y, stats


def direct_error(x, y, w2, b):
    return float(np.sum((y - x @ w2.T - b) ** 2) / np.sum(y**2))


def test_output_error_matches_direct_computation():
    w, x, y, stats = make_layer(0)
    w_hat = ternarize(w, group_size=4).dequantize().reshape(w.shape[0], -1)
    b = np.full(w.shape[0], 0.3)
    assert stats.output_error(w_hat, b) == pytest.approx(direct_error(x, y, w_hat, b), rel=1e-9)


@pytest.mark.parametrize("grouping", ["fgq", "cluster"])
@pytest.mark.parametrize("n", [2, 4, 8, 24])
def test_beats_exact_threshold_on_output_error(n, grouping):
    w, x, y, stats = make_layer(n)
    exact = ternarize(w, group_size=n, grouping=grouping).dequantize().reshape(w.shape[0], -1)
    # Give the exact threshold its best bias too, so only the weights differ.
    b_exact = (y - x @ exact.T).mean(axis=0)
    fit = fit_layer(w, stats=stats, group_size=n, grouping=grouping)
    plain = fit_layer(w, stats=stats, group_size=n, grouping=grouping, compensate=False)
    assert set(np.unique(fit.weights.codes)) <= {-1, 0, 1}
    assert np.all(fit.weights.scales >= 0)
    assert fit.output_error == pytest.approx(
        direct_error(x, y, fit.weights.dequantize().reshape(w.shape[0], -1), fit.bias), rel=1e-4)
    assert plain.output_error < stats.output_error(exact, b_exact)  # the refit alone
    assert fit.output_error <= plain.output_error * 1.0001  # error feedback adds to it


@pytest.mark.parametrize("bits", [4, 8])
def test_multibit_beats_minmax(bits):
    w, x, y, stats = make_layer(7)
    mm = quantize_weights(w, bits=bits, group_size=4).dequantize().reshape(w.shape[0], -1)
    b_mm = (y - x @ mm.T).mean(axis=0)
    fit = fit_layer(w, stats=stats, group_size=4, bits=bits)
    assert np.abs(fit.weights.codes).max() <= 2 ** (bits - 1) - 1
    assert fit.output_error < stats.output_error(mm, b_mm)


def test_bias_correction_matches_mean_output():
    w, x, y, stats = make_layer(3)
    fit = fit_layer(w, stats=stats, group_size=4)
    pred = x @ fit.weights.dequantize().reshape(w.shape[0], -1).T + fit.bias
    np.testing.assert_allclose(pred.mean(axis=0), y.mean(axis=0), rtol=1e-4, atol=1e-4)


def test_dense_layer_and_shape_checks():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(10, 12)).astype(np.float32)
    x = rng.normal(size=(500, 12))
    stats = LayerStatistics.empty(in_features=12, out_features=10)
    stats.accumulate(x, x @ w.T)
    assert fit_layer(w, stats=stats, group_size=3).weights.codes.shape == (10, 12)
    with pytest.raises(ValueError, match="statistics"):
        fit_layer(rng.normal(size=(10, 8)).astype(np.float32), stats=stats, group_size=2)
    with pytest.raises(ValueError, match="no calibration samples"):
        fit_layer(w, stats=LayerStatistics.empty(in_features=12, out_features=10), group_size=3)
