"""Calibration speed-up: run constant-weight conv2d in numpy (BLAS) instead of untuned TVM loops.

Untuned TVM lowers conv2d to plain loops (~2-4 GFLOP/s here); numpy's im2col + OpenBLAS GEMM
runs the same float32 conv ~10x faster (64->64 3x3 at 56x56: 12 ms vs 116-150 ms). Calibration
only needs the float values, so each conv2d binding is swapped for a ``call_dps_packed`` of a
Python function; every other op stays TVM's, and the binding vars (the statistics keys) are
kept. The functions are registered under a per-call prefix and removed by :meth:`close`.

Example::

    >>> with NumpyConvOffload(imported.module) as offload:  # doctest: +SKIP
    ...     vm = ta.build_relax_vm(offload.module)
"""

from __future__ import annotations

import itertools

import numpy as np

from tvm_ternary import tvm_adapter as ta

__all__ = ["NumpyConvOffload", "numpy_conv2d"]

_COUNTER = itertools.count()


def numpy_conv2d(x: np.ndarray, weight: np.ndarray, *, strides=(1, 1), padding=(0, 0, 0, 0),
                 dilation=(1, 1), groups: int = 1) -> np.ndarray:
    """NCHW x OIHW conv2d in float32; ``padding`` is Relax's (top, left, bottom, right).

    Example::

        >>> numpy_conv2d(np.ones((1, 1, 3, 3), np.float32), np.ones((1, 1, 2, 2), np.float32))
        array([[[[4., 4.],
                 [4., 4.]]]], dtype=float32)
    """
    top, left, bottom, right = padding
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    out_ch, in_per_group, kh, kw = weight.shape
    (sh, sw), (dh, dw) = strides, dilation
    n, channels, hp, wp = x.shape
    ho, wo = (hp - (kh - 1) * dh - 1) // sh + 1, (wp - (kw - 1) * dw - 1) // sw + 1

    def tap(r: int, s: int) -> np.ndarray:  # the input pixels kernel tap (r, s) multiplies
        return x[:, :, r * dh:r * dh + (ho - 1) * sh + 1:sh, s * dw:s * dw + (wo - 1) * sw + 1:sw]

    if groups == 1:
        # im2col as [N, C·R·S, Ho·Wo] so the GEMM writes NCHW directly (no output transpose).
        cols = np.stack([tap(r, s) for r in range(kh) for s in range(kw)], axis=2)
        cols = cols.reshape(n, channels * kh * kw, ho * wo)
        y = np.matmul(weight.reshape(out_ch, -1), cols)
        return y.reshape(n, out_ch, ho, wo)
    if in_per_group == 1 and out_ch == channels:  # depthwise: R·S multiply-adds of planes
        y = np.zeros((n, channels, ho, wo), np.float32)
        for r in range(kh):
            for s in range(kw):
                y += tap(r, s) * weight[None, :, 0, r, s, None, None]
        return y
    per_out = out_ch // groups
    parts = [numpy_conv2d(x[:, g * in_per_group:(g + 1) * in_per_group],
                          weight[g * per_out:(g + 1) * per_out], strides=strides,
                          dilation=dilation)
             for g in range(groups)]
    return np.concatenate(parts, axis=1)


class _ConvFunction:
    """The packed function of one conv2d binding: ``(x, out) -> None`` (destination passing)."""

    def __init__(self, weight: np.ndarray, attrs):
        self.weight = np.ascontiguousarray(weight, np.float32)
        self.strides = tuple(int(v) for v in attrs.strides)
        self.padding = tuple(int(v) for v in attrs.padding)
        self.dilation = tuple(int(v) for v in attrs.dilation)
        self.groups = int(attrs.groups)

    def __call__(self, x, out) -> None:
        y = numpy_conv2d(x.numpy(), self.weight, strides=self.strides, padding=self.padding,
                         dilation=self.dilation, groups=self.groups)
        out.copyfrom(y.astype(np.float32, copy=False))


def _offloadable(call) -> bool:
    attrs = call.attrs
    # Grouped/depthwise convs stay in TVM: measured on MobileNetV2, numpy's per-tap plane
    # arithmetic is memory-bound and slower than TVM's loops there; BLAS wins on dense convs.
    return (ta.call_op_name(call) == "relax.nn.conv2d" and int(attrs.groups) == 1
            and str(attrs.data_layout) == "NCHW" and str(attrs.kernel_layout) == "OIHW"
            and str(attrs.out_layout) == "NCHW"
            and ta.tensor_dtype(call) == "float32" and ta.tensor_dtype(call.args[0]) == "float32")


class NumpyConvOffload:
    """``module``: a copy of ``mod`` with every NCHW/OIHW float32 constant-weight conv2d in numpy."""

    def __init__(self, mod):
        prefix = f"tvm_ternary.calibrate.conv2d.{next(_COUNTER)}"
        self.names: list[str] = []
        replacements = {}
        for i, (var, call) in enumerate(ta.conv_dense_bindings(mod)):
            if not _offloadable(call):
                continue
            name = f"{prefix}.{i}"
            ta.register_packed(name, _ConvFunction(ta.const_numpy(call.args[1]), call.attrs))
            self.names.append(name)
            replacements[ta.var_name(var)] = ta.packed_dps_call(name, [call.args[0]], var)
        self.module = ta.replace_binding_values(mod, replacements)

    def close(self) -> None:
        for name in self.names:
            ta.unregister_packed(name)
        self.names = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
