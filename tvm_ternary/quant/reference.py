"""numpy reference semantics of every quantized op the compiler emits.

The kernels must match these bit for bit on integer paths. Layout here is NCHW / [N, C]
(the kernels' tests transpose). Integer convolutions run as float64 matrix products: every
product is at most 127 * 255 < 2^15 and a reduction has far fewer than 2^37 terms, so each
partial sum is an integer below 2^53 and float64 represents it exactly; this is exact integer
arithmetic at BLAS speed.

Requantize (see docs/ARCHITECTURE.md), in float32::

    y = clip(rint(f32(acc) * S[k]) + z, lo, hi)                          (no residual)
    y = clip(rint(f32(acc) * S[k]) + rint(f32(res - z_r) * S_r[k]) + z, lo, hi)  (residual)

with ``S = f32(M * 2^-shift)`` and ``S_r = f32(R * 2^-shift)`` (:func:`requantize_scale`).
``rint`` rounds half to even; ReLU raises ``lo`` to ``z``. The multiply is one float32 product,
as ONNX Runtime's and OpenVINO's int8 kernels requantize: 16 lanes per AVX-512 register where an
int64 product has 8, and a few instructions instead of a widening multiply and a rounding shift.
``f32(M * 2^-shift)`` is the float64 value (exact) rounded once to float32; ``f32(acc)`` is exact
below 2^24 and rounded to nearest above. A residual's term is rounded on its own: a sum of the
two products rounded once would let LLVM contract it into an FMA (one rounding fewer), which
the kernels and numpy could then disagree on; each term rounded, both sides compute the same
integers, at most one unit from the exact rational.

Example::

    >>> import numpy as np
    >>> m, s = quantize_multiplier(np.array([0.5]))
    >>> requantize(np.array([[3, 5, -3]], dtype=np.int32).T, multiplier=m, shift=s).ravel().tolist()
    [2, 2, 0]
"""

from __future__ import annotations

import numpy as np

EXACT_FLOAT64_LIMIT = 2**53


def _pair(v, name: str) -> tuple[int, int]:
    t = (v, v) if np.isscalar(v) else tuple(v)
    if len(t) != 2 or any(int(i) != i for i in t):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return int(t[0]), int(t[1])


