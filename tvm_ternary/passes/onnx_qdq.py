"""Read a QDQ-quantized ONNX graph: constant weight chains folded, activation Q/DQ taken out.

QDQ models (ONNX Runtime's ``quantize_static``, NNCF/OpenVINO, torch PT2E, brevitas' QCDQ
export) say how every tensor is quantized with ``QuantizeLinear -> DequantizeLinear`` pairs
around float ops. This module turns such a graph into the float graph the rest of the compiler
plans on, plus what the pairs said (numpy + onnx, no TVM):

* **weights**: constant chains (``QuantizeLinear -> Clip -> DequantizeLinear`` of brevitas,
  ``DequantizeLinear`` of int8 initializers, ``Slice``/``Reshape``/... of constants) are folded
  to float32 initializers; the DequantizeLinear scale of each is remembered
  (:class:`WeightScale`) so the weight can be taken back to exact integers;
* **activations**: each ``QuantizeLinear(x) -> DequantizeLinear`` pair on a run-time tensor is
  removed (its consumers read ``x``) and ``x`` gets an :class:`ActivationQuant` with the
  pair's scale and zero point (u8/s8, per tensor).

Anything we cannot represent exactly is refused with one line naming the node: a per-channel
activation scale, a 16-bit activation type (8- and opset-21 4-bit types are read), a QuantizeLinear whose output is not only
dequantized again, a DequantizeLinear of a run-time tensor without its QuantizeLinear.

Example::

    >>> from onnx import TensorProto, helper, numpy_helper
    >>> import numpy as np
    >>> init = [numpy_helper.from_array(np.array(0.5, np.float32), "s"),
    ...         numpy_helper.from_array(np.array(3, np.uint8), "z")]
    >>> nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q0"),
    ...          helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dq0"),
    ...          helper.make_node("Relu", ["d"], ["y"], name="relu")]
    >>> g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
    ...                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], init)
    >>> graph = helper.make_model(g).graph
    >>> found = strip_activation_qdq(graph)
    >>> found.activations["x"], [n.op_type for n in graph.node], list(graph.node[0].input)
    (ActivationQuant(bits=8, signed=False, scale=0.5, zero_point=3), ['Relu'], ['x'])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import UserError
from ..quant import ActivationQuant

__all__ = ["WeightScale", "QdqFound", "fold_constant_chains", "strip_activation_qdq",
           "UnsupportedQuantizationError"]

# Ops folded when every input is a constant (what exporters put on weight paths).
FOLDABLE_OPS = ("QuantizeLinear", "DequantizeLinear", "Clip", "Slice", "Reshape", "Transpose",
                "Identity", "Cast", "Squeeze", "Unsqueeze", "Mul", "Div", "Neg", "Round",
                "Sign", "Abs", "Concat", "Constant")
# storage type name -> (bits, signed); 4-bit types are ONNX opset 21's uint4 / int4
ACTIVATION_TYPES = {"uint8": (8, False), "int8": (8, True), "uint4": (4, False), "int4": (4, True)}
# QONNX (FINN / brevitas export_qonnx): Quant(x, scale, zeropt, bitwidth) = fake quantization
QONNX_OPS = ("Quant", "BipolarQuant")


class UnsupportedQuantizationError(UserError):
    """A quantized construct the compiler cannot execute exactly (names the node)."""


@dataclass(frozen=True, eq=False)
class WeightScale:
    """The DequantizeLinear that produced a folded constant: ``w = scale * (q - zero_point)``."""

    scale: np.ndarray
    axis: int
    block_size: int
    dtype: str  # storage dtype of q

    def per_output_channel(self, out_axis: int, out_channels: int) -> np.ndarray | None:
        """The scale per output channel, or None when it is not one (blocked, other axis)."""
        if self.scale.size == 1:
            return np.full(out_channels, float(self.scale.reshape(())), np.float32)
        if self.block_size == 0 and self.scale.ndim == 1 and self.axis == out_axis \
                and self.scale.size == out_channels:
            return self.scale.astype(np.float32)
        return None


@dataclass
class QdqFound:
    activations: dict[str, ActivationQuant] = field(default_factory=dict)
    pairs: int = 0  # activation Q/DQ pairs removed


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _node_label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node {node.name or node.output[0]!r}"


def fold_constant_chains(graph: onnx.GraphProto, opset: int,
                         weight_scales: dict[str, WeightScale],
                         source_dtypes: dict[str, str]) -> int:
    """Evaluate nodes of :data:`FOLDABLE_OPS` whose inputs are all constants, in place.

    DequantizeLinear outputs remember their scale in ``weight_scales`` and their storage dtype
    in ``source_dtypes``. Returns the number of nodes folded.
    """
    from .onnx_normalize import _drop_unused_initializers
    from ..onnx_io import _dequantize_linear

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    keep, folded = [], 0
    for node in graph.node:
        args = [n for n in node.input if n]
        if (node.op_type not in FOLDABLE_OPS and node.op_type not in QONNX_OPS) \
                or not all(n in values for n in args) \
                or len(node.output) != 1 \
                or any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute):
            keep.append(node)
            continue
        attrs = _attrs(node)
        if node.op_type in QONNX_OPS:
            out, scale = _qonnx_value(node, [values[n] for n in node.input])
            axes = [i for i, d in enumerate(scale.shape) if d > 1]
            if scale.size == 1 or len(axes) == 1:
                weight_scales[node.output[0]] = WeightScale(
                    scale.reshape(-1).astype(np.float32), axes[0] if axes else 0, 0, "qonnx")
            source_dtypes[node.output[0]] = "qonnx"
        elif node.op_type == "DequantizeLinear":
            q, scale = values[args[0]], values[args[1]]
            zp = values[args[2]] if len(args) > 2 else None
            axis, block = int(attrs.get("axis", 1)), int(attrs.get("block_size", 0))
            if axis < 0:
                axis += q.ndim
            out = _dequantize_linear(q, scale, zp, axis=axis, block_size=block)
            weight_scales[node.output[0]] = WeightScale(np.asarray(scale, np.float32), axis, block,
                                                        q.dtype.name)
            source_dtypes[node.output[0]] = q.dtype.name
        else:
            out = _evaluate(node, {n: values[n] for n in dict.fromkeys(args)}, opset)
            # a quantized weight passed on unchanged keeps its provenance (storage dtype)
            for src in args[:1]:
                if src in weight_scales and node.op_type in ("Identity", "Reshape", "Transpose",
                                                             "Squeeze", "Unsqueeze"):
                    source_dtypes.setdefault(node.output[0], source_dtypes.get(src, "float32"))
        out = np.asarray(out)
        values[node.output[0]] = out
        graph.initializer.append(numpy_helper.from_array(out, node.output[0]))
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
        _drop_unused_initializers(graph)
    return folded


def _evaluate(node: onnx.NodeProto, inputs: dict[str, np.ndarray], opset: int) -> np.ndarray:
    """One standard ONNX node on constant inputs, with ONNX's reference implementation."""
    from onnx.reference import ReferenceEvaluator

    info = [onnx.helper.make_tensor_value_info(
        name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
        for name, value in inputs.items()]
    out = onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.UNDEFINED, None)
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "fold", info, [out]),
                                   opset_imports=[onnx.helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model).run(None, inputs)[0]


