"""Read ONNX models and find their conv/dense weights as float32 arrays (numpy + onnx, no TVM).

Handles what real exported models do: fp16 weights, weights that are also listed as graph inputs
(IR < 4 exporters such as Caffe2's; we treat the initializer as the constant value), int8/uint8
weights behind ``DequantizeLinear`` (per-tensor, per-channel, blocked), and constants reached
through ``Identity`` / ``Cast`` / ``Transpose`` / ``Constant``.

Example::

    >>> model = load_model("../shared/data/imagenet/models/squeezenet1.1.onnx")  # doctest: +SKIP
    >>> layers = find_weighted_layers(model)  # doctest: +SKIP
    >>> layers[0].name, layers[0].op_type, layers[0].weight.shape  # doctest: +SKIP
    ('conv1_1', 'conv', (64, 3, 3, 3))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from tvm_ternary.errors import BadWeightError, InvalidModelError, ModelFileError

__all__ = ["LayerWeight", "load_model", "find_weighted_layers"]


# ---------------------------------------------------------------------------------------------
# Loading


def load_model(path: str | Path) -> onnx.ModelProto:
    """Load and check an ONNX model; every problem with the file is a one-line ``UserError``.

    Raises :class:`ModelFileError` (missing, unreadable, empty, not ONNX, truncated) or
    :class:`InvalidModelError` (``onnx.checker`` rejects it).

    Example::

        >>> load_model("missing.onnx")
        Traceback (most recent call last):
        ...
        tvm_ternary.errors.ModelFileError: missing.onnx: no such file
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a directory, not an ONNX model file")
    try:
        size = path.stat().st_size
        if size == 0:
            raise ModelFileError(f"{path}: file is empty, not an ONNX model")
        model = onnx.load(str(path))
    except ModelFileError:
        raise
    except DecodeError:
        raise ModelFileError(f"{path}: {_diagnose_undecodable(path.read_bytes())}") from None
    except OSError as error:  # permissions, missing external-data file, ...
        raise ModelFileError(f"{path}: cannot read: {error.strerror or error}") from None
    except Exception as error:  # onnx raises assorted types for broken external-data references
        raise ModelFileError(f"{path}: cannot load ONNX model: {error}") from None

    # A byte string can decode as a protobuf without being a model (unknown fields are skipped).
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise ModelFileError(f"{path}: not an ONNX model (no IR version or no graph)")
    newest = onnx.defs.onnx_opset_version()
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version > newest:
            raise InvalidModelError(f"{path}: ONNX opset {entry.version} is newer than this onnx package "
                                    f"knows (up to {newest}); export the model with opset {newest} or lower")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "invalid model"
        raise InvalidModelError(f"{path}: ONNX checker rejects the model: {first_line}") from None
    return model


# Top-level fields of onnx.ModelProto and their protobuf wire types (0 = varint, 2 = bytes).
_MODEL_PROTO_FIELDS = {
    1: ("ir_version", 0),
    2: ("producer_name", 2),
    3: ("producer_version", 2),
    4: ("domain", 2),
    5: ("model_version", 0),
    6: ("doc_string", 2),
    7: ("graph", 2),
    8: ("opset_import", 2),
    14: ("metadata_props", 2),
    20: ("training_info", 2),
    25: ("functions", 2),
    26: ("configuration", 2),
}