def _pads(padding) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) from an int, (h, w) or (top, left, bottom, right)."""
    p = (padding,) * 4 if np.isscalar(padding) else tuple(padding)
    if len(p) == 2:
        p = (p[0], p[1], p[0], p[1])
    if len(p) != 4 or min(p) < 0:
        raise ValueError(f"padding must be >= 0 and have 1, 2 or 4 entries, got {padding!r}")
    return tuple(int(i) for i in p)


def conv2d_output_shape(in_hw, kernel_hw, *, stride=1, padding=0, dilation=1) -> tuple[int, int]:
    (sh, sw), (dh, dw) = _pair(stride, "stride"), _pair(dilation, "dilation")
    top, left, bottom, right = _pads(padding)
    h = (in_hw[0] + top + bottom - dh * (kernel_hw[0] - 1) - 1) // sh + 1
    w = (in_hw[1] + left + right - dw * (kernel_hw[1] - 1) - 1) // sw + 1
    return h, w


def _padded(x, pads, pad_value, dtype) -> np.ndarray:
    """``x`` [N, C, H, W] in ``dtype`` with ``pads`` (top, left, bottom, right) of ``pad_value``."""
    n, c, h, wd = x.shape
    top, left, bottom, right = pads
    xp = np.full((n, c, h + top + bottom, wd + left + right), pad_value, dtype=dtype)
    xp[:, :, top : top + h, left : left + wd] = x
    return xp


def im2col(x, *, kernel_hw, stride=1, padding=0, dilation=1, pad_value=0, dtype=np.float64):
    """Patches ``[N, C, R, S, OH, OW]`` of ``x`` [N, C, H, W] (padded with ``pad_value``)."""
    n, c, h, wd = x.shape
    r, s = kernel_hw
    (sh, sw), (dh, dw) = _pair(stride, "stride"), _pair(dilation, "dilation")
    top, left, bottom, right = _pads(padding)
    oh, ow = conv2d_output_shape((h, wd), (r, s), stride=stride, padding=padding, dilation=dilation)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"kernel {r}x{s} does not fit input {h}x{wd} with this padding")
    if (r, s, sh, sw, top, left, bottom, right) == (1, 1, 1, 1, 0, 0, 0, 0):
        return np.asarray(x, dtype=dtype).reshape(n, c, 1, 1, h, wd)  # a 1x1 conv's patches are x
    xp = _padded(x, (top, left, bottom, right), pad_value, dtype)
    cols = np.empty((n, c, r, s, oh, ow), dtype=dtype)
    for i in range(r):
        for j in range(s):
            cols[:, :, i, j] = xp[:, :, i * dh : i * dh + sh * (oh - 1) + 1 : sh,
                                  j * dw : j * dw + sw * (ow - 1) + 1 : sw]
    return cols


def grouped_conv(cols: np.ndarray, w: np.ndarray, groups: int) -> np.ndarray:
    """Contract patches ``[N, C, R, S, OH, OW]`` with ``w`` [K, C/groups, R, S] -> [N, K, OH, OW]."""
    n, c, r, s, oh, ow = cols.shape
    k, cg = w.shape[:2]
    if c != cg * groups or k % groups:
        raise ValueError(f"channels do not fit groups={groups}: input has {c}, weight {w.shape}")
    kg = k // groups
    if groups > 1:
        # One batched matmul over the groups: a Python loop over MobileNet's 960 depthwise
        # groups made the numpy simulation ~5x slower. Same products and sums per output.
        xg = cols.reshape(n, groups, cg * r * s, oh * ow)
        wg = w.reshape(groups, kg, cg * r * s).astype(cols.dtype)
        return np.matmul(wg[None], xg).reshape(n, k, oh, ow)
    out = np.empty((n, k, oh * ow), dtype=cols.dtype)
    for g in range(groups):
        xg = cols[:, g * cg : (g + 1) * cg].reshape(n, cg * r * s, oh * ow)
        wg = w[g * kg : (g + 1) * kg].reshape(kg, cg * r * s).astype(cols.dtype)
        out[:, g * kg : (g + 1) * kg] = np.matmul(wg[None], xg)
    return out.reshape(n, k, oh, ow)


# Integer sums run as BLAS float matmuls. float32 holds every integer below 2^24 exactly, so a
# dot product whose sum of |x| * |w| terms stays below it is exact in any summation order (each
# partial sum is such an integer); otherwise float64 (exact below 2^53, beyond any int32 sum).
FLOAT32_EXACT = 2**24


def _exact_dtype(x: np.ndarray, w: np.ndarray, pad_value=0) -> type:
    """float32 when ``max|x| * max_k sum|w_k|`` is below FLOAT32_EXACT, else float64."""
    w_abs = np.abs(np.asarray(w, dtype=np.int64)).reshape(w.shape[0], -1).sum(axis=1).max(initial=0)
    x = np.asarray(x)
    x_abs = max(abs(int(x.max())), abs(int(x.min())), abs(int(pad_value))) if x.size else abs(int(pad_value))
    return np.float32 if x_abs * int(w_abs) < FLOAT32_EXACT else np.float64


def conv2d_int(x, w, *, stride=1, padding=0, dilation=1, groups=1, pad_value=0) -> np.ndarray:
    """Integer conv2d: ``x`` [N, C, H, W], ``w`` [K, C/groups, R, S] -> int32 [N, K, OH, OW]."""
    x = np.asarray(x)
    w = np.asarray(w)
    dtype = _exact_dtype(x, w, pad_value)
    if groups > 1 and w.shape[1] == 1 and w.shape[0] == groups == x.shape[1]:
        return _to_int32(_depthwise(x, w, stride=stride, padding=padding, dilation=dilation,
                                    pad_value=pad_value, dtype=dtype))
    cols = im2col(x, kernel_hw=w.shape[2:], stride=stride, padding=padding, dilation=dilation,
                  pad_value=pad_value, dtype=dtype)
    return _to_int32(grouped_conv(cols, w, groups))


def _depthwise(x, w, *, stride, padding, dilation, pad_value, dtype) -> np.ndarray:
    """A depthwise conv as R*S shifted multiply-adds (the same integer sums as im2col + a
    matmul per channel, without the R*S-fold patch copy: MobileNet's depthwise layers made
    im2col the numpy simulation's largest cost)."""
    n, c, h, wd = x.shape
    r, s = w.shape[2:]
    (sh, sw), (dh, dw) = _pair(stride, "stride"), _pair(dilation, "dilation")
    top, left, bottom, right = _pads(padding)
    oh, ow = conv2d_output_shape((h, wd), (r, s), stride=stride, padding=padding, dilation=dilation)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"kernel {r}x{s} does not fit input {h}x{wd} with this padding")
    xp = _padded(x, (top, left, bottom, right), pad_value, dtype)
    taps = w.astype(dtype).reshape(c, r, s)
    acc = np.zeros((n, c, oh, ow), dtype=dtype)
    for i in range(r):
        for j in range(s):
            view = xp[:, :, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw]
            acc += view * taps[:, i, j][None, :, None, None]
    return acc