def strip_activation_qdq(graph: onnx.GraphProto) -> QdqFound:
    """Remove activation ``QuantizeLinear -> DequantizeLinear`` pairs, in place (see module)."""
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    found = QdqFound()
    producer = {out: n for n in graph.node for out in n.output}
    drop: set[int] = set()
    rename: dict[str, str] = {}  # DequantizeLinear output -> the float tensor it stands for
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] not in inits:
            source = producer.get(node.input[0])
            if source is None or source.op_type != "QuantizeLinear":
                raise UnsupportedQuantizationError(
                    f"{_node_label(node)}: dequantizes a run-time tensor that no QuantizeLinear "
                    "produces (integer model inputs are not supported)")
        if node.op_type in QONNX_OPS:
            found.activations.setdefault(node.input[0], _qonnx_activation(node, inits))
            if found.activations[node.input[0]] != _qonnx_activation(node, inits):
                raise UnsupportedQuantizationError(
                    f"{_node_label(node)}: tensor {node.input[0]!r} is quantized twice with different scales")
            rename[node.output[0]] = node.input[0]
            drop.add(id(node))
            found.pairs += 1
            continue
        if node.op_type != "QuantizeLinear":
            continue
        quant = _activation_quant(node, inits)
        users = consumers.get(node.output[0], [])
        if node.output[0] in outputs or not users or any(u.op_type != "DequantizeLinear" for u in users):
            raise UnsupportedQuantizationError(
                f"{_node_label(node)}: its integer output is used other than by DequantizeLinear "
                "(integer model outputs and integer ops are not supported)")
        for dq in users:
            dq_quant = _activation_quant(dq, inits, what="DequantizeLinear")
            if dq_quant != quant:
                raise UnsupportedQuantizationError(
                    f"{_node_label(dq)}: scale/zero point differ from its QuantizeLinear "
                    f"{node.name or node.output[0]!r}")
            rename[dq.output[0]] = node.input[0]
            drop.add(id(dq))
        drop.add(id(node))
        x = node.input[0]
        previous = found.activations.get(x)
        if previous is not None and previous != quant:
            raise UnsupportedQuantizationError(
                f"{_node_label(node)}: tensor {x!r} is quantized twice with different scales")
        found.activations[x] = quant
        found.pairs += 1
    if not drop:
        return found

    def resolve(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    kept = []
    for node in graph.node:
        if id(node) in drop:
            continue
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = resolve(name)
        kept.append(node)
    # A dequantized graph output keeps its name: an Identity from the float tensor.
    for out in graph.output:
        if out.name in rename:
            kept.append(onnx.helper.make_node("Identity", [resolve(out.name)], [out.name],
                                              name=f"{out.name}__dequantized"))
    del graph.node[:]
    graph.node.extend(kept)
    from .onnx_normalize import _drop_unused_initializers

    _drop_unused_initializers(graph)
    return found


def _activation_quant(node: onnx.NodeProto, inits: dict, what: str = "QuantizeLinear") -> ActivationQuant:
    label = _node_label(node)
    if len(node.input) < 2 or node.input[1] not in inits:
        raise UnsupportedQuantizationError(f"{label}: the scale is not a constant")
    scale = np.asarray(inits[node.input[1]])
    zp = np.asarray(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
    if scale.size != 1 or (zp is not None and zp.size != 1):
        raise UnsupportedQuantizationError(
            f"{label}: per-channel activation scale ({scale.size} scales) is not supported; "
            "activations must be quantized per tensor")
    if zp is None:
        dtype = "uint8"
        attrs = _attrs(node)
        if "output_dtype" in attrs and attrs["output_dtype"]:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(attrs["output_dtype"])).name
    else:
        dtype = zp.dtype.name
    if dtype not in ACTIVATION_TYPES:
        raise UnsupportedQuantizationError(
            f"{label}: activation type {dtype} is not supported ({', '.join(ACTIVATION_TYPES)} are)")
    value = float(scale.reshape(()))
    if not (np.isfinite(value) and value > 0):
        raise UnsupportedQuantizationError(f"{label}: scale {value} is not a positive number")
    bits, signed = ACTIVATION_TYPES[dtype]
    return ActivationQuant(bits=bits, signed=signed, scale=value,
                           zero_point=0 if zp is None else int(zp.reshape(())))


def _qonnx_bounds(signed: bool, narrow: bool, bits: int) -> tuple[int, int]:
    if signed:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1 - int(narrow)


def _qonnx_value(node: onnx.NodeProto, args: list) -> tuple[np.ndarray, np.ndarray]:
    """QONNX semantics of a constant Quant / BipolarQuant: (fake-quantized value, scale)."""
    attrs = _attrs(node)
    x, scale = np.asarray(args[0], np.float32), np.asarray(args[1], np.float32)
    if node.op_type == "BipolarQuant":
        return (np.where(x >= 0, 1.0, -1.0).astype(np.float32) * scale).astype(np.float32), scale
    zp, bits = np.asarray(args[2], np.float32), int(np.asarray(args[3]).reshape(()))
    mode = attrs.get("rounding_mode", b"ROUND")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    rounders = {"ROUND": np.rint, "FLOOR": np.floor, "CEIL": np.ceil, "ROUND_TO_ZERO": np.trunc}
    if mode not in rounders:
        raise UnsupportedQuantizationError(f"{_node_label(node)}: rounding mode {mode} is not supported")
    lo, hi = _qonnx_bounds(bool(attrs.get("signed", 1)), bool(attrs.get("narrow", 0)), bits)
    q = np.clip(rounders[mode](x.astype(np.float64) / scale + zp), lo, hi)
    return ((q - zp) * scale).astype(np.float32), scale


def _qonnx_activation(node: onnx.NodeProto, inits: dict) -> ActivationQuant:
    """The format a QONNX Quant gives a run-time tensor (per tensor, 4 or 8 bits, full range)."""
    label = _node_label(node)
    if node.op_type == "BipolarQuant":
        raise UnsupportedQuantizationError(f"{label}: binary (bipolar) activations are not supported")
    if any(n not in inits for n in node.input[1:4]):
        raise UnsupportedQuantizationError(f"{label}: scale, zero point and bit width must be constants")
    scale, zp, bits = (np.asarray(inits[n]) for n in node.input[1:4])
    attrs = _attrs(node)
    mode = attrs.get("rounding_mode", b"ROUND")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if scale.size != 1 or zp.size != 1:
        raise UnsupportedQuantizationError(
            f"{label}: per-channel activation scale ({scale.size} scales) is not supported; "
            "activations must be quantized per tensor")
    bits = float(bits.reshape(()))
    signed, narrow = bool(attrs.get("signed", 1)), bool(attrs.get("narrow", 0))
    if bits not in (4.0, 8.0) or narrow or mode != "ROUND":
        raise UnsupportedQuantizationError(
            f"{label}: {bits:g}-bit{' narrow-range' if narrow else ''} activations with rounding "
            f"{mode} are not supported (4 or 8 bits, full range, ROUND are)")
    z = float(zp.reshape(()))
    if z != round(z):
        raise UnsupportedQuantizationError(f"{label}: zero point {z} is not an integer")
    value = float(scale.reshape(()))
    if not (np.isfinite(value) and value > 0):
        raise UnsupportedQuantizationError(f"{label}: scale {value} is not a positive number")
    try:
        return ActivationQuant(bits=int(bits), signed=signed, scale=value, zero_point=int(z))
    except ValueError as error:
        raise UnsupportedQuantizationError(f"{label}: {error}") from None
