"""The plan's fused layers as one pattern: ``conv2d|matmul -> [bias] -> [residual add] -> [relu]``.

The plan decided, on the ONNX graph (:mod:`tvm_ternary.plan.graph`), which nodes form each
layer; this pass does not recognise anything of its own. A match is the plan's layer when its
weight is that layer's weight parameter (:mod:`.import_onnx`: every layer's weight is a named
parameter of ``main``), and it is rewritten only when it is the chain the plan fused: same op,
bias, residual and ReLU. Everything else is returned unchanged (the bail-out); a planned layer
that no match fits stays float, and :attr:`FuseLayers.left_float` says why.

A matching chain becomes ``dequantize(kernel(quantize(x), packed weights, ..., [quantize(res)]))``
(for a float exit: the kernel's own dequantizing epilogue, ``permute_dims`` back to NCHW). The
quantize / dequantize at each layer's edge are undone between layers by :mod:`.integer_ops`.

Modelled on TVM's ``FoldBatchnormToConv2D``: the patterns are built once; ``rewrite_call``
offers each match to :meth:`FuseLayers._rewrite`. One pattern per chain shape (with / without
residual on either side of the add, with / without ReLU), each its own ``rewrite_call``: a
pattern with alternatives would offer only its first fitting alternative, and the residual add
of two convolutions (ResNet's projection shortcut) fits both ways, only one of them the plan's.

Example::

    fuse = FuseLayers(funcs, plan=plan, layer_of_weight=imported.layer_of_weight(), kernels=make)  # doctest: +SKIP
    funcs.set_main(fuse.run(funcs.main()))                                                         # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from tvm import relax
from tvm.relax.dpl import is_const, is_op, is_var, rewrite_call, wildcard

from .. import tvm_adapter as ta
from ..plan import LayerPlan, QuantPlan
from ..schedules import kernel_arg_names
from .kernel_args import layer_kernel_args, layer_spec
from .region_funcs import RegionFuncs


@dataclass(frozen=True)
class _Chain:
    """What a match holds, in the plan's terms (for the check and the reason it failed)."""

    op: str  # "conv" | "dense"
    bias: bool
    residual: bool
    relu: bool
    shared: bool = False  # a link inside the chain has another reader
    alpha: bool = False  # a Gemm's alpha is not the multiply of its input the frontend makes

    def describe(self) -> str:
        links = [self.op] + (["bias"] if self.bias else []) + (["residual add"] if self.residual else [])
        text = " -> ".join(links + (["relu"] if self.relu else []))
        text += " with a link that other ops read too" if self.shared else ""
        return text + (" whose input is not scaled by the Gemm's alpha" if self.alpha else "")

    def size(self) -> int:
        return self.bias + self.residual + self.relu


def planned_chain(layer: LayerPlan) -> _Chain:
    fused = layer.fused
    return _Chain(op=fused.weight.op_type, bias=fused.weight.bias is not None,
                  residual=fused.residual is not None, relu=fused.relu)


