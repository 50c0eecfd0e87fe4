"""The compile flow: ONNX in, quantized Relax module and deployable shared library out.

    normalize ONNX -> import to Relax (passes.import_onnx) -> plan (numpy: policy, calibration,
    per-layer quantization) -> apply the plan (passes.quantize_graph: kernels with packed
    weights and fused epilogues, integer NHWC between layers) -> build -> export .so + sidecar

Example::

    >>> cm = compile_model("model.onnx", config=QuantConfig(), calib_images=images)  # doctest: +SKIP
    >>> logits = cm.run(images[:1])  # doctest: +SKIP
    >>> cm.export("model.so")  # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from . import onnx_io
from . import tvm_adapter as ta
from .passes.import_onnx import ImportedModel, import_onnx
from .passes.onnx_normalize import normalize_onnx
from .passes.quantize_graph import RewriteReport, apply_plan
from .plan import QuantConfig, QuantPlan, make_plan


@dataclass(frozen=True, eq=False)
class CompiledModel:
    executable: object
    imported: ImportedModel
    plan: QuantPlan
    rewrite: RewriteReport
    target: object
    isa: str
    seconds: dict

    def sidecar(self, *, library_sha256: str, preprocess=None, calibration: dict | None = None) -> dict:
        """What a user (and :mod:`tvm_ternary.runtime`) needs to know about the library."""
        from dataclasses import asdict

        from . import __version__
        from .runtime import SIDECAR_FORMAT

        im = self.imported
        coverage = self.plan.coverage()
        for row in coverage:
            if row["weights"] == "float":
                row["status"] = "float (policy)"
            elif row["layer"] in self.rewrite.left_float:
                row["status"] = "float: " + self.rewrite.left_float[row["layer"]]
            else:
                row["status"] = "kernel"
            # which schedule the layer's kernel got: "default", "tuned (...)" or why not tuned
            kernel = self.rewrite.layer_kernels.get(row["layer"])
            row["schedule"] = self.rewrite.schedules.get(kernel) if kernel else None
        return {
            "format": SIDECAR_FORMAT,
            "library_sha256": library_sha256,
            "input": {"name": im.input_name, "shape": list(im.input_shape), "dtype": im.input_dtype},
            "output": {"name": im.output_name, "shape": list(im.output_shape), "dtype": im.output_dtype},
            "preprocess": None if preprocess is None else preprocess.to_dict(),
            "quant_config": asdict(self.plan.config),
            # which images calibrated the plan (files / seed from the CLI) and which of them the
            # sequential fit used
            "calibration": {**(calibration or {}), **self.plan.calibration},
            "tvm_version": ta.tvm_version(),
            "tvm_ternary_version": __version__,
            "target": {"mcpu": ta.target_mcpu(self.target), "isa": self.isa},
            "required_cpu_features": ta.target_features(self.target),
            "coverage": coverage,
            "integer_ops": self.rewrite.integer_ops,
            "float_ops": float_ops(self.plan, self.rewrite),
            "import_notes": list(im.notes),
        }

    def export(self, path: str | Path, *, preprocess=None, calibration: dict | None = None) -> dict:
        """Write ``path`` (.so, weights embedded) and its sidecar ``path.json``; returns the
        sidecar. Both are written under temporary names first: a failure leaves neither."""
        import json
        import os

        from .runtime import file_sha256, sidecar_path

        path = Path(path)
        tmp_lib = path.with_name(f".{path.name}.tmp.so")
        tmp_side = path.with_name(f".{path.name}.tmp.json")
        try:
            ta.export_library(self.executable, str(tmp_lib))
            meta = self.sidecar(library_sha256=file_sha256(tmp_lib), preprocess=preprocess,
                                calibration=calibration)
            tmp_side.write_text(json.dumps(meta, indent=1))
            os.replace(tmp_lib, path)
            os.replace(tmp_side, sidecar_path(path))
        finally:
            for tmp in (tmp_lib, tmp_side):
                tmp.unlink(missing_ok=True)
        return meta

    def vm(self):
        return ta.relax_vm(self.executable)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run on ``x`` stacked along axis 0 (one call per sample when the model's batch is 1)."""
        vm = self.vm()
        batch = self.imported.input_shape[0]
        x = np.asarray(x, dtype=np.float32)
        outs = [ta.run_relax_vm(vm, x[i : i + batch])[0] for i in range(0, len(x), batch)]
        return np.concatenate(outs)


_INTEGER_OP_TYPES = {"max_pool2d": "MaxPool", "concat": "Concat"}
_NO_OPS = {"Constant", "Identity", "Dropout"}  # nothing runs for these after import


def float_ops(plan: QuantPlan, rewrite: RewriteReport) -> dict[str, int]:
    """ONNX op types (with counts) that run in float32 in the library: everything outside the
    quantized layers' fused chains and the integer max pools / concats. Reported so that an op
    we do not quantize (an activation we cannot fuse, a normalisation) is visibly float."""
    quantized = {layer.name for layer in plan.analysis.layers
                 if layer.name in plan.layers and layer.name not in rewrite.left_float}
    fused_nodes = set()
    for layer in plan.analysis.layers:
        if layer.name in quantized:
            fused_nodes.update((layer.name, layer.root, *layer.skipped))
    counts: dict[str, int] = {}
    for node in plan.model.graph.node:
        if (node.name or node.output[0]) not in fused_nodes and node.op_type not in _NO_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    for op in rewrite.integer_ops:
        name = _INTEGER_OP_TYPES.get(op, op)
        counts[name] = counts.get(name, 0) - 1
    return {op: n for op, n in sorted(counts.items()) if n > 0}


def compile_model(model, *, config: QuantConfig, calib_images: np.ndarray, target=None,
                  input_shapes=None, plan: QuantPlan | None = None, isa: str | None = None,
                  progress: bool = True, kernels=None) -> CompiledModel:
    """Quantize and compile an ONNX CNN (path or ModelProto) for ``target`` (default: host).

    ``kernels``: a kernel provider for :func:`passes.quantize_graph.apply_plan` (e.g.
    ``tuning.apply.TunedKernels`` for tuned schedules); default schedules when None."""
    seconds = {}
    start = time.perf_counter()
    if not isinstance(model, onnx.ModelProto):
        model = onnx_io.load_model(model)
    prep = normalize_onnx(model, input_shapes=input_shapes)
    imported = import_onnx(model, input_shapes=input_shapes)
    seconds["import"] = time.perf_counter() - start
    if plan is None:
        t0 = time.perf_counter()
        plan = make_plan(prep.model, np.asarray(calib_images, np.float32), config=config, progress=progress)
        seconds["plan"] = time.perf_counter() - t0
    target = ta.as_target(target)
    isa = isa or ta.choose_isa(target)
    t0 = time.perf_counter()
    layer_vars = {layer.var_name: layer.name for layer in imported.layers}
    mod, report = apply_plan(imported.module, plan=plan, layer_vars=layer_vars, target=target, isa=isa,
                             kernels=kernels)
    seconds["rewrite"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    executable = ta.build_relax(mod, target=target)
    seconds["build"] = time.perf_counter() - t0
    return CompiledModel(executable=executable, imported=imported, plan=plan, rewrite=report,
                         target=target, isa=isa, seconds=seconds)
