"""Activation quantizers: 8- and 4-bit, unsigned (after ReLU) or signed.

Calibrated formats have zero point 0; an imported quantized model (QDQ ONNX) may carry an
integer zero point (ONNX Runtime's asymmetric u8): ``x ~ scale * (q - zero_point)``.

Scales come from calibration statistics:

* ``dfp``: dynamic fixed point (Mellempudi et al., *Mixed Low-precision Inference*): a
  power-of-two scale ``2^-f`` with the largest f for which the calibrated max |x| still fits.
* ``minmax``: ``max|x| / qmax``.
* ``percentile``: like minmax on the given percentile of |x| (clips outliers; 4-bit needs it).
* ``mse``: the clipping value on a grid that minimises the quantization error of the samples.

Example::

    >>> import numpy as np
    >>> from tvm_ternary.quant import calibrate_activation, quantize_activation
    >>> x = np.abs(np.random.default_rng(0).normal(size=1000)).astype(np.float32)
    >>> q = calibrate_activation(x, bits=8, signed=False, method="dfp")
    >>> float(np.log2(q.scale)).is_integer(), quantize_activation(x, q).dtype
    (True, dtype('uint8'))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CALIBRATION_METHODS = ("dfp", "minmax", "percentile", "mse")
MSE_GRID = 100  # candidate clipping values between 1% and 100% of max |x|


@dataclass(frozen=True)
class ActivationQuant:
    """Per-tensor activation format: ``x ~ scale * (q - zero_point)``, q in [qmin, qmax]."""

    bits: int
    signed: bool
    scale: float
    zero_point: int = 0  # non-zero only for formats read from a quantized model

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"activation bits must be 4 or 8, got {self.bits}")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"activation scale must be a positive finite number, got {self.scale}")
        if not self.qmin <= self.zero_point <= self.qmax:
            raise ValueError(f"zero point {self.zero_point} is outside [{self.qmin}, {self.qmax}]")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def dtype(self) -> np.dtype:
        """Storage container (int4 values live in int8/uint8)."""
        return np.dtype(np.int8 if self.signed else np.uint8)


def quantize_activation(x: np.ndarray, quant: ActivationQuant) -> np.ndarray:
    """Round half to even, add the zero point, saturate, store in the int8/uint8 container."""
    q = np.array(x, dtype=np.float64)  # a copy: the in-place steps below never touch x
    q /= quant.scale
    np.rint(q, out=q)
    q += quant.zero_point
    return np.clip(q, quant.qmin, quant.qmax, out=q).astype(quant.dtype)


def dequantize_activation(q: np.ndarray, quant: ActivationQuant) -> np.ndarray:
    """``f32(q - zero_point) * f32(scale)`` (exact integer difference, one float rounding)."""
    values = np.asarray(q, dtype=np.int32) - np.int32(quant.zero_point)
    return (values.astype(np.float32) * np.float32(quant.scale)).astype(np.float32)


def _fake_quant_error(mag: np.ndarray, clip: float, levels: int) -> float:
    step = clip / levels
    q = np.minimum(np.rint(mag / step), levels) * step
    return float(np.mean((mag - q) ** 2))


def calibrate_activation(
    samples: np.ndarray,
    *,
    bits: int,
    signed: bool,
    method: str = "minmax",
    percentile: float = 99.99,
) -> ActivationQuant:
    """Pick a per-tensor scale from calibration ``samples`` (any shape, float)."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    x = np.asarray(samples, dtype=np.float64).ravel()
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError("calibration samples must be non-empty and finite")
    mag = np.abs(x) if signed else np.maximum(x, 0.0)
    qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    top = float(mag.max())
    if top == 0.0:
        return ActivationQuant(bits=bits, signed=signed, scale=1.0)
    if method == "dfp":
        frac_bits = np.floor(np.log2(qmax / top))  # a power of two: float32-exact
        return ActivationQuant(bits=bits, signed=signed, scale=float(2.0 ** (-frac_bits)))
    if method == "percentile":
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        clip = float(np.percentile(mag, percentile)) or top
    elif method == "mse":
        grid = np.linspace(top / MSE_GRID, top, MSE_GRID)
        clip = float(grid[np.argmin([_fake_quant_error(mag, c, qmax) for c in grid])])
    else:
        clip = top
    # float32-representable: an ONNX scale is float32, so an exported model (compile
    # --emit-onnx) carries exactly this scale and re-imports to the same library
    return ActivationQuant(bits=bits, signed=signed, scale=float(np.float32(clip / qmax)))
