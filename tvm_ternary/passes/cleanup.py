"""Inference clean-up passes on the imported Relax module: drop Dropout, fold BatchNorm into conv.

Modelled on TVM's ``FoldBatchnormToConv2D`` (pattern built once, ``rewrite_call``, bail out by
returning the match unchanged), with two differences that real exports need:

* the conv may carry a bias (ONNX ``Conv`` with a ``B`` input imports as ``conv2d`` + ``add``),
  which TVM's pattern does not match;
* the folded weight and bias are computed here in numpy, so the result is plain constants and
  needs no ``FoldConstant`` round (which compiles every folded op: seconds per model).

Example::

    >>> mod = RemoveDropout()(mod)          # doctest: +SKIP
    >>> mod = FoldBatchNormIntoConv()(mod)  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.dpl import TupleGetItemPattern, is_const, is_op, rewrite_call, wildcard
from tvm.relax.transform import function_pass

from tvm_ternary import tvm_adapter as ta

__all__ = ["RemoveDropout", "FoldBatchNormIntoConv"]


def _skip(func) -> bool:
    """Primitive (already lowered/fused) functions are not ours to rewrite."""
    return not isinstance(func, relax.Function) or (
        func.attrs is not None and "Primitive" in func.attrs.keys()
        and int(func.attrs["Primitive"]) != 0)


@function_pass(opt_level=0, name="tvm_ternary.RemoveDropout")
class RemoveDropout:
    """``dropout(x)[0]`` -> ``x``: inference-mode Dropout is the identity.

    The mask output (``[1]``) is left for ``DeadCodeElimination``; a model that returns the mask
    keeps its dropout call.
    """

    def __init__(self):
        self.data = wildcard()
        self.pattern = TupleGetItemPattern(is_op("relax.nn.dropout")(self.data), 0)

    def transform_function(self, func, mod, ctx):
        if _skip(func):
            return func
        return rewrite_call(self.pattern, lambda expr, m: m[self.data], func)


@function_pass(opt_level=0, name="tvm_ternary.FoldBatchNormIntoConv")
class FoldBatchNormIntoConv:
    """``batch_norm(conv2d(x, W) [+ b])[0]`` -> ``conv2d(x, W·s) + (b − mean)·s + beta``.

    ``s = gamma / sqrt(var + eps)`` per output channel. Only NCHW data, OIHW kernels, a
    channel-axis (1) batch norm in inference mode and constant parameters are folded; anything
    else is left for ``DecomposeOpsForInference``.
    """

    def __init__(self):
        self.data = wildcard()
        self.weight = is_const()
        self.conv = is_op("relax.nn.conv2d")(self.data, self.weight)
        self.bias = is_const()
        self.conv_bias = is_op("relax.add")(self.conv, self.bias)
        self.params = [is_const() for _ in range(4)]  # gamma, beta, mean, var
        self.bn = is_op("relax.nn.batch_norm")(self.conv | self.conv_bias, *self.params)
        self.pattern = TupleGetItemPattern(self.bn, 0)

    def transform_function(self, func, mod, ctx):
        if _skip(func):
            return func
        return rewrite_call(self.pattern, self._rewrite, func)

    def _rewrite(self, expr, matches):
        conv, bn = matches[self.conv], matches[self.bn]
        if (bn.attrs.axis != 1 or bool(bn.attrs.training)
                or str(conv.attrs.data_layout) != "NCHW"
                or str(conv.attrs.kernel_layout) != "OIHW"
                or str(conv.attrs.out_layout) != "NCHW"):
            return expr
        weight = ta.const_numpy(matches[self.weight])
        gamma, beta, mean, var = (ta.const_numpy(matches[p]).astype(np.float64)
                                  for p in self.params)
        out_channels = weight.shape[0]
        if any(a.shape != (out_channels,) for a in (gamma, beta, mean, var)):
            return expr
        bias = np.zeros(out_channels)
        if self.bias in matches:
            raw = ta.const_numpy(matches[self.bias])
            # A per-channel conv bias broadcasts as [1, K, 1, 1] or [K, 1, 1]; anything else
            # (a scalar, a per-pixel tensor) is not a bias we can fold.
            if raw.size != out_channels or raw.ndim < 3 or raw.shape[-3] != out_channels:
                return expr
            bias = raw.reshape(-1).astype(np.float64)
        # float64 for the fold: it is done once, and keeps the folded weight within one float32
        # rounding of the exact value.
        scale = gamma / np.sqrt(var + float(bn.attrs.epsilon))
        new_weight = (weight.astype(np.float64) * scale[:, None, None, None]).astype(weight.dtype)
        new_bias = ((bias - mean) * scale + beta).astype(weight.dtype).reshape(1, -1, 1, 1)
        new_conv = relax.Call(conv.op, [matches[self.data], ta.relax_const(new_weight)],
                              conv.attrs)
        return relax.op.add(new_conv, ta.relax_const(new_bias))
