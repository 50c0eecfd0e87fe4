"""Normalise an ONNX graph before the Relax import (onnx + numpy, no TVM).

The Relax frontend imports what the graph says: an fp16 model becomes fp16 Relax, an int8 weight
behind ``DequantizeLinear`` becomes a ``relax.dequantize`` call that ``FoldConstant`` has to
compile op by op (5 s for MobileNetV2). Doing both rewrites here, in numpy, keeps the imported
module float32 with plain constant weights, and lets us remember where each weight came from
(the ternarize pass re-quantizes int8 weights; the coverage report says they were int8).

Example::

    >>> from onnx import TensorProto, helper
    >>> graph = helper.make_graph(
    ...     [helper.make_node("Relu", ["x"], ["y"])], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 4])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 4])])
    >>> prep = normalize_onnx(helper.make_model(graph), input_shapes={"x": (1, 4)})
    >>> prep.input_name, prep.input_shape, prep.input_dtype, prep.fp16_converted
    ('x', (1, 4), 'float16', True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

# One DequantizeLinear implementation for the project: onnx_io's (per tensor, per axis, blocked).
from tvm_ternary import onnx_io
from tvm_ternary.onnx_io import _dequantize_linear
from tvm_ternary.errors import UserError
from tvm_ternary.passes.onnx_qdq import fold_constant_chains, strip_activation_qdq

__all__ = ["NormalizedOnnx", "normalize_onnx", "parse_input_shape"]

_FP16, _FP32 = TensorProto.FLOAT16, TensorProto.FLOAT


@dataclass(frozen=True)
class NormalizedOnnx:
    """A float32 copy of the model plus what the rewrite had to forget."""

    model: onnx.ModelProto
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: str  # as the ONNX model declares it: what a user feeds
    output_name: str
    output_shape: tuple[int, ...] | None  # None when the graph does not say
    output_dtype: str
    opset: int
    fp16_converted: bool
    # tensor name -> original storage dtype, for every constant that was not float32
    source_dtypes: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    # QDQ models (onnx_qdq): the format of every tensor a Q/DQ pair quantized, and the
    # DequantizeLinear scale of every folded weight
    activation_quants: Mapping[str, object] = field(default_factory=dict)
    weight_scales: Mapping[str, object] = field(default_factory=dict)

    @property
    def is_quantized(self) -> bool:
        """The model carries its own activation quantization (QDQ): no calibration needed."""
        return bool(self.activation_quants)


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse the CLI's ``NAME:1,3,224,224``.

    Example::

        >>> parse_input_shape("data_0:1,3,224,224")
        ('data_0', (1, 3, 224, 224))
    """
    name, sep, dims = text.rpartition(":")  # rpartition: ONNX names may contain ':'
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d <= 0 for d in shape):
        raise UserError(f"--input-shape {text!r}: expected NAME:D0,D1,... with positive dims")
    return name, shape


def prepare(model, *, input_shapes=None, prepared: "NormalizedOnnx | None" = None) -> "NormalizedOnnx":
    """``prepared`` if the caller already normalised the model (so it is normalised once per
    compile, tune or eval), else ``model`` (a path or ModelProto) loaded and normalised."""
    if prepared is not None:
        return prepared
    if not isinstance(model, onnx.ModelProto):
        model = onnx_io.load_model(model)
    return normalize_onnx(model, input_shapes=input_shapes)


