"""The compile flow: ONNX in, quantized Relax module and deployable shared library out.

    normalize ONNX (once) -> plan (numpy: policy, calibration, per-layer quantization) ->
    import plan.model to Relax (passes.import_onnx: layer weights as named parameters) -> apply
    the plan (passes.quantize_graph: pattern passes; kernels with packed weights and fused
    epilogues, integer NHWC between layers) -> build -> export .so + sidecar

Example::

    >>> cm = compile_model("model.onnx", config=QuantConfig(), calib_images=images)  # doctest: +SKIP
    >>> logits = cm.run(images[:1])  # doctest: +SKIP
    >>> cm.export("model.so")  # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import tvm_adapter as ta
from .passes.import_onnx import ImportedModel, import_onnx
from .passes.onnx_normalize import prepare
from .passes.quantize_graph import RewriteReport, apply_plan
from .plan import QuantConfig, QuantPlan, make_plan, plan_from_model


@dataclass(frozen=True, eq=False)
class CompiledModel:
    """What :func:`tvm_ternary.compile` returns: ``run(x)``, ``export(path)``, ``coverage``."""

    executable: object
    imported: ImportedModel
    plan: QuantPlan
    rewrite: RewriteReport
    target: object
    isa: str
    seconds: dict
    preprocess: object = None  # a PreprocessConfig recorded in the sidecar, or None
    calibration: dict | None = None  # which images calibrated it (source, seed, files), for the sidecar

    @property
    def coverage(self) -> list[dict]:
        """One row per conv/dense layer: weights (ternary / int4 / int8 / float), why, what was
        fused, status (kernel, or why it stayed float), schedule, errors, MACs."""
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
            row["kernel"] = kernel  # the library function running the layer (bench --profile)
            # which kernel, for a reader: its function, weight format, group size and ISA
            spec = self.rewrite.specs.get(kernel) if kernel else None
            form = self.rewrite.forms.get(kernel)
            # N as planned (an unpacked ternary kernel computes it as one 8-bit code per channel)
            row["kernel_format"] = None if spec is None else (
                f"{kernel} ({row['weights']}, N={self.plan.layers[row['layer']].weights.group_size}, "
                f"{self.rewrite.kernels[kernel]}"
                + (f" + {_FORM_WORDS.get(form, form)}" if form else "") + ")")
        return coverage

    def sidecar(self, *, library_sha256: str, preprocess=None, calibration: dict | None = None) -> dict:
        """What a user (and :mod:`tvm_ternary.runtime`) needs to know about the library."""
        from dataclasses import asdict

        from . import __version__
        from .runtime import SIDECAR_FORMAT

        im = self.imported
        preprocess = self.preprocess if preprocess is None else preprocess
        return {
            "format": SIDECAR_FORMAT,
            "library_sha256": library_sha256,
            "input": {"name": im.input_name, "shape": list(im.input_shape), "dtype": im.input_dtype},
            "output": {"name": im.output_name, "shape": list(im.output_shape), "dtype": im.output_dtype},
            "preprocess": None if preprocess is None else preprocess.to_dict(),
            "quant_config": asdict(self.plan.config),
            "quantization": self.plan.source,  # "calibrated" | "model" (imported QDQ)
            # which images calibrated the plan (files / seed from the CLI) and which of them the
            # sequential fit used
            "calibration": {**((self.calibration or {}) if calibration is None else calibration),
                            **self.plan.calibration},
            "tvm_version": ta.tvm_version(),
            "tvm_ternary_version": __version__,
            "target": {"mcpu": ta.target_mcpu(self.target), "isa": self.isa},
            "required_cpu_features": ta.target_features(self.target),
            "coverage": self.coverage,
            "integer_ops": self.rewrite.integer_ops,
            "float_ops": float_ops(self.plan, self.rewrite),
            "import_notes": list(im.notes),
        }

    def export(self, path: str | Path, *, preprocess=None, calibration: dict | None = None) -> dict:
        """Write ``path`` (.so, weights and :mod:`manifest` embedded) and its sidecar
        ``path.json``; returns the sidecar. Both are written under temporary names unique to
        this call first (two compiles to one path never share one), then renamed: a failure
        leaves neither, and the sidecar's SHA-256 ties it to its very library."""
        import json
        import os
        import tempfile

        from . import manifest
        from .runtime import file_sha256, sidecar_path

        path = Path(path)
        tmps = []
        try:
            for suffix in (".tmp.so", ".tmp.json"):
                fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
                os.close(fd)
                tmps.append(Path(name))
            tmp_lib, tmp_side = tmps
            fields = manifest.manifest_of(self.sidecar(library_sha256="", preprocess=preprocess,
                                                       calibration=calibration))
            with tempfile.TemporaryDirectory(prefix="tvm_ternary_manifest_") as work:
                ta.export_library(self.executable, str(tmp_lib),
                                  addons=[str(manifest.write_source(fields, work))])
            meta = self.sidecar(library_sha256=file_sha256(tmp_lib), preprocess=preprocess,
                                calibration=calibration)
            tmp_side.write_text(json.dumps(meta, indent=1))
            os.chmod(tmp_lib, 0o755 & ~_umask())  # mkstemp makes 0600; a library is 0755
            os.chmod(tmp_side, 0o644 & ~_umask())
            os.replace(tmp_lib, path)
            os.replace(tmp_side, sidecar_path(path))
        finally:
            for tmp in tmps:
                tmp.unlink(missing_ok=True)
        return meta

    def vm(self):
        return ta.relax_vm(self.executable)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run on ``x`` stacked along axis 0 (one call per sample when the model's batch is 1)."""
        from .cpu_features import missing_features
        from .errors import TargetError, UserError

        missing = missing_features(ta.target_features(self.target))
        if missing:  # running it here would be a SIGILL, not an error
            raise TargetError(f"this model was compiled for {ta.target_mcpu(self.target)}, which needs CPU "
                              f"features this host lacks: {', '.join(missing)}; export it and run it there")
        shape = tuple(self.imported.input_shape)
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != len(shape) or x.shape[1:] != shape[1:] or x.shape[0] % shape[0]:
            raise UserError(f"input shape {tuple(x.shape)} does not match the model's {shape} "
                            f"(samples may be stacked along axis 0)")
        vm = self.vm()
        batch = shape[0]
        outs = [ta.run_relax_vm(vm, x[i : i + batch])[0] for i in range(0, len(x), batch)]
        return np.concatenate(outs)


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


# How a kernel's form reads in the coverage report ("amx": schedules/amx.py; "unpacked":
# compute.unpacked_spec, the ternary weights stored as their int8 words q_g * t)
_FORM_WORDS = {"amx": "amx tiles", "unpacked": "unpacked int8 words"}
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


def plan_model(prep, *, config: QuantConfig, calib_images, progress: bool = True) -> QuantPlan:
    """The plan of a normalised model: a QDQ model's own (:func:`plan.plan_from_model`), else
    fitted on ``calib_images`` (:func:`plan.make_plan`)."""
    if prep.is_quantized:
        return plan_from_model(prep, config=config)
    if calib_images is None:
        raise ValueError("a float model needs calib_images (activation scales come from them)")
    return make_plan(prep.model, np.asarray(calib_images, np.float32), config=config, progress=progress)


def compile_model(model, *, config: QuantConfig, calib_images: np.ndarray | None = None,
                  target=None, input_shapes=None, plan: QuantPlan | None = None,
                  isa: str | None = None, progress: bool = True, kernels=None,
                  preprocess=None, prepared=None) -> CompiledModel:
    """Quantize and compile an ONNX CNN (path or ModelProto) for ``target`` (default: host).

    A model that is already quantized (QDQ: activation QuantizeLinear/DequantizeLinear pairs)
    is compiled as it is (:func:`plan.plan_from_model`): its scales, zero points and weights,
    no calibration; ``calib_images`` is then not used. A float model needs ``calib_images``.

    ``kernels``: a kernel provider for :func:`passes.quantize_graph.apply_plan` (e.g.
    ``tuning.apply.TunedKernels`` for tuned schedules); default schedules when None.
    ``preprocess``: recorded in the exported sidecar. ``prepared``: ``model`` already normalised
    (``normalize_onnx(model, input_shapes=...)``, e.g. for the caller's checks), so that it is
    normalised once per compile. The public entry point, which validates
    its arguments and reads calibration images from files, is :func:`tvm_ternary.compile`."""
    seconds = {}
    start = time.perf_counter()
    prep = prepare(model, input_shapes=input_shapes, prepared=prepared)  # the one normalisation
    seconds["normalize"] = time.perf_counter() - start
    if plan is None:
        t0 = time.perf_counter()
        plan = plan_model(prep, config=config, calib_images=calib_images, progress=progress)
        seconds["plan"] = time.perf_counter() - t0
    # The Relax module is imported from the graph the plan was made on (for an imported QDQ
    # model: with the model's roundings on float paths, plan.imported.with_float_roundings).
    t0 = time.perf_counter()
    imported = import_onnx(None, prepared=replace(prep, model=plan.model))
    seconds["import"] = time.perf_counter() - t0
    target = ta.as_target(target)
    isa = isa or ta.choose_isa(target)
    t0 = time.perf_counter()
    mod, report = apply_plan(imported, plan=plan, target=target, isa=isa, kernels=kernels)
    seconds["rewrite"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    executable = ta.build_relax(mod, target=target)
    seconds["build"] = time.perf_counter() - t0
    return CompiledModel(executable=executable, imported=imported, plan=plan, rewrite=report,
                         target=target, isa=isa, seconds=seconds, preprocess=preprocess)