class _EndOfData(Exception):
    pass


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise _EndOfData
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _diagnose_undecodable(data: bytes) -> str:
    """Say whether bytes that protobuf refused are a truncated ONNX model or not ONNX at all.

    Walks the top-level ModelProto fields: a file whose fields are all valid ModelProto fields
    until one runs past the end of the file is a truncated model; a file whose first field is
    not a ModelProto field is not ONNX.
    """
    pos, fields_seen = 0, 0
    try:
        while pos < len(data):
            key, pos = _read_varint(data, pos)
            field = _MODEL_PROTO_FIELDS.get(key >> 3)
            if field is None or field[1] != key & 7:
                if fields_seen == 0:
                    return "not an ONNX model (the file is not an ONNX protobuf)"
                return f"corrupt ONNX model (unexpected bytes at offset {pos})"
            name, wire_type = field
            if wire_type == 0:
                _, pos = _read_varint(data, pos)
            else:
                length, pos = _read_varint(data, pos)
                if pos + length > len(data):
                    return (
                        f"truncated ONNX model: field '{name}' needs {length} bytes but the file "
                        f"ends after {len(data) - pos} ({len(data)} bytes in all)"
                    )
                pos += length
            fields_seen += 1
    except _EndOfData:
        return f"truncated ONNX model (the file ends mid-field at {len(data)} bytes)"
    except ValueError:
        return "not an ONNX model (the file is not an ONNX protobuf)"
    return "corrupt ONNX model (the top-level structure is intact, the damage is inside a field)"


# ---------------------------------------------------------------------------------------------
# Weighted layers


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields make value equality ambiguous
class LayerWeight:
    """One conv or dense layer with its constant weight, as float32.

    ``weight`` is ``[K, C/groups, R, S]`` for ``op_type == "conv"`` and ``[K, C]`` for
    ``"dense"`` (Gemm's ``transB`` and ``alpha`` applied; MatMul's ``[C, K]`` transposed).
    Arrays are read-only.

    Example::

        >>> layer = LayerWeight(name="fc", op_type="dense", node_name="", onnx_op_type="Gemm",
        ...                     weight=np.zeros((10, 4), np.float32))
        >>> layer.out_channels, layer.in_channels_per_group, layer.macs
        (10, 4, 40)
    """

    name: str  # unique per model: the node name, or its first output when the node is unnamed
    op_type: str  # "conv" | "dense"
    node_name: str  # ONNX node name as stored ("" when the exporter left it empty)
    onnx_op_type: str  # "Conv" | "Gemm" | "MatMul"
    weight: np.ndarray
    groups: int = 1
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # ONNX order: top, left, bottom, right
    dilations: tuple[int, int] = (1, 1)
    auto_pad: str = "NOTSET"
    bias: np.ndarray | None = None  # [K] float32 when constant (Gemm: beta applied)
    output_spatial: tuple[int, int] | None = None  # (H_out, W_out) when shape inference knows it
    reads_model_input: bool = False  # no other conv/dense lies between a graph input and this
    output: str = ""  # the node's first output tensor: identifies the node (ONNX outputs are unique)

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels_per_group(self) -> int:
        return int(self.weight.shape[1])

    @property
    def is_depthwise(self) -> bool:
        return self.op_type == "conv" and self.groups > 1 and self.in_channels_per_group == 1

    @property
    def is_pointwise(self) -> bool:
        """A 1x1 conv mixing channels (not depthwise): what ``--pointwise-group-size`` applies to."""
        return self.op_type == "conv" and self.weight.shape[2:] == (1, 1) and not self.is_depthwise

    @property
    def macs(self) -> int | None:
        """Multiply-accumulates per sample; None for a conv whose output size is unknown."""
        if self.op_type == "dense":
            return int(self.weight.size)
        if self.output_spatial is None:
            return None
        return int(self.weight.size) * self.output_spatial[0] * self.output_spatial[1]


