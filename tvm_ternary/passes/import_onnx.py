"""Pass 1: ONNX -> clean float32 Relax IRModule.

Steps: normalise the ONNX graph in numpy (static input shape, fp16 -> fp32, int8
``DequantizeLinear`` weights folded; :mod:`.onnx_normalize`), import with TVM's frontend, then
``FoldConstant`` -> :class:`RemoveDropout` -> ``DecomposeOpsForInference`` (batch norms the
ONNX fold left) -> canonicalise and remove dead code.
ONNX ``Identity`` needs nothing: the frontend maps it to its input.

Every conv2d/matmul with a constant weight is a *layer*; :attr:`ImportedModel.layers` names them
in program order (:func:`tvm_adapter.conv_dense_bindings`), with the ONNX node name and the
weight's original storage dtype.

Example::

    >>> imported = import_onnx("../shared/data/imagenet/models/squeezenet1.1.onnx")  # doctest: +SKIP
    >>> imported.input_name, imported.input_shape, imported.input_dtype  # doctest: +SKIP
    ('data_0', (1, 3, 224, 224), 'float16')
    >>> imported.layers[0].name, imported.layers[0].weight_dtype  # doctest: +SKIP
    ('conv1_1', 'float16')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import tvm
from tvm import relax

from tvm_ternary import onnx_io
from tvm_ternary import tvm_adapter as ta
from tvm_ternary.errors import UserError
from tvm_ternary.passes.cleanup import RemoveDropout
from tvm_ternary.passes.onnx_normalize import NormalizedOnnx, normalize_onnx, weight_source_dtype

__all__ = ["LayerInfo", "ImportedModel", "import_onnx", "cleanup_pipeline"]


@dataclass(frozen=True)
class LayerInfo:
    """One conv2d/matmul of the Relax module, in program order."""

    index: int  # position among conv_dense_bindings(module)
    name: str  # ONNX node name (or its first output); "layer<i>" when it cannot be matched
    var_name: str  # Relax var bound to the conv2d/matmul call
    op_type: str  # "conv" | "dense"
    weight_shape: tuple[int, ...]  # as in Relax: OIHW for conv, [C, K] for matmul
    weight_dtype: str  # storage dtype in the ONNX file: float32 | float16 | int8 | uint8


@dataclass(frozen=True)
class ImportedModel:
    """The float32 Relax module and what the rest of the compiler needs to know about it.

    ``module`` takes ``float32`` input whatever ``input_dtype`` says; ``input_dtype`` is what
    the ONNX model declares (what a user feeds the compiled library).
    """

    module: tvm.IRModule
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: str
    output_name: str
    output_shape: tuple[int, ...]
    output_dtype: str
    opset: int
    layers: tuple[LayerInfo, ...]
    notes: tuple[str, ...]

    @property
    def int8_weight_layers(self) -> tuple[str, ...]:
        """Names of layers whose weights were stored as 8-bit integers in the ONNX file."""
        return tuple(layer.name for layer in self.layers if layer.weight_dtype in ("int8", "uint8"))


def cleanup_pipeline() -> tvm.ir.transform.Pass:
    """The Relax clean-up run after the frontend (exposed for tests and other importers)."""
    return tvm.ir.transform.Sequential([
        relax.transform.FoldConstant(),  # reshape(bias), permute_dims(W) of Gemm, ...
        RemoveDropout(),
        # BatchNorm after a conv was folded once, on the ONNX graph (onnx_normalize); the rest
        # become scale/shift, as the plan's numpy graph runs them
        relax.transform.DecomposeOpsForInference(),
        relax.transform.FoldConstant(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.DeadCodeElimination(),
    ], name="tvm_ternary.ImportCleanup")


def import_onnx(
    model: str | Path | onnx.ModelProto,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    prepared: NormalizedOnnx | None = None,
) -> ImportedModel:
    """Import an ONNX CNN as a cleaned-up float32 Relax module.

    ``model`` is a path (loaded and checked by :func:`onnx_io.load_model`) or a ModelProto.
    ``input_shapes`` maps the input name to a static shape (the CLI's ``--input-shape``); it is
    required when the model's input has a dynamic dimension. Bad models raise
    :class:`UserError` subclasses. ``prepared``: the model already normalised (the compile
    flow passes the graph its plan was made on, so that normalisation runs once and the Relax
    module is built from that very graph); ``model`` and ``input_shapes`` are then unused.

    Example::

        >>> imported = import_onnx("model.onnx", input_shapes={"input": (1, 3, 224, 224)})  # doctest: +SKIP
    """
    if prepared is not None:
        prep = prepared
    else:
        if not isinstance(model, onnx.ModelProto):
            model = onnx_io.load_model(model)
        prep = normalize_onnx(model, input_shapes=input_shapes)
    notes = list(prep.notes)
    try:
        mod = ta.relax_from_onnx(prep.model, shape_dict={prep.input_name: list(prep.input_shape)},
                                 dtype_dict={prep.input_name: "float32"})
    except Exception as error:  # the frontend raises bare ValueError/KeyError/TVMError
        raise UserError(f"TVM's ONNX frontend cannot import the model: "
                        f"{type(error).__name__}: {error}") from None
    n_dropout = _count_ops(mod, "relax.nn.dropout")
    n_bn = _count_ops(mod, "relax.nn.batch_norm")
    mod = cleanup_pipeline()(mod)
    if n_dropout:
        notes.append(f"{n_dropout} Dropout removed")
    if n_bn:
        notes.append(f"{n_bn} BatchNormalization (not after a conv) decomposed into a scale/shift")
    layers, layer_note = _name_layers(mod, prep)
    if layer_note:
        notes.append(layer_note)

    out = mod["main"].body.body
    output_shape = ta.static_shape(out)
    if output_shape is None:
        raise UserError("the model's output shape is not static after import")
    return ImportedModel(
        module=mod, input_name=prep.input_name, input_shape=prep.input_shape,
        input_dtype=prep.input_dtype, output_name=prep.output_name, output_shape=output_shape,
        output_dtype=prep.output_dtype, opset=prep.opset, layers=layers, notes=tuple(notes),
    )


def _count_ops(mod: tvm.IRModule, op_name: str) -> int:
    return sum(ta.call_op_name(value) == op_name for _, value in ta.main_bindings(mod))


def _name_layers(mod: tvm.IRModule, prep) -> tuple[tuple[LayerInfo, ...], str | None]:
    """Pair the Relax conv/dense bindings with the ONNX weighted nodes, both in program order.

    The frontend emits nodes in ONNX order and the clean-up only removes or replaces ops in
    place, so the two lists line up one to one; the weight shapes are checked to be sure.
    """
    bindings = ta.conv_dense_bindings(mod)
    onnx_layers = onnx_io.find_weighted_layers(prep.model)
    names = [layer.name for layer in onnx_layers]
    weight_inputs = _weight_inputs(prep.model)
    matched = len(onnx_layers) == len(bindings) and all(
        _same_weight(layer, call) for layer, (_, call) in zip(onnx_layers, bindings))
    infos = []
    for i, (var, call) in enumerate(bindings):
        op_type = "conv" if ta.call_op_name(call) == "relax.nn.conv2d" else "dense"
        if matched:
            layer = onnx_layers[i]
            dtype = weight_source_dtype(prep.model, prep, weight_inputs.get(layer.name, ""))
        else:
            dtype = "float32"
        infos.append(LayerInfo(
            index=i, name=names[i] if matched else f"layer{i}", var_name=ta.var_name(var),
            op_type=op_type, weight_shape=ta.static_shape(call.args[1]), weight_dtype=dtype))
    note = None if matched else (
        f"could not match the {len(bindings)} Relax conv/dense ops to the {len(onnx_layers)} "
        "ONNX ones; layers are named layer<i> and weight dtypes are unknown")
    return tuple(infos), note


def _weight_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """Layer name (as onnx_io names it) -> name of the node's weight input."""
    result, used = {}, set()
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1:
            name = node.name or node.output[0]
            if name in used:
                name = f"{name}:{node.output[0]}"
            used.add(name)
            result[name] = node.input[1]
    return result


def _same_weight(layer: onnx_io.LayerWeight, call) -> bool:
    shape = ta.static_shape(call.args[1])
    if layer.op_type == "conv":
        return ta.call_op_name(call) == "relax.nn.conv2d" and shape == layer.weight.shape
    # onnx_io gives dense weights as [K, C]; Relax's matmul takes [C, K].
    return ta.call_op_name(call) == "relax.matmul" and shape == layer.weight.shape[::-1]
