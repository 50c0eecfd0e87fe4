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

    def vm(self):
        return ta.relax_vm(self.executable)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run on ``x`` stacked along axis 0 (one call per sample when the model's batch is 1)."""
        vm = self.vm()
        batch = self.imported.input_shape[0]
        x = np.asarray(x, dtype=np.float32)
        outs = [ta.run_relax_vm(vm, x[i : i + batch])[0] for i in range(0, len(x), batch)]
        return np.concatenate(outs)


def compile_model(model, *, config: QuantConfig, calib_images: np.ndarray, target=None,
                  input_shapes=None, plan: QuantPlan | None = None, isa: str | None = None,
                  progress: bool = True) -> CompiledModel:
    """Quantize and compile an ONNX CNN (path or ModelProto) for ``target`` (default: host)."""
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
    mod, report = apply_plan(imported.module, plan=plan, layer_vars=layer_vars, target=target, isa=isa)
    seconds["rewrite"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    executable = ta.build_relax(mod, target=target)
    seconds["build"] = time.perf_counter() - t0
    return CompiledModel(executable=executable, imported=imported, plan=plan, rewrite=report,
                         target=target, isa=isa, seconds=seconds)