def find_weighted_layers(model: onnx.ModelProto) -> list[LayerWeight]:
    """Every 2-D Conv, Gemm and MatMul with a constant weight, in graph order.

    Layers whose weight is not a constant (a true runtime input) and Conv of other than two
    spatial dimensions are skipped. A NaN/Inf weight raises :class:`BadWeightError` naming the
    layer; a weight we cannot decode raises it too.

    Example::

        >>> from onnx import helper, TensorProto
        >>> w = helper.make_tensor("w", TensorProto.FLOAT, [3, 2], [1, 2, 3, 4, 5, 6])
        >>> graph = helper.make_graph(
        ...     [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "g",
        ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
        >>> [layer] = find_weighted_layers(helper.make_model(graph))
        >>> layer.weight.tolist()  # MatMul's [C, K] weight as [K, C]
        [[1.0, 3.0, 5.0], [2.0, 4.0, 6.0]]
    """
    graph = model.graph
    constants = _Constants(graph)
    spatial = _output_spatial_sizes(model)
    before_any_layer = _tensors_before_any_layer(graph)
    layers: list[LayerWeight] = []
    used_names: set[str] = set()
    for node in graph.node:
        if node.op_type not in _WEIGHTED_OPS:
            continue
        layer = _WEIGHTED_OPS[node.op_type](node, constants)
        if layer is None:
            continue
        name = node.name or node.output[0]
        if name in used_names:  # node names need not be unique in ONNX; outputs are
            name = f"{name}:{node.output[0]}"
        used_names.add(name)
        _check_finite(layer["weight"], name, "weight")
        if layer.get("bias") is not None:
            _check_finite(layer["bias"], name, "bias")
        for array in (layer["weight"], layer.get("bias")):
            if array is not None:
                array.setflags(write=False)
        layers.append(
            LayerWeight(
                name=name,
                node_name=node.name,
                onnx_op_type=node.op_type,
                output_spatial=spatial.get(node.output[0]) if layer["op_type"] == "conv" else None,
                reads_model_input=node.input[0] in before_any_layer,
                output=node.output[0],
                **layer,
            )
        )
    return layers


def constant_resolver(graph: onnx.GraphProto):
    """``resolve(tensor name) -> numpy array | None``: the value of a constant tensor
    (initializer, Constant node, or Identity / Cast / Transpose / DequantizeLinear of constants)."""
    return _Constants(graph).get


def _check_finite(values: np.ndarray, layer_name: str, what: str) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        raise BadWeightError(
            f"layer {layer_name}: {what} has {int(bad.sum())} NaN/Inf value(s) "
            f"out of {values.size}"
        )


def _attributes(node: onnx.NodeProto) -> dict:
    return {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}


def _conv_layer(node: onnx.NodeProto, constants: _Constants) -> dict | None:
    weight = constants.get(node.input[1])
    if weight is None or weight.ndim != 4:
        return None
    attrs = _attributes(node)
    bias = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    return dict(
        op_type="conv",
        weight=_as_float32(weight),
        groups=int(attrs.get("group", 1)),
        strides=tuple(int(v) for v in attrs.get("strides", (1, 1))),
        pads=tuple(int(v) for v in attrs.get("pads", (0, 0, 0, 0))),
        dilations=tuple(int(v) for v in attrs.get("dilations", (1, 1))),
        auto_pad=auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad),
        bias=None if bias is None else _as_float32(bias).reshape(-1),
    )


def _gemm_layer(node: onnx.NodeProto, constants: _Constants) -> dict | None:
    weight = constants.get(node.input[1])
    if weight is None or weight.ndim != 2:
        return None
    attrs = _attributes(node)
    weight = _as_float32(weight)
    if not attrs.get("transB", 0):
        weight = weight.T  # Gemm stores B as [C, K] unless transB
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if alpha != 1.0:
        weight = weight * np.float32(alpha)  # Y = alpha·A·B + beta·C: fold alpha into W
    out_channels = weight.shape[0]
    bias = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if bias is not None:
        # Only a per-output bias ([K], [1, K] or a scalar) is a bias; a full [M, K] C is not.
        bias = _as_float32(bias).reshape(-1) if bias.size in (1, out_channels) else None
        if bias is not None:
            bias = np.broadcast_to(bias, (out_channels,)) * np.float32(beta)
    return dict(op_type="dense", weight=np.ascontiguousarray(weight), bias=bias)


def _matmul_layer(node: onnx.NodeProto, constants: _Constants) -> dict | None:
    weight = constants.get(node.input[1])
    if weight is None or weight.ndim != 2:
        return None
    return dict(op_type="dense", weight=np.ascontiguousarray(_as_float32(weight).T))


_WEIGHTED_OPS = {"Conv": _conv_layer, "Gemm": _gemm_layer, "MatMul": _matmul_layer}


