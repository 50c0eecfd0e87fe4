"""The plan of an already-quantized (QDQ) model: its own scales and weights, no calibration.

``normalize_onnx`` has taken the activation Q/DQ pairs out of the graph (``passes.onnx_qdq``)
and folded the weights to float32, remembering their DequantizeLinear scales. Here every fused
layer whose input the model quantizes becomes a :class:`LayerPlan` with

* the input / output / residual formats the model gives those tensors (scale and zero point),
* its weights in the exact kernel form found by :func:`quant.imported.import_weights`
  (ternary per group at the group size found, else 4/8-bit per channel),

so that the library computes what the QDQ graph says, up to the requantizer's fixed-point
rounding. A layer whose input the model leaves float stays float, and says so.

Example::

    >>> prep = normalize_onnx(onnx_io.load_model("model_qdq.onnx"))  # doctest: +SKIP
    >>> plan = plan_from_model(prep)  # doctest: +SKIP
    >>> plan.decisions["conv1"].reason  # doctest: +SKIP
    'model: int8 per channel, exact'
"""

from __future__ import annotations

import time

import numpy as np

from ..numpy_graph import NumpyGraph, conv_geometry
from ..quant.imported import import_weights
from .build import QuantPlan, _run
from .config import LayerDecision, QuantConfig
from .graph import FusedLayer, analyse, node_key
from .layer import LayerPlan, integer_params