class FuseLayers:
    """Rewrite each planned layer's chain into its kernel (see the module docstring)."""

    def __init__(self, funcs: RegionFuncs, *, plan: QuantPlan, layer_of_weight: dict[str, str],
                 kernel_for):
        self.funcs, self.plan, self.layer_of_weight = funcs, plan, layer_of_weight
        self.kernel_for = kernel_for  # spec -> (GlobalVar, isa, the spec the kernel computes)
        self.fused: list[str] = []
        self.kernel_of: dict[str, str] = {}  # layer name -> kernel function
        self._seen: dict[str, _Chain] = {}  # layer -> the longest chain a match offered
        # Gemm alpha != 1 by node output (the plan folds it into the weight)
        self._alpha = {node.output[0]: float(a.f) for node in plan.model.graph.node if node.op_type == "Gemm"
                       for a in node.attribute if a.name == "alpha" and a.f != 1.0}
        self.x, self.w = wildcard(), is_var()
        weight = is_op("relax.permute_dims")(self.w) | self.w  # Gemm's transB: W.T, not folded
        self.linear = is_op("relax.nn.conv2d")(self.x, weight) | is_op("relax.matmul")(self.x, weight)
        self.bias = is_op("relax.add")(self.linear, is_const())
        chain = self.bias | self.linear
        # The matcher tries a commutative add's operands as written first, then swapped, and
        # offers only the first fit: the two orders are two patterns, so that a residual add
        # of two chains is offered with each as the layer. The residual add is a pattern of
        # its own so that its operands can be read as the vars they are.
        self.add_left = is_op("relax.add")(chain, wildcard())
        self.add_right = is_op("relax.add")(wildcard(), chain)
        self.patterns = [(is_op("relax.nn.relu")(self.add_left), self.add_left),
                         (is_op("relax.nn.relu")(self.add_right), self.add_right),
                         (self.add_left, self.add_left), (self.add_right, self.add_right),
                         (is_op("relax.nn.relu")(chain), None), (chain, None)]

    def run(self, func: relax.Function) -> relax.Function:
        self._params = {ta.var_name(p): p for p in func.params}
        for pattern, add in self.patterns:
            self._add, self._values = add, relax.analysis.get_var2val(func)
            self._var_of = {value: var for var, value in self._values.items()}
            self._uses = _use_counts(func)
            func = rewrite_call(pattern, self._rewrite, func)
        return func

    @property
    def left_float(self) -> dict[str, str]:
        """Planned layers no match fitted -> why."""
        out = {}
        for name, layer in self.plan.layers.items():
            if name in self.fused:
                continue
            seen = self._seen.get(name)
            out[name] = ("no conv2d/matmul reads this layer's weight in the Relax module" if seen is None
                         else f"the Relax graph has {seen.describe()}, the plan fused "
                              f"{planned_chain(layer).describe()}")
        return out

    # --- the check and the rewrite ----------------------------------------------------------
    def _layer(self, m) -> LayerPlan | None:
        w = m[self.w]
        name = self.layer_of_weight.get(ta.var_name(w))
        param = self._params.get(ta.var_name(w))
        if name is None or param is None or not param.same_as(w):  # not a layer's weight parameter
            return None
        return self.plan.layers.get(name)  # None: the policy keeps it float

    def _rewrite(self, expr, m):
        # a var bound to the match is offered too: rewrite the call only
        layer = self._layer(m) if isinstance(expr, relax.Call) else None
        if layer is None or layer.name in self.fused:
            return expr
        linear, bias = m[self.linear], m.get(self.bias)
        residual = None
        if self._add is not None:
            # the add operand that is not the chain: read off the matched call, whose operands
            # are the vars the program passes (a matched wildcard holds the value behind a var,
            # which must not be computed twice)
            chain = linear if bias is None else bias
            others = [a for a in m[self._add].args if not self._values.get(a, a).same_as(chain)]
            if len(others) != 1 or ta.const_numpy(others[0]) is not None:
                return expr  # x + x, or an add of a constant: a bias, not a residual
            residual = others[0]
        got = _Chain(op="conv" if ta.call_op_name(linear) == "relax.nn.conv2d" else "dense",
                     bias=bias is not None, residual=residual is not None,
                     relu=ta.call_op_name(expr) == "relax.nn.relu")
        seen = self._seen.get(layer.name)
        if seen is None or got.size() > seen.size():
            self._seen[layer.name] = got
        if got != planned_chain(layer) or not _fits(layer, linear):
            return expr
        x = self._input(layer, linear)
        if x is None:
            self._seen[layer.name] = replace(got, alpha=True)
            return expr
        # each link inside the chain is read by the next one only (as the plan checked on the
        # ONNX graph): another reader would keep the float chain alive next to the kernel
        inner = [c for c in (linear, bias, None if self._add is None else m[self._add])
                 if c is not None and not c.same_as(expr)]  # the root may have any readers
        if any(self._uses.get(self._var_of.get(call), 0) != 1 for call in inner):
            self._seen[layer.name] = replace(got, shared=True)
            return expr
        return self._kernel_call(layer, x, residual)

    def _input(self, layer: LayerPlan, linear):
        """The tensor the plan's layer reads. A Gemm's ``alpha`` is in the plan's weight; the
        frontend multiplies the input by it instead: the kernel reads the input before that."""
        x = linear.args[0]
        alpha = self._alpha.get(layer.fused.weight.output, 1.0)
        if alpha == 1.0:
            return x
        scaled = self._values.get(x)
        factor = None if ta.call_op_name(scaled) != "relax.multiply" else ta.const_numpy(scaled.args[1])
        if factor is None or factor.size != 1 or float(factor.reshape(-1)[0]) != np.float32(alpha):
            return None
        return scaled.args[0]

    def _kernel_call(self, layer: LayerPlan, x, residual):
        funcs = self.funcs
        dense = layer.is_dense
        x_shape = ta.static_shape(x)
        gv, isa, spec = self.kernel_for(layer_spec(layer, x_shape=x_shape), "tt_dense" if dense else "tt_conv")
        self.kernel_of[layer.name] = gv.name_hint
        consts = layer_kernel_args(layer, spec, isa=isa)
        runtime = {"x": funcs.quantize(x, layer.input_quant, nhwc=not dense),
                   "residual": None if residual is None else funcs.quantize(residual, layer.residual_quant, nhwc=True)}
        conv = spec.as_conv() if dense else spec
        args = [runtime[name] if name in runtime else ta.relax_const(consts[name])
                for name in kernel_arg_names(conv, isa)[:-1]]
        out_shape = (x_shape[0], spec.out_features) if dense else spec.out_shape
        out_dtype = "float32" if layer.output_quant is None else layer.output_quant.dtype.name
        y = funcs.call(gv, args, out_shape, out_dtype)
        self.fused.append(layer.name)
        if layer.output_quant is not None:
            return funcs.dequantize(y, layer.output_quant, shape=out_shape)
        return y if dense else relax.op.permute_dims(y, [0, 3, 1, 2])


def _use_counts(func: relax.Function) -> dict:
    """Var -> how many times the function's bindings and result read it."""
    counts: dict = {}

    def read(expr):
        for v in (expr.fields if isinstance(expr, relax.Tuple) else [expr]):
            if isinstance(v, relax.Var):
                counts[v] = counts.get(v, 0) + 1

    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            for arg in value.args if isinstance(value, relax.Call) else [value]:
                read(arg)
    read(func.body.body)
    return counts


def _fits(layer: LayerPlan, linear) -> bool:
    """The call computes what the plan's kernel does: NCHW activations and OIHW weights (the
    frontend's only layouts), the plan's weight shape ([C, K] for a matmul), 2-D dense input."""
    want = layer.fused.weight.weight.shape
    if ta.call_op_name(linear) != "relax.nn.conv2d":
        return len(ta.static_shape(linear.args[0]) or ()) == 2 and ta.static_shape(linear.args[1]) == want[::-1]
    attrs = linear.attrs
    return str(attrs.data_layout) == "NCHW" and str(attrs.kernel_layout) == "OIHW" \
        and str(attrs.out_layout) in ("NCHW", "") and ta.static_shape(linear.args[1]) == want


__all__ = ["FuseLayers", "planned_chain"]