def dense_int(x, w) -> np.ndarray:
    """Integer dense: ``x`` [N, C], ``w`` [K, C] -> int32 [N, K]."""
    dtype = _exact_dtype(x, w)
    x = np.asarray(x, dtype=dtype)
    w = np.asarray(w, dtype=dtype)
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"dense shapes do not fit: x {x.shape}, w {w.shape}")
    return _to_int32(x @ w.T)


def _to_int32(acc: np.ndarray) -> np.ndarray:
    if np.abs(acc).max(initial=0) >= 2**31:
        raise OverflowError("int32 accumulator overflow in the reference convolution")
    return acc.astype(np.int32)


def decode_weights(values, group_codes, *, group_size: int) -> np.ndarray:
    """int8 weight ``q[k, c // N, r, s] * v[k, c, r, s]`` from kernel-form group codes
    ``[K, G, R, S]`` (dense: values [K, C] and codes [K, G, 1, 1] or [K, G])."""
    v = np.asarray(values).astype(np.int32)
    q = np.asarray(group_codes).astype(np.int32)
    q = q.reshape(q.shape[0], q.shape[1], *(v.shape[2:] if v.ndim == 4 else ()))
    q_per_weight = np.repeat(q, group_size, axis=1)[:, : v.shape[1]]
    out = q_per_weight * v
    if np.abs(out).max(initial=0) > 127:
        raise ValueError("decoded weight exceeds the int8 range: group code too large for the values")
    return out.astype(np.int8)


def integer_bias(bias, *, input_scale: float, channel_scales) -> np.ndarray:
    """Float bias in the accumulator's units, ``round(bias / (s_x * s_k))`` (half to even)."""
    denom = np.float64(input_scale) * np.asarray(channel_scales, dtype=np.float64)
    safe = np.where(denom > 0, denom, 1.0)
    return np.where(denom > 0, np.rint(np.asarray(bias, np.float64) / safe), 0).astype(np.int32)


