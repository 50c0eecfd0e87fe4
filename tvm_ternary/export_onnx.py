"""Our quantized model as standard QDQ ONNX (``compile --emit-onnx``; numpy + onnx, no TVM).

The plan's graph (normalised float32 ONNX) with, for every quantized layer:

* its weight as the exact int8 values the kernels multiply, ``q_g * v`` (FGQ ternary groups:
  ``q_g * t``), behind a per-output-channel ``DequantizeLinear`` with the scales ``s_k``;
* its bias as int32 in accumulator units (``round(b / (s_x * s_k))``) behind a
  ``DequantizeLinear`` with scale ``s_x * s_k``, as ONNX Runtime's QDQ models store biases;
* a ``QuantizeLinear -> DequantizeLinear`` pair with our scale and zero point on every integer
  tensor (each layer's input, output and residual operand).

ONNX Runtime and Netron read it as any QDQ model; ``tvm-ternary compile`` re-imports it
(:mod:`passes.onnx_qdq`, :mod:`plan.imported`) to the same integer weights, scales and
requantizers, so the re-compiled library gives the same outputs bit for bit.

Example::

    >>> emit_qdq_onnx(compiled.plan, "model_qdq.onnx")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .plan import QuantPlan
from .plan.graph import node_key

__all__ = ["emit_qdq_onnx", "qdq_model"]


def qdq_model(plan: QuantPlan) -> onnx.ModelProto:
    """The QDQ ModelProto of ``plan`` (see the module docstring)."""
    model = onnx.ModelProto()
    model.CopyFrom(plan.model)
    # Weights listed as graph inputs too (IR < 4 exporters) would be overridable inputs to ORT.
    inits_names = {t.name for t in model.graph.initializer}
    data_inputs = [v for v in model.graph.input if v.name not in inits_names]
    del model.graph.input[:]
    model.graph.input.extend(data_inputs)
    model.ir_version = max(model.ir_version, 7)
    _require_opset(model, 13)  # per-axis DequantizeLinear (before taking .graph: it replaces it)
    graph = model.graph
    nodes = {node_key(n): n for n in graph.node}
    inits: list[onnx.TensorProto] = []
    quants: dict[str, object] = {}
    for name, layer in plan.layers.items():
        node = nodes[name]
        iw = layer.weights
        w_int = iw.decode_int8()  # [K, C, R, S] / [K, C]
        axis = 0
        if node.op_type == "Gemm":
            _set_attrs(node, transB=1, alpha=1.0, beta=1.0)
        elif node.op_type == "MatMul":
            w_int, axis = np.ascontiguousarray(w_int.T), 1
        k = iw.channel_scales.shape[0]
        w_name = f"{name}__qweight"
        inits += [numpy_helper.from_array(w_int.astype(np.int8), w_name),
                  numpy_helper.from_array(iw.channel_scales.astype(np.float32), f"{w_name}_scale"),
                  numpy_helper.from_array(np.zeros(k, np.int8), f"{w_name}_zero_point")]
        graph.node.append(onnx.helper.make_node(
            "DequantizeLinear", [w_name, f"{w_name}_scale", f"{w_name}_zero_point"],
            [f"{w_name}_dequantized"], name=f"{w_name}_DequantizeLinear", axis=axis))
        node.input[1] = f"{w_name}_dequantized"
        if node.op_type in ("Conv", "Gemm"):
            b_name = f"{name}__qbias"
            inits += [numpy_helper.from_array(layer.bias_int.astype(np.int32), b_name),
                      numpy_helper.from_array(layer.dequant_scale.astype(np.float32), f"{b_name}_scale")]
            graph.node.append(onnx.helper.make_node(
                "DequantizeLinear", [b_name, f"{b_name}_scale"],
                [f"{b_name}_dequantized"], name=f"{b_name}_DequantizeLinear", axis=0))
            if len(node.input) > 2:
                node.input[2] = f"{b_name}_dequantized"
            else:
                node.input.append(f"{b_name}_dequantized")
        fused = layer.fused
        for tensor, quant in ((fused.input, layer.input_quant), (fused.output, layer.output_quant),
                              (fused.residual, layer.residual_quant)):
            if tensor and quant is not None:
                previous = quants.setdefault(tensor, quant)
                if previous != quant:
                    raise ValueError(f"tensor {tensor!r} has two formats in the plan: {previous}, {quant}")
    graph.initializer.extend(inits)
    _insert_qdq(graph, quants)
    _topological_sort(graph)
    from .passes.onnx_normalize import _drop_unused_initializers

    _drop_unused_initializers(graph)  # the float weights and biases the int8 ones replace
    onnx.checker.check_model(model)
    return model


def emit_qdq_onnx(plan: QuantPlan, path: str | Path) -> Path:
    """Write :func:`qdq_model` of ``plan`` to ``path`` (via a temporary file)."""
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        onnx.save(qdq_model(plan), str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _require_opset(model: onnx.ModelProto, version: int) -> None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version < version:
            converted = onnx.version_converter.convert_version(model, version)
            model.CopyFrom(converted)
            return


def _set_attrs(node: onnx.NodeProto, **values) -> None:
    kept = [a for a in node.attribute if a.name not in values]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in values.items())


def _insert_qdq(graph: onnx.GraphProto, quants: dict) -> None:
    """``tensor -> QuantizeLinear -> DequantizeLinear`` for each tensor in ``quants``; every
    reader of the tensor (a graph output keeps its name) reads the dequantized value."""
    outputs = {o.name for o in graph.output}
    rename = {}
    for tensor, quant in quants.items():
        base = tensor.replace("/", "_")
        zp_dtype = np.int8 if quant.signed else np.uint8
        graph.initializer.extend([
            numpy_helper.from_array(np.array(quant.scale, np.float32), f"{base}__scale"),
            numpy_helper.from_array(np.array(quant.zero_point, zp_dtype), f"{base}__zero_point")])
        args = [f"{base}__scale", f"{base}__zero_point"]
        source = tensor
        if tensor in outputs:  # the producer writes a new name; the output name is the DQ's
            source = f"{base}__float"
            for node in graph.node:
                for i, name in enumerate(node.output):
                    if name == tensor:
                        node.output[i] = source
        dq_out = tensor if tensor in outputs else f"{base}__dequantized"
        graph.node.extend([
            onnx.helper.make_node("QuantizeLinear", [source, *args], [f"{base}__quantized"],
                                  name=f"{base}_QuantizeLinear"),
            onnx.helper.make_node("DequantizeLinear", [f"{base}__quantized", *args], [dq_out],
                                  name=f"{base}_DequantizeLinear")])
        if tensor not in outputs:
            rename[tensor] = dq_out
    skip = {f"{t.replace('/', '_')}_QuantizeLinear" for t in quants}
    for node in graph.node:
        if node.name in skip:
            continue
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]


def _topological_sort(graph: onnx.GraphProto) -> None:
    available = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        progress = False
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
                progress = True
            else:
                rest.append(node)
        if not progress:
            raise ValueError(f"cannot order the emitted graph: {rest[0].name} waits on its inputs")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
