"""Float ops after the quantized region that read a kernel's NHWC output through the NCHW
transpose :mod:`.fuse_layers` puts after a float exit: one pattern pass.

* :class:`NHWCGlobalMean`: ``mean(permute_dims(y, [0, 3, 1, 2]), axis=[2, 3])`` of an NHWC ``y``
  (a classifier's global average pool after its last conv) -> ``global_mean(y)``, which reads
  ``y`` as it is and writes ``[N, C, 1, 1]`` (reshaped to ``[N, C]`` without ``keepdims``). The
  transpose then has no reader left and goes with ``DeadCodeElimination``. The mean is still
  float32 (a sum, then divided by H*W, as TVM's ``mean``): the coverage report's float ops are
  unchanged.
* :class:`NHWCGlobalMean` too: ``mean(dequantize(q), axis=[2, 3])`` of an integer NHWC ``q``
  (the region's last tensor is integer when its layer ends in a residual add or feeds a
  quantized classifier) -> ``global_mean(q, quant)``, which dequantizes each integer as the
  dequantize did while it sums: the same floats, without the float NCHW tensor between them.

Example::

    funcs.set_main(NHWCGlobalMean(funcs).run(funcs.main()))   # doctest: +SKIP
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from .. import tvm_adapter as ta
from .region_funcs import RegionFuncs

_TO_NCHW = (0, 3, 1, 2)


class NHWCGlobalMean:
    """``mean`` over H, W of an NHWC tensor seen through its NCHW transpose -> ``global_mean``."""

    def __init__(self, funcs: RegionFuncs):
        self.funcs = funcs
        self.y = wildcard()
        self.to_nchw = is_op("relax.permute_dims")(self.y)
        self.mean = is_op("relax.mean")(self.to_nchw)
        self.dq = is_op("relax.call_tir")(wildcard(), wildcard())
        self.mean_dq = is_op("relax.mean")(self.dq)

    def run(self, func: relax.Function) -> relax.Function:
        func = rewrite_call(self.mean, self._rewrite, func)
        return rewrite_call(self.mean_dq, self._rewrite_dequantized, func)

    def _rewrite(self, expr, m):
        if not isinstance(expr, relax.Call):  # a var bound to the match: the call is offered too
            return expr
        perm, y = m[self.to_nchw], m[self.y]
        shape = ta.static_shape(y)
        axes = perm.attrs.axes
        if (shape is None or len(shape) != 4 or ta.tensor_dtype(y) != "float32" or axes is None
                or tuple(int(a) for a in axes) != _TO_NCHW or not _over_hw(expr)):
            return expr
        # the operand as the program passes it (a matched wildcard holds the value behind a var)
        return _pooled(expr, self.funcs.global_mean(perm.args[0], shape=shape), shape)

    def _rewrite_dequantized(self, expr, m):
        if not isinstance(expr, relax.Call):
            return expr
        dq = m[self.dq]
        op = self.funcs.op_of(dq)
        if op is None or op.kind != "dequantize" or not _over_hw(expr):
            return expr
        q = dq.args[1].fields[0]
        shape = ta.static_shape(q)  # NHWC integers (the dequantize writes NCHW)
        if shape is None or len(shape) != 4:
            return expr
        return _pooled(expr, self.funcs.global_mean(q, shape=shape, quant=op.quant), shape)


def _over_hw(mean: relax.Call) -> bool:
    """The mean reduces an NCHW tensor over H and W."""
    reduced = mean.attrs.axis
    return reduced is not None and sorted(int(a) % 4 for a in reduced) == [2, 3]


def _pooled(mean: relax.Call, pooled: relax.Call, shape) -> relax.Expr:
    """``pooled`` ([N, C, 1, 1]) in the shape ``mean`` gave (without keepdims: [N, C])."""
    if bool(mean.attrs.keepdims):
        return pooled
    return relax.op.reshape(pooled, (shape[0], shape[3]))
