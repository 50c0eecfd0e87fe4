"""Inference clean-up passes on the imported Relax module: drop Dropout.

Modelled on TVM's ``FoldBatchnormToConv2D`` (pattern built once, ``rewrite_call``, bail out by
returning the match unchanged). BatchNorm is folded once, on the ONNX graph
(``onnx_normalize.fold_batchnorm``), before the plan is made: a second fold here would change
a conv the plan has already quantized (the plan's weight would no longer be the program's).
A BatchNorm the ONNX fold leaves (its conv output has other readers) is decomposed into a
scale/shift by ``DecomposeOpsForInference``, as the plan's numpy graph runs it.

Example::

    >>> mod = RemoveDropout()(mod)          # doctest: +SKIP
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.dpl import TupleGetItemPattern, is_op, rewrite_call, wildcard
from tvm.relax.transform import function_pass

__all__ = ["RemoveDropout"]


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
