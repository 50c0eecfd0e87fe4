"""The PrimFuncs the plan-applying rewrite calls, each made once, and what each one computes.

The rewrite's patterns (:mod:`.fuse_layers`, :mod:`.integer_ops`) see ``call_tir`` of a
GlobalVar; to tell a quantize from a dequantize, and in which format, they ask this table
(:meth:`RegionFuncs.op_of`) rather than read the PrimFunc. One function per distinct
argument set (shape, format, kernel spec), named ``tt_<kind><i>`` in order of creation.

Example::

    funcs = RegionFuncs(mod, target=target)                # doctest: +SKIP
    x_int = funcs.quantize(x, layer.input_quant)           # doctest: +SKIP
    funcs.op_of(x_int)                                     # RegionOp(kind='quantize', quant=...)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax

from .. import tvm_adapter as ta
from ..quant import ActivationQuant
from ..schedules.region_ops import (concat_func, dequantize_func, global_mean_func, max_pool_func,
                                    quantize_func)


@dataclass(frozen=True)
class RegionOp:
    """What one of our functions computes."""

    kind: str  # "quantize" | "dequantize" | "max_pool" | "concat" | "global_mean" | "kernel"
    # quantize: the format it writes; dequantize (and a global mean of integers): the format it
    # reads; max pool, concat and kernels: None (a max pool or concat writes the format it
    # reads, whatever it is)
    quant: ActivationQuant | None = None


class RegionFuncs:
    """The module being rewritten, plus the functions added to it and their table."""

    def __init__(self, mod: tvm.IRModule, *, target=None):
        self.builder = relax.BlockBuilder(mod)
        # the input quantize divides with an FMA correction where the target has FMA
        self.fma = target is not None and ta.target_has_features(target, "fma")
        self._gvs: dict = {}  # cache key -> GlobalVar
        self._ops: dict[str, RegionOp] = {}  # function name -> what it computes
        self._counts: dict[str, int] = {}

    # --- the table ----------------------------------------------------------------------
    def function(self, key, make, prefix: str, op: RegionOp):
        """The GlobalVar of the function for ``key``, adding ``make()`` the first time."""
        if key not in self._gvs:
            n = self._counts.get(prefix, 0)
            self._counts[prefix] = n + 1
            gv = self.builder.add_func(make(), f"{prefix}{n}")
            self._gvs[key] = gv
            self._ops[gv.name_hint] = op
        return self._gvs[key]

    def op_of(self, expr) -> RegionOp | None:
        """What ``expr`` computes when it is a ``call_tir`` of one of our functions."""
        if ta.call_op_name(expr) != "relax.call_tir":
            return None
        return self._ops.get(expr.args[0].name_hint)

    @staticmethod
    def call(gv, args, shape, dtype) -> relax.Call:
        # not normalised here (a nested argument needs a block to be bound in): rewrite_call
        # normalises what a rewriter returns, so shapes are passed, not read off the result
        return relax.call_tir(gv, list(args), relax.TensorType(tuple(shape), dtype))

    # --- the region ops -------------------------------------------------------------------
    def quantize(self, value, quant: ActivationQuant, *, nhwc: bool) -> relax.Call:
        """float32 NCHW (or [N, C]) ``value`` -> integers in ``quant``, NHWC (or [N, C])."""
        shape = ta.static_shape(value)
        out_shape = (shape[0], shape[2], shape[3], shape[1]) if nhwc else shape
        gv = self.function(("q", shape, quant), lambda: quantize_func(
            shape=shape, scale=quant.scale, bits=quant.bits, signed=quant.signed,
            zero_point=quant.zero_point, fma=self.fma), "tt_quantize", RegionOp("quantize", quant))
        return self.call(gv, [value], out_shape, quant.dtype.name)

    def dequantize(self, value, quant: ActivationQuant, *, shape: tuple[int, ...]) -> relax.Call:
        """Integer NHWC (or [N, C]) ``value`` of ``shape`` in ``quant`` -> float32 NCHW (or [N, C])."""
        dtype = quant.dtype.name
        # keyed by the whole format (bits too): the table must say exactly what it reads
        gv = self.function(("dq", shape, quant), lambda: dequantize_func(
            shape=shape, dtype=dtype, scale=quant.scale, zero_point=quant.zero_point),
            "tt_dequantize", RegionOp("dequantize", quant))
        out_shape = (shape[0], shape[3], shape[1], shape[2]) if len(shape) == 4 else shape
        return self.call(gv, [value], out_shape, "float32")

    def max_pool(self, value, *, kernel, stride, padding) -> tuple[relax.Call, tuple[int, ...]]:
        """Integer NHWC max pooling of a var; ``padding`` (top, left, bottom, right) includes ceil
        mode. Returns the call and its shape."""
        shape = ta.static_shape(value)
        dtype = ta.tensor_dtype(value)
        gv = self.function(("mp", shape, dtype, kernel, stride, padding), lambda: max_pool_func(
            shape=shape, dtype=dtype, kernel=kernel, stride=stride, padding=padding),
            "tt_max_pool", RegionOp("max_pool"))
        oh = (shape[1] + padding[0] + padding[2] - kernel[0]) // stride[0] + 1
        ow = (shape[2] + padding[1] + padding[3] - kernel[1]) // stride[1] + 1
        out_shape = (shape[0], oh, ow, shape[3])
        return self.call(gv, [value], out_shape, dtype), out_shape

    def concat(self, values) -> tuple[relax.Call, tuple[int, ...]]:
        """Integer NHWC vars (one dtype) joined along channels; the call and its shape."""
        shapes = [ta.static_shape(v) for v in values]
        dtype = ta.tensor_dtype(values[0])
        gv = self.function(("cat", tuple(shapes), dtype), lambda: concat_func(shapes=shapes, dtype=dtype),
                           "tt_concat", RegionOp("concat"))
        out_shape = (*shapes[0][:3], sum(sh[3] for sh in shapes))
        return self.call(gv, values, out_shape, dtype), out_shape

    def global_mean(self, value, *, shape: tuple[int, ...],
                    quant: ActivationQuant | None = None) -> relax.Call:
        """NHWC ``value`` of ``shape`` -> the float32 mean over H and W, ``[N, C, 1, 1]``:
        ``value`` is float32, or integers in ``quant``, dequantized as they are summed."""
        reads = None if quant is None else (quant.dtype.name, quant.scale, quant.zero_point)
        gv = self.function(("gm", tuple(shape), quant), lambda: global_mean_func(shape=shape, quant=reads),
                           "tt_global_mean", RegionOp("global_mean", quant))
        return self.call(gv, [value], (shape[0], shape[3], 1, 1), "float32")

    # --- the module -----------------------------------------------------------------------
    def main(self) -> relax.Function:
        return self.builder.get()["main"]

    def set_main(self, func: relax.Function) -> None:
        self.builder.update_func(self.builder.get().get_global_var("main"), func)

    def module(self) -> tvm.IRModule:
        return self.builder.get()
