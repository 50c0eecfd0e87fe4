"""Pass 1: ONNX -> clean float32 Relax IRModule whose layer weights are named parameters.

Steps: normalise the ONNX graph in numpy (static input shape, fp16 -> fp32, int8
``DequantizeLinear`` weights folded; :mod:`.onnx_normalize`), import with TVM's frontend, then
``FoldConstant`` -> :class:`RemoveDropout` -> ``DecomposeOpsForInference`` (batch norms the
ONNX fold left) -> canonicalise and remove dead code.
ONNX ``Identity`` needs nothing: the frontend maps it to its input.

**Layer identity.** Every conv/dense layer (``onnx_io.find_weighted_layers``, the plan's layers)
reads its weight from a tensor of its own; the import keeps exactly those tensors as parameters
of ``main`` (after the data input), named after the tensor, and binds every other initializer as
a constant. A Relax ``conv2d``/``matmul`` whose weight is such a parameter *is* that layer:
:attr:`ImportedModel.layers` says which parameter belongs to which layer, and the rewrite
(:mod:`.quantize_graph`) reads the layer off the weight, not off the program order. A weight
the graph shares between layers, or computes from constants, is given to each layer as its own
initializer first (on a copy), so that every layer has one.

Example::

    >>> imported = import_onnx("../shared/data/imagenet/models/squeezenet1.1.onnx")  # doctest: +SKIP
    >>> imported.input_name, imported.input_shape, imported.input_dtype  # doctest: +SKIP
    ('data_0', (1, 3, 224, 224), 'float16')
    >>> imported.layers[0].name, imported.layers[0].weight_param, imported.layers[0].weight_dtype  # doctest: +SKIP
    ('conv1_1', 'conv1_w_0', 'float16')
    >>> float_module = imported.bound_module()  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import tvm
from onnx import numpy_helper
from tvm import relax

from tvm_ternary import onnx_io
from tvm_ternary import tvm_adapter as ta
from tvm_ternary.errors import UserError
from tvm_ternary.passes.cleanup import RemoveDropout
from tvm_ternary.passes.onnx_normalize import NormalizedOnnx, prepare, weight_source_dtype

__all__ = ["LayerInfo", "ImportedModel", "import_onnx", "cleanup_pipeline", "bind_weights", "own_weights"]


@dataclass(frozen=True)
class LayerInfo:
    """One conv/dense layer of the model and the Relax parameter that holds its weight."""

    index: int  # position among the model's layers (ONNX graph order, onnx_io.find_weighted_layers)
    name: str  # the layer's name (the plan's): ONNX node name, or its first output when unnamed
    weight_param: str  # name of the parameter of ``main`` that holds the weight
    op_type: str  # "conv" | "dense"
    weight_shape: tuple[int, ...]  # the weight tensor as the node reads it: OIHW; Gemm/MatMul as stored
    weight_dtype: str  # storage dtype in the ONNX file: float32 | float16 | int8 | uint8


@dataclass(frozen=True, eq=False)
class ImportedModel:
    """The float32 Relax module and what the rest of the compiler needs to know about it.

    ``module``'s ``main`` takes the ``float32`` input (whatever ``input_dtype`` says;
    ``input_dtype`` is what the ONNX model declares, what a user feeds the compiled library),
    then one parameter per layer weight (:attr:`weights`, by parameter name). Run the float
    program with :meth:`bound_module`.
    """

    module: tvm.IRModule
    weights: Mapping[str, np.ndarray]  # parameter name -> value, in parameter order
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

    def layer_of_weight(self) -> dict[str, str]:
        """Weight parameter name -> layer name."""
        return {layer.weight_param: layer.name for layer in self.layers}

    def bound_module(self) -> tvm.IRModule:
        """The float program: every weight bound as a constant (``main`` takes the input only)."""
        return bind_weights(self.module, self.weights)


def bind_weights(mod: tvm.IRModule, weights: Mapping[str, np.ndarray]) -> tvm.IRModule:
    """Bind the weight parameters ``mod`` still has; a Gemm's ``permute_dims(W)`` folds then."""
    present = set(ta.param_names(mod))
    mod = ta.bind_params(mod, {name: value for name, value in weights.items() if name in present})
    return relax.transform.FoldConstant()(mod)


