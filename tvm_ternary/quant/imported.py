"""Weights of an already-quantized model, taken as they are (numpy only).

A quantized ONNX model stores a conv/dense weight as integers behind a DequantizeLinear
(``w = s_k * v``, one scale per output channel or per tensor) or, for opset-21 blocked scales
and float weights, as float32 values. :func:`import_weights` finds the cheapest exact kernel
format for them:

* **ternary per group**: within every group of N input channels (at one kernel position) the
  non-zero magnitudes are equal, ``w = s_k * q_g * t``: the ternary kernels at that N (the
  largest N that holds, tried over C and the powers of two down to 2);
* **4-bit** when every ``|v| <= 7``, **7-bit** when every ``|v| <= 63`` (a model quantized
  with ONNX Runtime's ``reduce_range``: exact on ``vpmaddubsw`` without VNNI), else **8-bit**.

With the per-channel scale known the result is exact: ``IntegerWeights.dequantize()`` gives
back the float32 weight bit for bit. Without it (blocked scales, float weights) the group
magnitudes are mapped to integer codes by :func:`to_integer_scales` (exact when their ratios
are small integers) and the result says how close it is.

Example::

    >>> import numpy as np
    >>> t = np.sign(np.random.default_rng(0).normal(size=(4, 8, 3, 3))).astype(np.float32)
    >>> q = np.repeat(np.array([3, 5], np.float32), 4)[None, :, None, None]  # q_g, N = 4
    >>> s = np.float32(0.01) * np.arange(1, 5, dtype=np.float32)
    >>> w = (t * q).astype(np.float32) * s[:, None, None, None]
    >>> found = import_weights(w, channel_scales=s)
    >>> found.weights.bits, found.weights.group_size, found.exact, found.description
    (2, 4, True, 'ternary N=4, exact')
    >>> bool(np.array_equal(found.weights.dequantize(), w))
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats import WEIGHT_BITS, per_channel, value_max
from .groups import GroupLayout
from .intscales import IntegerWeights, to_integer_scales
from .ternary import QuantizedWeights, quantize_weights, relative_error

MIN_TERNARY_GROUP = 2  # groups of one weight are trivially "ternary" and say nothing


@dataclass(frozen=True, eq=False)
class ImportedWeights:
    weights: IntegerWeights
    exact: bool  # dequantize() reproduces the model's float weight exactly
    description: str  # what was found, for the coverage report
    error: float  # ||W - W_hat|| / ||W||


def _group_candidates(channels: int) -> list[int]:
    sizes = {channels} | {2**p for p in range(1, 8) if 2**p < channels}
    return sorted((n for n in sizes if n >= MIN_TERNARY_GROUP), reverse=True)


def _ternary_groups(values: np.ndarray) -> tuple[int, np.ndarray, np.ndarray] | None:
    """(N, magnitudes per group, members mask layout) for the largest N at which ``values``
    (float or integer) has one non-zero magnitude per group; None if no N >= 2 does."""
    for n in _group_candidates(values.shape[1]):
        layout = GroupLayout(weight_shape=tuple(values.shape), group_size=n, grouping="fgq")
        members, mask = layout.to_groups(values)
        mag = np.where(mask, np.abs(members), 0)
        top = mag.max(axis=1)
        low = np.where(mag > 0, mag, np.inf).min(axis=1)
        if np.all((top == 0) | (low == top)):
            return n, top.reshape(layout.scale_shape), layout
    return None


def import_weights(weight: np.ndarray, *, channel_scales: np.ndarray | None = None,
                   code_bits: int = 7) -> ImportedWeights:
    """Kernel form of a quantized model's weight ``[K, C, R, S]`` / ``[K, C]`` (float32).

    ``channel_scales`` ``[K]``: the DequantizeLinear scale per output channel, when the model
    has one; the weight is then ``s_k`` times integers and the import is exact.
    """
    w = np.asarray(weight, np.float32)
    k = w.shape[0]
    shape = (-1,) + (1,) * (w.ndim - 1)
    if channel_scales is not None:
        s = np.broadcast_to(np.asarray(channel_scales, np.float32).reshape(-1), (k,)).copy()
        v = np.rint(w.astype(np.float64) / np.where(s > 0, s, 1).reshape(shape))
        on_grid = np.array_equal((v.astype(np.float32) * s.reshape(shape)).astype(np.float32), w)
        if on_grid and np.abs(v).max(initial=0) <= 127:
            return _exact_integer(w, v.astype(np.int32), s, code_bits)
    found = _ternary_groups(w)
    if found is not None:
        n, alpha, layout = found
        codes = np.sign(w).astype(np.int8)
        qw = QuantizedWeights(codes=codes, scales=alpha.astype(np.float32), layout=layout, bits=2,
                              method="exact", already_ternary=True)
        iw = to_integer_scales(qw, code_bits=code_bits)
        err = relative_error(w, iw.dequantize())
        exact = bool(np.array_equal(iw.dequantize(), w))
        how = "exact" if exact else f"group scales as {code_bits}-bit codes, weight error {err:.2g}"
        return ImportedWeights(iw, exact, f"ternary N={n}, {how}", err)
    # Off any integer grid we can name: the best per-channel 8-bit form (reported as such).
    qw = quantize_weights(w, bits=8, group_size=w.shape[1])
    iw = to_integer_scales(qw, code_bits=code_bits)
    err = relative_error(w, iw.dequantize())
    return ImportedWeights(iw, False, f"int8 re-quantized per channel, weight error {err:.2g}", err)


def _exact_integer(w: np.ndarray, v: np.ndarray, s: np.ndarray, code_bits: int) -> ImportedWeights:
    found = _ternary_groups(v)
    if found is not None and np.abs(v).max(initial=0) > 0:
        n, q, layout = found
        iw = IntegerWeights(values=np.sign(v).astype(np.int8), group_codes=q.astype(np.uint8),
                            channel_scales=s, layout=layout, bits=2, code_bits=code_bits,
                            lossless=True)
        desc = f"ternary N={n}, exact"
    else:
        vabs = np.abs(v).max(initial=0)
        bits = next(b for b in WEIGHT_BITS if b != 2 and vabs <= value_max(b))
        c = w.shape[1]
        layout = GroupLayout(weight_shape=tuple(w.shape), group_size=c,
                             grouping="cluster" if per_channel(bits) else "fgq")
        iw = IntegerWeights(values=v.astype(np.int8),
                            group_codes=np.ones(layout.scale_shape, np.uint8), channel_scales=s,
                            layout=layout, bits=bits, code_bits=code_bits, lossless=True)
        desc = f"int{bits} per channel, exact"
    exact = bool(np.array_equal(iw.dequantize(), w))
    return ImportedWeights(iw, exact, desc if exact else desc.replace("exact", "inexact"),
                           relative_error(w, iw.dequantize()))