def _as_float32(array: np.ndarray) -> np.ndarray:
    return np.array(array, dtype=np.float32)  # always a fresh copy: we mark it read-only


def _tensors_before_any_layer(graph: onnx.GraphProto) -> set[str]:
    """Tensors computed from the graph inputs without passing through a conv/dense node."""
    initializers = {tensor.name for tensor in graph.initializer}
    reached = {value.name for value in graph.input if value.name not in initializers}
    for node in graph.node:  # ONNX requires topological node order
        if node.op_type in _WEIGHTED_OPS:
            continue
        if any(name in reached for name in node.input):
            reached.update(node.output)
    return reached


def _output_spatial_sizes(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """(H, W) of every rank-4 tensor whose shape ONNX shape inference can work out."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is a bonus (MAC counts); a model it cannot handle is still fine
        return {}
    graph = inferred.graph
    sizes = {}
    for value in list(graph.value_info) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 4 and all(d.HasField("dim_value") for d in dims[2:]):
            sizes[value.name] = (int(dims[2].dim_value), int(dims[3].dim_value))
    return sizes


class _Constants:
    """Resolve a tensor name to a constant numpy array, or None when it is computed at run time."""

    _MAX_DEPTH = 32  # constant chains are a few nodes long; this only guards against cycles

    def __init__(self, graph: onnx.GraphProto) -> None:
        self._initializers = {tensor.name: tensor for tensor in graph.initializer}
        self._producers = {name: node for node in graph.node for name in node.output}
        self._cache: dict[str, np.ndarray | None] = {}

    def get(self, name: str, depth: int = 0) -> np.ndarray | None:
        if name in self._cache:
            return self._cache[name]
        value = self._resolve(name, depth)
        self._cache[name] = value
        return value

    def _resolve(self, name: str, depth: int) -> np.ndarray | None:
        if name in self._initializers:
            return numpy_helper.to_array(self._initializers[name])
        node = self._producers.get(name)
        if node is None or depth > self._MAX_DEPTH:
            return None
        inputs = [self.get(i, depth + 1) if i else None for i in node.input]
        attrs = _attributes(node)
        if node.op_type == "Constant":
            return _constant_node_value(attrs)
        if node.op_type in ("Identity", "Cast", "Transpose") and inputs[0] is None:
            return None
        if node.op_type == "Identity":
            return inputs[0]
        if node.op_type == "Cast":
            return inputs[0].astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))
        if node.op_type == "Transpose":
            return np.transpose(inputs[0], attrs.get("perm"))
        if node.op_type == "DequantizeLinear":
            if inputs[0] is None or inputs[1] is None:
                return None
            zero_point = inputs[2] if len(inputs) > 2 else None
            if len(node.input) > 2 and node.input[2] and zero_point is None:
                return None  # zero point computed at run time: not a constant
            return _dequantize_linear(
                inputs[0], inputs[1], zero_point,
                axis=int(attrs.get("axis", 1)), block_size=int(attrs.get("block_size", 0)),
            )
        return None


def _constant_node_value(attrs: dict) -> np.ndarray | None:
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    return None  # sparse_value / strings: not a weight


def _dequantize_linear(
    quantized: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    *,
    axis: int,
    block_size: int,
) -> np.ndarray:
    """ONNX DequantizeLinear: (x − zero_point) · scale, per tensor, per axis or per block."""
    axis = axis % quantized.ndim if quantized.ndim else 0

    def broadcastable(param: np.ndarray) -> np.ndarray:
        param = param.astype(np.float32)
        if param.size == 1:
            return param.reshape(())
        if block_size > 0:  # blocked (opset 21): param has x's rank, axis dim = ceil(n / block)
            return np.repeat(param, block_size, axis=axis).take(
                range(quantized.shape[axis]), axis=axis)
        shape = [1] * quantized.ndim
        shape[axis] = -1
        return param.reshape(shape)

    values = quantized.astype(np.float32)
    if zero_point is not None:
        values = values - broadcastable(zero_point)
    return values * broadcastable(scale)