def normalize_onnx(
    model: onnx.ModelProto, *, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> NormalizedOnnx:
    """Copy ``model`` with a static input shape, fp32 compute and DequantizeLinear weights folded.

    Raises :class:`UserError` for a model with other than one data input, a dynamic input
    dimension not fixed by ``input_shapes``, or an ``input_shapes`` entry that does not fit.
    """
    model = _copy(model)
    graph = model.graph
    notes: list[str] = []
    source_dtypes: dict[str, str] = {}
    opset = _default_opset(model)

    initializers = {t.name for t in graph.initializer}
    data_inputs = [v for v in graph.input if v.name not in initializers]
    if len(data_inputs) != 1:
        names = ", ".join(v.name for v in data_inputs) or "none"
        raise UserError(f"the model must have exactly one data input; it has: {names}")
    data_input = data_inputs[0]
    if len(graph.input) > 1:
        # IR < 4 exporters (Caffe2) list every weight as a graph input too; the initializer is
        # the value, and the frontend already binds it as a constant.
        notes.append(f"{len(graph.input) - 1} weights listed as graph inputs bound as constants")
    input_shape = _static_input_shape(data_input, input_shapes or {}, notes)
    input_dtype = _dtype_name(data_input.type.tensor_type.elem_type)

    if len(graph.output) != 1:
        raise UserError(f"the model must have exactly one output; it has {len(graph.output)}")
    output = graph.output[0]
    output_dtype = _dtype_name(output.type.tensor_type.elem_type)
    out_dims = output.type.tensor_type.shape.dim
    output_shape = (
        tuple(int(d.dim_value) for d in out_dims)
        if out_dims and all(d.HasField("dim_value") for d in out_dims) else None
    )

    weight_scales: dict = {}
    n_before = sum(node.op_type == "DequantizeLinear" for node in graph.node)
    if fold_constant_chains(graph, opset, weight_scales, source_dtypes):
        folded = n_before - sum(node.op_type == "DequantizeLinear" for node in graph.node)
        if folded:
            notes.append(f"{folded} DequantizeLinear weights folded to float32 constants")
    qdq = strip_activation_qdq(graph)
    if qdq.pairs:
        notes.append(f"{qdq.pairs} activation QuantizeLinear/DequantizeLinear pairs read "
                     f"({len(qdq.activations)} quantized tensors)")
    fp16 = _convert_fp16(graph, source_dtypes)
    if fp16:
        notes.append("float16 model converted to float32 compute (input dtype kept: float16)")
    bn = fold_batchnorm(graph, source_dtypes)
    if bn:
        notes.append(f"{bn} BatchNormalization folded into the Conv before it")
    renamed = _unique_node_names(graph)
    if renamed:
        notes.append(f"{renamed} node(s) sharing a name renamed NAME:OUTPUT (ONNX allows it; "
                     "layers are named by node)")
    return NormalizedOnnx(
        model=model, input_name=data_input.name, input_shape=input_shape,
        input_dtype=input_dtype, output_name=output.name, output_shape=output_shape,
        output_dtype=output_dtype, opset=opset, fp16_converted=fp16,
        source_dtypes=source_dtypes, notes=tuple(notes),
        activation_quants=qdq.activations, weight_scales=weight_scales,
    )


def weight_source_dtype(model: onnx.ModelProto, prep: NormalizedOnnx, weight_name: str) -> str:
    """Original storage dtype of a weight tensor, following Identity/Cast/Transpose producers."""
    producers = {out: node for node in model.graph.node for out in node.output}
    name = weight_name
    for _ in range(16):  # constant chains are short; the bound only guards against cycles
        if name in prep.source_dtypes:
            return prep.source_dtypes[name]
        node = producers.get(name)
        if node is None or node.op_type not in ("Identity", "Cast", "Transpose") or not node.input:
            break
        name = node.input[0]
    return "float32"


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def _dtype_name(elem_type: int) -> str:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name


# Largest input (values per call) accepted: 1 GiB of float32. ImageNet CNNs take 150k; a shape
# past this is a typo or a bogus declaration, and would end in a MemoryError much later.
MAX_INPUT_VALUES = 1 << 28


def _static_input_shape(
    value: onnx.ValueInfoProto, overrides: Mapping[str, Sequence[int]], notes: list[str]
) -> tuple[int, ...]:
    unknown = set(overrides) - {value.name}
    if unknown:
        raise UserError(
            f"--input-shape names {', '.join(sorted(unknown))}, but the model input is "
            f"{value.name!r}")
    dims = value.type.tensor_type.shape.dim
    declared = [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in dims]
    if value.name in overrides:
        shape = tuple(int(d) for d in overrides[value.name])
        if dims and len(shape) != len(declared):
            raise UserError(f"--input-shape {value.name}: rank {len(shape)} does not match the "
                            f"model's rank {len(declared)}")
        clash = [i for i, (d, s) in enumerate(zip(declared, shape)) if d is not None and d != s]
        if clash:
            raise UserError(f"--input-shape {value.name}: dim {clash[0]} is fixed to "
                            f"{declared[clash[0]]} in the model, not {shape[clash[0]]}")
        notes.append(f"input shape set to {shape} by --input-shape")
    else:
        if not dims or None in declared:
            which = "batch" if dims and declared[0] is None else "a"
            # the batch is 1; any other free dim is the user's to choose (its symbolic name, e.g. H)
            example = ",".join(str(d) if d else "1" if i == 0 else (dims[i].dim_param or "?")
                               for i, d in enumerate(declared)) if dims else "1,3,224,224"
            free = [i for i, d in enumerate(declared) if d is None and i > 0] if dims else []
            hint = (f" with {', '.join(dims[i].dim_param or f'dim {i}' for i in free)} the size the model "
                    "expects (e.g. 224)") if free else ""
            raise UserError(
                f"input {value.name!r} has {which} dynamic dimension; give a static shape with "
                f"--input-shape {value.name}:{example}{hint}")
        shape = tuple(declared)
    values = int(np.prod(shape, dtype=np.int64))
    if values > MAX_INPUT_VALUES:
        raise UserError(f"input {value.name!r} of shape {shape} has {values:,} values ({values * 4 / 2**30:.0f} GiB "
                        f"as float32), more than the {MAX_INPUT_VALUES:,} this compiler handles; check the "
                        "model's declared shape or --input-shape")
    # Write the static shape into the graph, so the frontend and shape inference agree.
    del value.type.tensor_type.shape.dim[:]
    for d in shape:
        value.type.tensor_type.shape.dim.add().dim_value = d
    return shape


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
    # Subgraphs (If/Loop bodies) may read outer initializers; keep everything then.
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in graph.node for a in node.attribute):
        return
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    kept_inputs = [v for v in graph.input if v.name in used]
    del graph.input[:]
    graph.input.extend(kept_inputs)