def quantize_multiplier(real) -> tuple[np.ndarray, np.ndarray]:
    """``real ~ multiplier * 2^-shift`` with multiplier in [2^30, 2^31) (0 maps to (0, 31))."""
    r = np.asarray(real, dtype=np.float64)
    if np.any(r < 0) or np.any(r >= 2**31) or not np.all(np.isfinite(r)):
        raise ValueError("requantize scales must be finite and in [0, 2^31)")
    mant, exp = np.frexp(r)  # r = mant * 2^exp, mant in [0.5, 1)
    mult = np.rint(mant * 2.0**31).astype(np.int64)
    carry = mult == 2**31
    mult = np.where(carry, mult // 2, mult)
    exp = np.where(carry, exp + 1, exp)
    shift = 31 - exp
    zero = r == 0
    return np.where(zero, 0, mult).astype(np.int32), np.where(zero, 31, shift).astype(np.int32)


def activation_range(*, bits: int, signed: bool, relu: bool = False) -> tuple[int, int]:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return (max(lo, 0) if relu else lo), hi


def requantize_scale(multiplier, shift) -> np.ndarray:
    """float32 ``M * 2^-shift``: the exact float64 value rounded once. Made at compile time, it
    is the kernels' ``requant_scale`` argument (``passes.kernel_args``)."""
    m = np.asarray(multiplier, dtype=np.float64)
    return (m / np.exp2(np.asarray(shift, dtype=np.float64))).astype(np.float32)


def _per_channel_float(arr, ndim: int, axis: int) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float32)
    if a.ndim == 0:
        return a
    shape = [1] * ndim
    shape[axis] = a.size
    return a.reshape(shape)


def requantize(
    acc,
    *,
    multiplier,
    shift,
    residual=None,
    residual_multiplier=None,
    relu: bool = False,
    bits: int = 8,
    signed: bool = False,
    channel_axis: int = 1,
    zero_point: int = 0,
    residual_zero_point: int = 0,
) -> np.ndarray:
    """int32 accumulator (bias already added) -> int8/uint8 container holding ``bits``-bit values.

    ``multiplier``/``shift`` are per channel (or scalars) along ``channel_axis``; a residual
    (same shape as ``acc``, integer) adds its own rounded term with ``residual_multiplier`` and
    the same shift (module docstring).
    Zero points (imported models): the residual enters as ``residual - residual_zero_point``;
    ``zero_point`` is added after rounding, and a ReLU clips at it (the real zero).
    """
    a = np.asarray(acc)
    ndim = a.ndim
    res = None
    if residual is not None:
        if residual_multiplier is None:
            raise ValueError("a residual needs residual_multiplier")
        res = np.asarray(residual, dtype=np.int64) - residual_zero_point
        if res.shape != a.shape:
            raise ValueError(f"residual shape {res.shape} does not match output {a.shape}")
    sh = np.asarray(shift, dtype=np.int64)
    if np.any(sh < 1) or np.any(sh > 62):
        raise ValueError("requantize shift must be in [1, 62]")
    lo, hi = activation_range(bits=bits, signed=signed)
    if relu:
        lo = max(lo, zero_point)
    y = a.astype(np.float32) * _per_channel_float(requantize_scale(multiplier, sh), ndim, channel_axis)
    np.rint(y, out=y)
    if res is not None:
        t = res.astype(np.float32) * _per_channel_float(requantize_scale(residual_multiplier, sh), ndim,
                                                        channel_axis)
        y += np.rint(t, out=t)
    y += np.float32(zero_point)
    return np.clip(y, lo, hi, out=y).astype(np.int8 if signed else np.uint8)


def dequantize(acc, *, scale, bias=None, relu: bool = False, channel_axis: int = 1) -> np.ndarray:
    """float32 output ``acc * scale[k] (+ bias[k])``: the float exit of a quantized region.
    Float arithmetic: compare with a tolerance of a few ulp (FMA contraction may differ)."""
    a = np.asarray(acc, dtype=np.float32)
    shape = [1] * a.ndim
    shape[channel_axis] = -1
    y = a * np.asarray(scale, dtype=np.float32).reshape(shape)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float32).reshape(shape)
    if relu:
        y = np.maximum(y, 0)
    return y.astype(np.float32)


def layer_macs(*, weight_shape, out_hw=(1, 1)) -> int:
    """Multiply-accumulates of a conv/dense layer per image: weights ([K, C/groups, R, S],
    so grouping is already counted) times output pixels."""
    return int(np.prod(weight_shape)) * int(out_hw[0]) * int(out_hw[1])
