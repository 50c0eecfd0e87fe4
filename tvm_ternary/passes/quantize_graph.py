"""Apply a quantization plan to the float Relax module: pattern passes, in this order.

1. :class:`.fuse_layers.FuseLayers`: each planned layer's chain
   ``conv2d|matmul -> [bias] -> [residual add] -> [relu]`` (the plan's, found by its weight
   parameter) -> ``dequantize(kernel(quantize(x), ...))``, one ``call_tir`` of the layer's
   kernel with its packed constant weights and fused epilogue;
2. :class:`.integer_ops.IntegerPoolConcat`: max pools and channel concats of dequantized
   tensors run on the integers;
3. :class:`.integer_ops.CancelRequantize`: ``quantize(dequantize(y))`` in ``y``'s format -> ``y``;
4. :class:`.nhwc_ops.NHWCGlobalMean`: a global average pool of a kernel's float NHWC output
   reads it as NHWC (no transpose to NCHW first);
5. the weights of the layers left float are bound as constants, and ``DeadCodeElimination``
   drops what no one reads: integer NHWC tensors between layers, (de)quantize and layout
   changes only where the quantized region ends.

A chain that differs from what the plan expects is left float and reported
(:attr:`RewriteReport.left_float`): nothing is dropped silently.

Example::

    mod, report = apply_plan(imported, plan=plan, target=target)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tvm import relax

from .. import tvm_adapter as ta
from ..plan import QuantPlan
from ..schedules import ConvSpec, DenseSpec, conv2d_kernel, dense_kernel
from ..schedules.compute import unpacked_spec
from .fuse_layers import FuseLayers
from .import_onnx import ImportedModel, bind_weights
from .integer_ops import CancelRequantize, IntegerPoolConcat
from .nhwc_ops import NHWCGlobalMean
from .region_funcs import RegionFuncs, RegionOp


@dataclass
class RewriteReport:
    fused: list[str] = field(default_factory=list)  # layer names rewritten into kernels
    left_float: dict[str, str] = field(default_factory=dict)  # layer name -> why
    kernels: dict[str, str] = field(default_factory=dict)  # kernel function -> ISA
    integer_ops: list[str] = field(default_factory=list)  # max_pool2d / concat run on integers
    specs: dict[str, object] = field(default_factory=dict)  # kernel function -> ConvSpec / DenseSpec
    layer_kernels: dict[str, str] = field(default_factory=dict)  # layer name -> kernel function
    schedules: dict[str, str] = field(default_factory=dict)  # kernel function -> "default" / "tuned ..."
    forms: dict[str, str] = field(default_factory=dict)  # kernel function -> "amx" (AMX tiles), if so


class _Kernels:
    """One kernel function per spec: the default schedule, or ``provider``'s (tuned ones)."""

    def __init__(self, funcs: RegionFuncs, *, target, isa: str, provider=None):
        self.funcs, self.target, self.isa, self.provider = funcs, target, isa, provider
        self.status: dict[str, str] = {}  # kernel function -> schedule status
        self.isa_of_func: dict[str, str] = {}
        self.spec_of_func: dict[str, object] = {}
        self.form_of_func: dict[str, str] = {}

    def isa_for(self, spec) -> str:
        return "plain" if getattr(spec, "depthwise", False) else self.isa

    def __call__(self, spec, prefix: str):
        """``(GlobalVar, isa, spec)`` of the kernel for ``spec``: the spec it computes may be
        the 8-bit form of a ternary one (``compute.unpacked_spec``), whose arguments
        ``kernel_args.layer_kernel_args`` then makes."""
        unpacked = unpacked_spec(spec, self.isa_for(spec)) if isinstance(spec, ConvSpec) else None
        spec = unpacked or spec
        status = {}

        def make():
            if self.provider is not None:  # e.g. tuning.apply.TunedKernels: a record of the database
                func, status["s"] = self.provider(spec, target=self.target, isa=self.isa)
            else:
                status["s"] = "default"
                build = dense_kernel if isinstance(spec, DenseSpec) else conv2d_kernel
                func = build(spec, target=self.target, isa=self.isa)
            form = func.attrs.get("tvm_ternary.form", None) if func.attrs is not None else None
            if form is not None:
                status["form"] = str(form)
            return func

        gv = self.funcs.function(("k", spec), make, prefix, RegionOp("kernel"))
        if status:
            self.status[gv.name_hint] = status["s"]
            self.isa_of_func[gv.name_hint] = self.isa_for(spec)
            self.spec_of_func[gv.name_hint] = spec
            if "form" in status:
                self.form_of_func[gv.name_hint] = status["form"]
            elif unpacked is not None:
                self.form_of_func[gv.name_hint] = "unpacked"
        return gv, self.isa_for(spec), spec


def apply_plan(imported: ImportedModel, *, plan: QuantPlan, target, isa: str | None = None, kernels=None):
    """Rewrite ``imported.module``'s main with ``plan``. Returns the new module (every weight a
    constant, ``main`` taking the input only) and a :class:`RewriteReport`.

    ``kernels(spec, *, target, isa) -> (PrimFunc, status)`` replaces the default kernels (tuned
    schedules); ``status`` lands in ``report.schedules``."""
    isa = isa or ta.choose_isa(target)
    funcs = RegionFuncs(imported.module, target=target)
    make_kernel = _Kernels(funcs, target=target, isa=isa, provider=kernels)
    fuse = FuseLayers(funcs, plan=plan, layer_of_weight=imported.layer_of_weight(), kernel_for=make_kernel)
    funcs.set_main(fuse.run(funcs.main()))
    funcs.set_main(IntegerPoolConcat(funcs).run(funcs.main()))
    funcs.set_main(CancelRequantize(funcs).run(funcs.main()))
    funcs.set_main(NHWCGlobalMean(funcs).run(funcs.main()))
    mod = bind_weights(funcs.module(), imported.weights)
    mod = relax.transform.DeadCodeElimination()(mod)

    # the integer ops as the final program runs them, in program order
    kinds = {"max_pool": "max_pool2d", "concat": "concat"}
    ops = [funcs.op_of(value) for _, value in ta.main_bindings(mod)]
    report = RewriteReport(fused=[name for name in plan.layers if name in fuse.fused], left_float=fuse.left_float,
                           integer_ops=[kinds[op.kind] for op in ops if op is not None and op.kind in kinds])
    for name in report.fused:
        kernel = fuse.kernel_of[name]
        report.layer_kernels[name] = kernel
    for kernel in dict.fromkeys(report.layer_kernels.values()):
        report.kernels[kernel] = make_kernel.isa_of_func[kernel]
        report.specs[kernel] = make_kernel.spec_of_func[kernel]
        report.schedules[kernel] = make_kernel.status[kernel]
        if kernel in make_kernel.form_of_func:
            report.forms[kernel] = make_kernel.form_of_func[kernel]
    return mod, report