def fold_batchnorm(graph: onnx.GraphProto, source_dtypes: dict[str, str] | None = None) -> int:
    """Fold inference ``Conv -> BatchNormalization`` pairs into the Conv, in place.

    The numpy plan (``plan.graph``) fuses ``conv [-> Add] [-> Relu]`` chains on the ONNX graph;
    a BN left between a conv and its ReLU would break the chain (and calibrate the conv output
    before the BN), while the Relax import folds the same BN: the two would disagree. Folded
    only when the Conv's output feeds nothing but the BN and every parameter is an
    initializer; other BNs stay and run as scale/shift. Returns the number folded.
    """
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    producers = {out: node for node in graph.node for out in node.output}
    dropped, folded = set(), 0
    for index, bn in enumerate(graph.node):
        conv = producers.get(bn.input[0]) if bn.op_type == "BatchNormalization" else None
        if conv is None or conv.op_type != "Conv" or users[conv.output[0]] != 1 \
                or conv.output[0] in outputs or len([o for o in bn.output if o]) != 1 \
                or not all(n in inits for n in list(bn.input[1:5]) + list(conv.input[1:])):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in bn.attribute}
        if attrs.get("training_mode", 0):
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        inv = gamma / np.sqrt(var + attrs.get("epsilon", 1e-5))
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 \
            and conv.input[2] else np.zeros(w.shape[0])
        # fresh names: a weight shared with another node must keep its value there
        w_name, b_name = f"{conv.input[1]}__bnfold", f"{bn.output[0]}__bnfold_bias"
        graph.initializer.append(numpy_helper.from_array(
            (w * inv.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32), w_name))
        graph.initializer.append(numpy_helper.from_array(((b - mean) * inv + beta).astype(np.float32), b_name))
        if source_dtypes is not None and conv.input[1] in source_dtypes:
            source_dtypes[w_name] = source_dtypes[conv.input[1]]
        del conv.input[1:]
        conv.input.extend([w_name, b_name])
        conv.output[0] = bn.output[0]
        dropped.add(index)
        folded += 1
    if folded:
        kept = [n for i, n in enumerate(graph.node) if i not in dropped]
        del graph.node[:]
        graph.node.extend(kept)
        _drop_unused_initializers(graph)
    return folded


def _convert_fp16(graph: onnx.GraphProto, source_dtypes: dict[str, str]) -> bool:
    """Turn every float16 tensor, type and cast target of ``graph`` into float32, in place."""
    changed = False
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type == _FP16:
            source_dtypes.setdefault(tensor.name, "float16")
            values = numpy_helper.to_array(tensor).astype(np.float32)
            graph.initializer[i].CopyFrom(numpy_helper.from_array(values, tensor.name))
            changed = True
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.tensor_type.elem_type == _FP16:
            value.type.tensor_type.elem_type = _FP32
            changed = True
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == _FP16:
                attr.i = _FP32
                changed = True
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == _FP16:
                values = numpy_helper.to_array(attr.t).astype(np.float32)
                attr.t.CopyFrom(numpy_helper.from_array(values, attr.t.name))
                changed = True
    return changed


def _unique_node_names(graph) -> int:
    """Give every node a distinct key (its name, or its first output when unnamed): the plan
    names layers and finds nodes by it. A repeated name becomes ``NAME:OUTPUT``, as
    :func:`onnx_io.find_weighted_layers` already calls such a layer. Returns how many changed."""
    used, renamed = set(), 0
    for node in graph.node:
        key = node.name or node.output[0]
        if key in used:
            node.name = f"{key}:{node.output[0]}"
            renamed += 1
            key = node.name
        used.add(key)
    return renamed
