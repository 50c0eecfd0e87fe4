"""Apply a quantization plan to the float Relax module: recognise, fuse, keep integers.

For every planned layer the chain ``conv2d|matmul -> add(bias) [-> add(residual)] [-> relu]``
is recognised in the Relax dataflow and replaced, at its last binding, by one ``call_tir`` of
the layer's kernel with its packed constant weights and fused epilogue. Tensors produced by
quantized layers stay integer and NHWC between layers: each one has an integer *shadow*, and a
later layer (or a max pool / concat of shadows) reads the shadow instead of its float value.
A float consumer gets a dequantize (NHWC -> NCHW) at the region's edge; unused ones are dropped
by dead-code elimination, so layout changes appear only where the quantized region ends.

A chain that differs from what the plan expects (e.g. the ONNX Relu became something else) is
left float and reported: nothing is dropped silently.

Example::

    mod, report = apply_plan(imported.module, plan=plan, layer_vars=vars_by_name, target=target)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .. import tvm_adapter as ta
from ..plan import LayerPlan, QuantPlan
from ..quant import ActivationQuant
from ..schedules import DenseSpec, conv2d_kernel, dense_kernel, kernel_arg_names
from ..schedules.region_ops import concat_func, dequantize_func, max_pool_func, quantize_func
from .kernel_args import layer_kernel_args, layer_spec


@dataclass
class RewriteReport:
    fused: list[str] = field(default_factory=list)  # layer names rewritten into kernels
    left_float: dict[str, str] = field(default_factory=dict)  # layer name -> why
    kernels: dict[str, str] = field(default_factory=dict)  # kernel function -> ISA
    integer_ops: list[str] = field(default_factory=list)  # max_pool2d / concat run on integers
    specs: dict[str, object] = field(default_factory=dict)  # kernel function -> ConvSpec / DenseSpec
    layer_kernels: dict[str, str] = field(default_factory=dict)  # layer name -> kernel function
    schedules: dict[str, str] = field(default_factory=dict)  # kernel function -> "default" / "tuned ..."


@dataclass(frozen=True)
class _Shadow:
    var: relax.Var  # integer NHWC tensor
    quant: ActivationQuant


def _users(func) -> dict:
    users: dict = {}
    for block in func.body.blocks:
        for b in block.bindings:
            for arg in getattr(b.value, "args", []):
                for v in (arg.fields if isinstance(arg, relax.Tuple) else [arg]):
                    if isinstance(v, relax.Var):
                        users.setdefault(v, []).append(b)
    return users


def _chain(start, users, layer: LayerPlan):
    """Bindings from the conv/matmul to the chain's root, or (None, reason)."""
    def only_user(var, op_name):
        us = users.get(var, [])
        return us[0] if len(us) == 1 and ta.call_op_name(us[0].value) == op_name else None

    chain, residual = [start], None
    add = only_user(start.var, "relax.add")
    if add is not None and ta.const_numpy(add.value.args[1]) is not None:
        chain.append(add)  # the bias (already folded into the plan's integer bias)
    if layer.fused.residual is not None:
        add = only_user(chain[-1].var, "relax.add")
        if add is None:
            return None, None, "plan has a residual add the Relax graph does not"
        a, b = add.value.args
        residual = b if a.same_as(chain[-1].var) else a
        chain.append(add)
    if layer.fused.relu:
        relu = only_user(chain[-1].var, "relax.nn.relu")
        if relu is None:
            return None, None, "plan has a ReLU the Relax graph does not"
        chain.append(relu)
    return chain, residual, None


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, plan: QuantPlan, layer_vars: dict[str, str], target, isa: str, kernels=None):
        super().__init__(mod)
        self.plan, self.target, self.isa, self.kernels = plan, target, isa, kernels
        self._status: dict = {}  # spec -> schedule status of its kernel
        self.report = RewriteReport()
        self.shadows: dict = {}
        self.funcs: dict = {}  # cache key -> GlobalVar
        func = mod["main"]
        users = _users(func)
        self.roots, self.skip = {}, set()
        bindings = {ta.var_name(b.var): b for blk in func.body.blocks for b in blk.bindings}
        var_of_layer = {layer: var for var, layer in layer_vars.items()}
        for name, layer in plan.layers.items():
            start = bindings.get(var_of_layer.get(name, ""))
            if start is None:
                self.report.left_float[name] = "no matching conv/matmul in the Relax module"
                continue
            chain, residual, why = _chain(start, users, layer)
            if why:
                self.report.left_float[name] = why
                continue
            self.roots[chain[-1].var] = (layer, chain[0], residual)
            self.skip.update(b.var for b in chain[:-1])

    # --- helpers -------------------------------------------------------------------------
    def _func(self, key, make, prefix: str):
        if key not in self.funcs:
            self.funcs[key] = self.builder_.add_func(make(), f"{prefix}{len(self.funcs)}")
        return self.funcs[key]

    def _call(self, gv, args, shape, dtype):
        return self.builder_.emit(relax.call_tir(gv, args, relax.TensorType(shape, dtype)))

    def _integer(self, var, quant: ActivationQuant, *, nhwc: bool):
        """The integer NHWC (or [N, C]) version of ``var`` in format ``quant``."""
        shadow = self.shadows.get(var)
        if shadow is not None and shadow.quant == quant:
            return shadow.var
        value = self.visit_expr(var)
        shape = ta.static_shape(value)
        out_shape = (shape[0], shape[2], shape[3], shape[1]) if nhwc else shape
        gv = self._func(("q", shape, quant), lambda: quantize_func(
            shape=shape, scale=quant.scale, bits=quant.bits, signed=quant.signed), "tt_quantize")
        return self._call(gv, [value], out_shape, quant.dtype.name)

    def _expose(self, old_var, int_var, quant: ActivationQuant):
        """Record the shadow and give float users a dequantized NCHW value."""
        self.shadows[old_var] = _Shadow(int_var, quant)
        shape = ta.static_shape(int_var)
        dtype = ta.tensor_dtype(int_var)
        gv = self._func(("dq", shape, dtype, quant.scale), lambda: dequantize_func(
            shape=shape, dtype=dtype, scale=quant.scale), "tt_dequantize")
        out_shape = (shape[0], shape[3], shape[1], shape[2]) if len(shape) == 4 else shape
        self.set_var_remap(old_var, self._call(gv, [int_var], out_shape, "float32"))

    # --- bindings ------------------------------------------------------------------------
    def visit_var_binding_(self, binding):
        var = binding.var
        if var in self.skip:
            return
        if var in self.roots:
            return self._fused_layer(var, *self.roots[var])
        op = ta.call_op_name(binding.value)
        if op == "relax.nn.max_pool2d" and binding.value.args[0] in self.shadows \
                and all(int(d) == 1 for d in binding.value.attrs.dilation):
            return self._max_pool(var, binding.value)
        if op == "relax.concat" and self._concat(var, binding.value):
            return None
        return super().visit_var_binding_(binding)

    def _fused_layer(self, root_var, layer: LayerPlan, start, residual):
        x_var = start.value.args[0]
        dense = ta.call_op_name(start.value) == "relax.matmul"
        x_shape = ta.static_shape(x_var)
        spec = layer_spec(layer, x_shape=x_shape)
        prefix = "tt_dense" if dense else "tt_conv"
        gv = self._func(("k", spec), lambda: self._kernel(spec), prefix)
        self.report.schedules[gv.name_hint] = self._status[spec]
        self.report.kernels[gv.name_hint] = self.isa if not getattr(spec, "depthwise", False) else "plain"
        self.report.specs[gv.name_hint] = spec
        self.report.layer_kernels[layer.name] = gv.name_hint
        consts = layer_kernel_args(layer, spec, isa=self._isa_of(spec))
        x_int = self._integer(x_var, layer.input_quant, nhwc=not dense)
        res_int = None if residual is None else self._integer(residual, layer.residual_quant, nhwc=True)
        conv = spec.as_conv() if dense else spec
        runtime_args = {"x": x_int, "residual": res_int}
        args = [runtime_args[name] if name in runtime_args else ta.relax_const(consts[name])
                for name in kernel_arg_names(conv, self._isa_of(spec))[:-1]]
        out_shape = (x_shape[0], spec.out_features) if dense else spec.out_shape
        out_dtype = "float32" if layer.output_quant is None else layer.output_quant.dtype.name
        y = self._call(gv, args, out_shape, out_dtype)
        self.report.fused.append(layer.name)
        if layer.output_quant is not None:
            self._expose(root_var, y, layer.output_quant)
        elif dense:
            self.set_var_remap(root_var, y)
        else:
            self.set_var_remap(root_var, self.builder_.emit(relax.op.permute_dims(y, [0, 3, 1, 2])))

    def _kernel(self, spec):
        if self.kernels is not None:  # e.g. tuning.apply.TunedKernels: a record of the database
            func, self._status[spec] = self.kernels(spec, target=self.target, isa=self.isa)
            return func
        self._status[spec] = "default"
        if isinstance(spec, DenseSpec):
            return dense_kernel(spec, target=self.target, isa=self.isa)
        return conv2d_kernel(spec, target=self.target, isa=self.isa)

    def _isa_of(self, spec) -> str:
        return "plain" if getattr(spec, "depthwise", False) else self.isa

    def _max_pool(self, var, call):
        attrs = call.attrs
        src = self.shadows[call.args[0]]
        shape = ta.static_shape(src.var)  # NHWC
        kernel = tuple(int(k) for k in attrs.pool_size)
        stride = tuple(int(s) for s in attrs.strides)
        pads = [int(p) for p in attrs.padding]  # top, left, bottom, right
        if bool(attrs.ceil_mode):  # extra bottom/right padding, as numpy_graph's reference does
            for i, size in enumerate(shape[1:3]):
                pads[i + 2] += (-(size + pads[i] + pads[i + 2] - kernel[i])) % stride[i]
        oh = (shape[1] + pads[0] + pads[2] - kernel[0]) // stride[0] + 1
        ow = (shape[2] + pads[1] + pads[3] - kernel[1]) // stride[1] + 1
        dtype = ta.tensor_dtype(src.var)
        gv = self._func(("mp", shape, dtype, kernel, stride, tuple(pads)), lambda: max_pool_func(
            shape=shape, dtype=dtype, kernel=kernel, stride=stride, padding=tuple(pads)), "tt_max_pool")
        y = self._call(gv, [src.var], (shape[0], oh, ow, shape[3]), dtype)
        self.report.integer_ops.append("max_pool2d")
        self._expose(var, y, src.quant)

    def _concat(self, var, call) -> bool:
        parts = list(call.args[0].fields)
        shadows = [self.shadows.get(p) for p in parts]
        if int(call.attrs.axis) not in (1, -3) or any(s is None for s in shadows) \
                or len({s.quant for s in shadows}) != 1:
            return False
        shapes = [ta.static_shape(s.var) for s in shadows]
        dtype = ta.tensor_dtype(shadows[0].var)
        gv = self._func(("cat", tuple(shapes), dtype), lambda: concat_func(
            shapes=shapes, dtype=dtype), "tt_concat")
        out_shape = (*shapes[0][:3], sum(sh[3] for sh in shapes))
        y = self._call(gv, [s.var for s in shadows], out_shape, dtype)
        self.report.integer_ops.append("concat")
        self._expose(var, y, shadows[0].quant)
        return True

    def rewrite(self):
        gv = self.builder_.get().get_global_var("main")
        new_main = self.visit_expr(self.builder_.get()["main"])
        self.builder_.update_func(gv, new_main)
        return self.builder_.get()


def apply_plan(mod, *, plan: QuantPlan, layer_vars: dict[str, str], target, isa: str | None = None,
               kernels=None):
    """Rewrite ``mod``'s main with ``plan``; ``layer_vars`` maps Relax var names of conv2d /
    matmul bindings to plan layer names. Returns the new module and a :class:`RewriteReport`.

    ``kernels(spec, *, target, isa) -> (PrimFunc, status)`` replaces the default kernels (tuned
    schedules); ``status`` lands in ``report.schedules``."""
    isa = isa or ta.choose_isa(target)
    rewriter = _Rewriter(mod, plan, layer_vars, target, isa, kernels)
    out = rewriter.rewrite()
    out = relax.transform.DeadCodeElimination()(out)
    return out, rewriter.report