def _out_axis(node) -> int:
    """Axis of the output channels in the ONNX weight tensor of ``node``."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        attrs = {a.name: a.i for a in node.attribute if a.name == "transB"}
        return 0 if attrs.get("transB", 0) else 1
    return 1  # MatMul: [C, K]


def plan_from_model(prep, *, config: QuantConfig | None = None, exact_roundings: bool = True) -> QuantPlan:
    """The :class:`QuantPlan` a QDQ model carries (``prep``: its :class:`NormalizedOnnx`)."""
    start = time.perf_counter()
    model = prep.model
    quants = dict(prep.activation_quants)
    graph = NumpyGraph(model)
    # A tensor the model rounds stays a tensor: no fusion past it (e.g. ORT quantizes a conv's
    # output before the residual Add; the Add then runs on the dequantized values, as in ORT).
    analysis = analyse(model, materialized=frozenset(quants) if exact_roundings else frozenset())
    nodes = {node_key(n): n for n in model.graph.node}
    decisions: dict[str, LayerDecision] = {}
    found: dict[str, object] = {}
    for fused in analysis.layers:
        node = nodes[fused.name]
        why = None
        if fused.input not in quants:
            why = "float in the model (input not quantized)"
        elif fused.residual is not None and fused.residual not in quants:
            why = "float in the model (residual operand not quantized)"
        if why is None:
            scales = prep.weight_scales.get(node.input[1])
            k = fused.weight.out_channels
            per_k = None if scales is None else scales.per_output_channel(_out_axis(node), k)
            imp = import_weights(fused.weight.weight, channel_scales=per_k)
            found[fused.name] = imp
            decisions[fused.name] = LayerDecision(imp.weights.bits, f"model: {imp.description}")
        else:
            decisions[fused.name] = LayerDecision(0, why)
    quantized = {name for name, d in decisions.items() if d.bits}
    layers: dict[str, LayerPlan] = {}

    def fit(fused: FusedLayer, x: np.ndarray, float_env, env) -> LayerPlan:
        del float_env, env  # a quantized model's layers are read, not fitted to any network
        node = nodes[fused.name]
        w = fused.weight.weight
        geometry = {} if fused.weight.op_type == "dense" else conv_geometry(node, x.shape[2:], w.shape[2:])
        imp = found[fused.name]
        iw = imp.weights
        in_q = quants[fused.input]
        out_q = quants.get(fused.output)  # None: the layer's output leaves the model as float
        res_q = quants[fused.residual] if fused.residual else None
        bias = fused.weight.bias if fused.weight.bias is not None else np.zeros(w.shape[0], np.float32)
        bias_int, dequant, mult, shift, res_mult = integer_params(
            iw, bias, input_quant=in_q, output_quant=out_q, residual_quant=res_q)
        return LayerPlan(
            fused=fused, decision=decisions[fused.name], weights=iw, bias_int=bias_int,
            geometry=geometry, input_quant=in_q, output_quant=out_q, residual_quant=res_q,
            multiplier=mult, shift=shift, residual_multiplier=res_mult, dequant_scale=dequant,
            weight_error=imp.error, output_error=None)

    # One walk over a blank input: each layer's geometry comes from the shapes it sees.
    blank = np.zeros(prep.input_shape, np.float32)
    _run(graph, analysis, layers, blank, quantized=quantized, fit=fit)
    if exact_roundings:
        model = with_float_roundings(model, analysis, quantized, quants)
    return QuantPlan(config=config or QuantConfig(), model=model, analysis=analysis,
                     layers=layers, decisions=decisions, seconds=time.perf_counter() - start,
                     source="model")


def with_float_roundings(model, analysis, quantized: set[str], quants: dict):
    """``model`` with the model's rounding (a fake quantization) put back on every edge where a
    float op reads a tensor the quantized model rounds but no integer layer produces (a float
    Concat of differently scaled inputs, a float residual Add, a pool): the float op then sees
    the rounded value, as in the model. Integer layers read the tensor itself (they quantize it)."""
    import onnx

    fused_nodes: set[str] = set()
    produced = set()
    for fused in analysis.layers:
        if fused.name in quantized:
            fused_nodes.update((fused.name, fused.root, *fused.skipped))
            produced.add(fused.output)
    graph = model.graph
    wanted = {t for node in graph.node if node_key(node) not in fused_nodes
              for t in node.input if t in quants and t not in produced}
    if not wanted:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    taken = {t.name for t in g.initializer} | {o for n in g.node for o in n.output} \
        | {n.name for n in g.node}
    nodes = []
    rounded: dict[str, str] = {}  # tensor -> its rounded copy
    for node in g.node:
        if node_key(node) not in fused_nodes:
            for i, t in enumerate(node.input):
                if t not in wanted:
                    continue
                if t not in rounded:
                    prefix = f"{t}__fq"
                    while any(name.startswith(prefix) for name in taken):  # e.g. re-imported
                        prefix += "_"
                    new = _fake_quant_nodes(g, t, quants[t], prefix)
                    taken.update(o for n in new for o in n.output)
                    nodes += new
                    rounded[t] = prefix
                node.input[i] = rounded[t]
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    return out


def _fake_quant_nodes(graph, tensor: str, quant, prefix: str) -> list:
    """``(clip(round(x / s) + z, qmin, qmax) - z) * s`` as plain float ONNX ops (any bit width;
    the numpy graph and the Relax frontend both run them), reading ``tensor``, writing
    ``prefix``; every new name starts with ``prefix``."""
    import onnx
    from onnx import numpy_helper

    consts = {"s": quant.scale, "z": float(quant.zero_point), "lo": float(quant.qmin),
              "hi": float(quant.qmax)}
    names = {k: f"{prefix}_{k}" for k in consts}
    graph.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), names[k])
                             for k, v in consts.items())
    step = [("Div", [tensor, names["s"]]), ("Round", None), ("Add", [None, names["z"]]),
            ("Clip", [None, names["lo"], names["hi"]]), ("Sub", [None, names["z"]]),
            ("Mul", [None, names["s"]])]
    nodes, prev = [], None
    for i, (op, args) in enumerate(step):
        args = [prev] if args is None else [prev if a is None else a for a in args]
        out = prefix if i == len(step) - 1 else f"{prefix}{i}"
        nodes.append(onnx.helper.make_node(op, args, [out], name=f"{prefix}_{op.lower()}"))
        prev = out
    return nodes
