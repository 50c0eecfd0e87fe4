"""Keep integers between the quantized layers: three small pattern passes.

After :mod:`.fuse_layers` every layer reads ``quantize(x)`` and writes ``dequantize(y)``. Where
a layer's float output only travels to other quantized layers, these passes take the
round trip out, so the tensors between layers stay integer (NHWC):

* :class:`IntegerPoolConcat`: ``max_pool2d(dequantize(y))`` -> ``dequantize(int_max_pool(y))``
  (a positive scale keeps the order, so the max of the integers is the integer of the max);
  ``concat(dequantize(a), dequantize(b), ...)`` on channels with one common format ->
  ``dequantize(int_concat(a, b, ...))``;
* :class:`CancelRequantize`: ``quantize(dequantize(y))`` in the very format ``y`` is in -> ``y``.

What is left of the float values (a dequantize nothing reads any more) goes with
``DeadCodeElimination``: layout changes and (de)quantizes stay only at the region's edges.
Which calls are quantizes and dequantizes, and in which format, comes from the
:class:`.region_funcs.RegionFuncs` table.

Example::

    funcs.set_main(IntegerPoolConcat(funcs).run(funcs.main()))   # doctest: +SKIP
    funcs.set_main(CancelRequantize(funcs).run(funcs.main()))    # doctest: +SKIP
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.dpl import is_op, is_tuple, rewrite_call, wildcard

from .. import tvm_adapter as ta
from ..numpy_graph import ceil_mode_pads
from .region_funcs import RegionFuncs

_MAX_ROUNDS = 64  # a pool of a concat of pools ...: each round reaches one op further


def _call_tir():
    return is_op("relax.call_tir")(wildcard(), wildcard())


class IntegerPoolConcat:
    """Max pools and channel concats of dequantized tensors run on the integers."""

    def __init__(self, funcs: RegionFuncs):
        self.funcs = funcs
        self.dq = _call_tir()
        self.pool = is_op("relax.nn.max_pool2d")(self.dq)
        self.concat = is_op("relax.concat")(wildcard())

    def run(self, func: relax.Function) -> relax.Function:
        # A rewrite is only seen by the next round's matches (a pool reading a concat that was
        # just rewritten): repeat until nothing changes.
        for _ in range(_MAX_ROUNDS):
            self._values = relax.analysis.get_var2val(func)
            new = rewrite_call(self.pool, self._pool, func)
            new = rewrite_call(self.concat, self._concat, new)
            if new.same_as(func):
                break
            func = new
        return func

    def _dequantized(self, expr):
        """``(y, format)`` when ``expr`` is (a var bound to) ``dequantize(y)`` of an NHWC y."""
        if isinstance(expr, relax.Var):
            expr = self._values.get(expr, expr)
        op = self.funcs.op_of(expr)
        if op is None or op.kind != "dequantize":
            return None
        y = expr.args[1].fields[0]
        return (y, op.quant) if len(ta.static_shape(y)) == 4 else None

    def _pool(self, expr, m):
        if not isinstance(expr, relax.Call):  # a var bound to the match: the call itself is offered too
            return expr
        src = self._dequantized(m[self.dq])
        attrs = expr.attrs
        if src is None or any(int(d) != 1 for d in attrs.dilation) or str(attrs.layout) != "NCHW":
            return expr
        y, quant = src
        shape = ta.static_shape(y)  # NHWC
        kernel = tuple(int(k) for k in attrs.pool_size)
        stride = tuple(int(s) for s in attrs.strides)
        pads = [int(p) for p in attrs.padding]  # top, left, bottom, right
        if bool(attrs.ceil_mode):  # as numpy_graph's reference pads it
            pads = ceil_mode_pads(pads, shape[1:3], kernel, stride)
        pooled, shape = self.funcs.max_pool(y, kernel=kernel, stride=stride, padding=tuple(pads))
        return self.funcs.dequantize(pooled, quant, shape=shape)

    def _concat(self, expr, m):
        if not isinstance(expr, relax.Call):
            return expr
        parts = expr.args[0]  # the tuple as written (its fields are vars)
        if not isinstance(parts, relax.Tuple) or int(expr.attrs.axis) not in (1, -3):
            return expr
        sources = [self._dequantized(p) for p in parts.fields]
        if any(s is None for s in sources) or len({q for _, q in sources}) != 1:
            return expr
        joined, shape = self.funcs.concat([y for y, _ in sources])
        return self.funcs.dequantize(joined, sources[0][1], shape=shape)


class CancelRequantize:
    """``quantize(dequantize(y))`` -> ``y`` when the quantize writes exactly ``y``'s format."""

    def __init__(self, funcs: RegionFuncs):
        self.funcs = funcs
        self.dq = _call_tir()
        self.q = is_op("relax.call_tir")(wildcard(), is_tuple([self.dq]))

    def run(self, func: relax.Function) -> relax.Function:
        return rewrite_call(self.q, self._rewrite, func)

    def _rewrite(self, expr, m):
        if not isinstance(expr, relax.Call):
            return expr
        q, dq = self.funcs.op_of(expr), self.funcs.op_of(m[self.dq])
        if q is None or dq is None or q.kind != "quantize" or dq.kind != "dequantize" or q.quant != dq.quant:
            return expr
        y = m[self.dq].args[1].fields[0]
        same = ta.static_shape(y) == ta.static_shape(expr) and ta.tensor_dtype(y) == ta.tensor_dtype(expr)
        return y if same else expr
