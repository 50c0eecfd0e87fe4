"""Activation quantizers: ranges, dynamic fixed point, clipping calibrations."""

import numpy as np
import pytest

from tvm_ternary.quant import ActivationQuant, calibrate_activation, dequantize_activation, quantize_activation


@pytest.mark.parametrize("bits,signed,qmin,qmax", [(8, False, 0, 255), (8, True, -128, 127), (4, False, 0, 15), (4, True, -8, 7)])
def test_ranges_and_containers(bits, signed, qmin, qmax):
    q = ActivationQuant(bits=bits, signed=signed, scale=0.25)  # binary-exact halves below
    assert (q.qmin, q.qmax) == (qmin, qmax)
    x = np.array([-1e9, 1e9, 0.125, 0.375, -0.125], np.float32)
    got = quantize_activation(x, q)
    assert got.dtype == (np.int8 if signed else np.uint8)
    assert got[:2].tolist() == [qmin, qmax]
    assert got[2] == 0 and got[3] == 2  # 0.5 -> 0 and 1.5 -> 2: half to even


@pytest.mark.parametrize("bits,signed", [(8, False), (8, True), (4, False), (4, True)])
@pytest.mark.parametrize("top", [0.013, 1.0, 6.2, 250.0])
def test_dynamic_fixed_point_is_power_of_two_and_fits(bits, signed, top):
    x = np.linspace(-top if signed else 0, top, 101)
    q = calibrate_activation(x, bits=bits, signed=signed, method="dfp")
    assert np.log2(q.scale) == np.round(np.log2(q.scale))
    assert top / q.scale <= q.qmax < 2 * top / q.scale  # fits, and one more bit would not


def test_minmax_percentile_mse_order():
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(size=100_000))
    x[0] = 100.0  # one outlier
    mm = calibrate_activation(x, bits=4, signed=False, method="minmax")
    pc = calibrate_activation(x, bits=4, signed=False, method="percentile", percentile=99.9)
    mse = calibrate_activation(x, bits=4, signed=False, method="mse")
    assert mm.scale == pytest.approx(100.0 / 15)
    assert pc.scale < mm.scale / 10 and mse.scale < mm.scale / 10

    def err(q):
        return np.mean((x - dequantize_activation(quantize_activation(x, q), q)) ** 2)

    assert err(mse) < err(mm) and err(pc) < err(mm)


def test_bad_inputs():
    with pytest.raises(ValueError, match="bits"):
        ActivationQuant(bits=3, signed=False, scale=1.0)
    with pytest.raises(ValueError, match="scale"):
        ActivationQuant(bits=8, signed=False, scale=0.0)
    with pytest.raises(ValueError, match="finite"):
        calibrate_activation(np.array([np.nan]), bits=8, signed=False)
    with pytest.raises(ValueError, match="method"):
        calibrate_activation(np.ones(3), bits=8, signed=False, method="kl")