def cleanup_pipeline() -> tvm.ir.transform.Pass:
    """The Relax clean-up run after the frontend (exposed for tests and other importers)."""
    return tvm.ir.transform.Sequential([
        relax.transform.FoldConstant(),  # reshape(bias), scaled Gemm bias, ... (weights are parameters)
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
    prep = prepare(model, input_shapes=input_shapes, prepared=prepared)
    notes = list(prep.notes)
    graph_model, owned = own_weights(prep.model)
    try:
        mod, params = ta.relax_from_onnx(graph_model, shape_dict={prep.input_name: list(prep.input_shape)},
                                         dtype_dict={prep.input_name: "float32"})
    except Exception as error:  # the frontend raises bare ValueError/KeyError/TVMError
        raise UserError(f"TVM's ONNX frontend cannot import the model: "
                        f"{type(error).__name__}: {error}") from None
    # the frontend names an initializer's parameter after it, less an "onnx::" prefix
    param_of = {tensor: tensor.removeprefix("onnx::") for tensor in owned}
    wanted = set(param_of.values())
    mod = ta.bind_params(mod, {name: value for name, value in params.items() if name not in wanted})
    weights = {name: params[name] for name in ta.param_names(mod) if name in wanted}  # in parameter order
    n_dropout = _count_ops(mod, "relax.nn.dropout")
    n_bn = _count_ops(mod, "relax.nn.batch_norm")
    mod = cleanup_pipeline()(mod)
    if n_dropout:
        notes.append(f"{n_dropout} Dropout removed")
    if n_bn:
        notes.append(f"{n_bn} BatchNormalization (not after a conv) decomposed into a scale/shift")
    layers = []
    for index, (tensor, (layer, source)) in enumerate(owned.items()):
        param = param_of[tensor]
        if param not in weights:  # e.g. two initializers the "onnx::" strip made one name
            notes.append(f"layer {layer.name}: its weight is not a parameter after import; it stays float")
            continue
        layers.append(LayerInfo(
            index=index, name=layer.name, weight_param=param, op_type=layer.op_type,
            weight_shape=tuple(weights[param].shape),
            weight_dtype=weight_source_dtype(prep.model, prep, source)))

    out = mod["main"].body.body
    output_shape = ta.static_shape(out)
    if output_shape is None:
        raise UserError("the model's output shape is not static after import")
    return ImportedModel(
        module=mod, weights=weights, input_name=prep.input_name, input_shape=prep.input_shape,
        input_dtype=prep.input_dtype, output_name=prep.output_name, output_shape=output_shape,
        output_dtype=prep.output_dtype, opset=prep.opset, layers=tuple(layers), notes=tuple(notes),
    )


def own_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """``(model', {weight initializer: (LayerWeight, weight input in model)})``: every layer of
    ``model`` reads its weight from an initializer no other node reads.

    A weight that already is such an initializer is kept (``model`` is returned unchanged when
    all are, and no initializer is listed as a graph input); one computed from constants (a
    Constant node, Identity/Transpose of an initializer) or shared with another node is
    materialised as a new initializer, on a copy, named after the layer."""
    layers = onnx_io.find_weighted_layers(model)
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    node_of = {node.output[0]: i for i, node in enumerate(graph.node) if node.output}
    taken = initializers | {out for node in graph.node for out in node.output} | {v.name for v in graph.input}
    copy, owned, resolve = None, {}, None
    if model.ir_version < 4 or any(v.name in initializers for v in graph.input):
        # IR < 4 exporters list every weight as a graph input too (a default an input may
        # override, from IR 4 on; a compiled library has none): the frontend would make it a
        # data input as well as a parameter. IR 4 allows initializers that are not inputs.
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        inputs = [v for v in copy.graph.input if v.name not in initializers]
        del copy.graph.input[:]
        copy.graph.input.extend(inputs)
        copy.ir_version = max(copy.ir_version, 4)
    for layer in layers:
        index = node_of[layer.output]
        source = graph.node[index].input[1]
        param = source.removeprefix("onnx::")  # the frontend's parameter name for it
        if source in initializers and readers[source] == 1 and (param == source or param not in taken):
            owned[source] = (layer, source)
            continue
        if copy is None:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
        resolve = resolve or onnx_io.constant_resolver(graph)
        name = _fresh_name(layer.name.removeprefix("onnx::"), taken)
        copy.graph.initializer.append(numpy_helper.from_array(resolve(source), name))
        copy.graph.node[index].input[1] = name
        owned[name] = (layer, source)
    return (model if copy is None else copy), owned


def _fresh_name(base: str, taken: set[str]) -> str:
    name, k = f"{base}.weight", 1
    while name in taken:
        k += 1
        name = f"{base}.weight{k}"
    taken.add(name)
    return name


def _count_ops(mod: tvm.IRModule, op_name: str) -> int:
    return sum(ta.call_op_name(value) == op_name for _, value in ta.main_bindings(mod))
