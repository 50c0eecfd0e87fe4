"""Which ONNX nodes become one fused quantized layer, and which tensors are integer.

A *fused layer* is a conv/dense with a constant weight plus the epilogue the kernels fuse:
``conv [-> Relu]`` or ``conv -> Add(residual) [-> Relu]`` (each link the only consumer of the
one before). Its *root* is the last node of the chain; the compiled graph computes the whole
chain there. Tensors that must share one activation scale (the inputs and output of a Concat,
the input and output of a MaxPool) are grouped, so those ops run on integers unchanged.

Example::

    >>> from onnx import helper, TensorProto, numpy_helper
    >>> import numpy as np
    >>> w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    >>> nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
    ...          helper.make_node("Relu", ["c"], ["y"], name="relu")]
    >>> g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
    ...                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], [w])
    >>> [(f.name, f.output, f.relu) for f in analyse(helper.make_model(g)).layers]
    [('conv', 'y', True)]
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import onnx

from ..onnx_io import LayerWeight, find_weighted_layers

SCALE_SHARING_OPS = ("MaxPool", "Concat")  # run unchanged on integers with one shared scale


@dataclass(frozen=True)
class FusedLayer:
    name: str
    weight: LayerWeight
    input: str  # tensor the conv/dense reads
    output: str  # tensor the chain's root produces
    root: str  # name of the node that produces ``output`` (where the fused op runs)
    skipped: tuple[str, ...]  # node names inside the chain that the fused op replaces
    relu: bool
    residual: str | None  # the other operand of a fused Add


@dataclass(frozen=True)
class GraphAnalysis:
    layers: tuple[FusedLayer, ...]
    scale_groups: dict[str, str]  # tensor -> representative tensor of its shared-scale group
    consumers: dict[str, tuple[str, ...]]  # tensor -> names of the nodes that read it

    def by_root(self) -> dict[str, FusedLayer]:
        return {layer.root: layer for layer in self.layers}

    def group_of(self, tensor: str) -> str:
        return self.scale_groups.get(tensor, tensor)


def node_key(node: onnx.NodeProto) -> str:
    """The name ``onnx_io`` gives a node: its name, or its first output when unnamed."""
    return node.name or node.output[0]


def analyse(model: onnx.ModelProto, *, materialized: frozenset[str] = frozenset()) -> GraphAnalysis:
    """Fused layers and shared-scale groups of ``model``.

    ``materialized``: tensors that must exist with their own format (a quantized model rounds
    them: its Q/DQ pairs); a chain does not grow past one, so the rounding is kept.
    """
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for name in n.input:
            consumers[name].append(n)
    graph_outputs = {o.name for o in graph.output}
    constants = {t.name for t in graph.initializer} | {
        n.output[0] for n in graph.node if n.op_type == "Constant"}

    def only_consumer(tensor: str, op_type: str) -> onnx.NodeProto | None:
        users = consumers.get(tensor, [])
        if tensor in graph_outputs or len(users) != 1 or users[0].op_type != op_type:
            return None
        return users[0]

    layers = []
    claimed: set[str] = set()  # an Add both of whose operands are convs is fused into one only
    for weight in find_weighted_layers(model):
        node = next(n for n in graph.node if node_key(n) == weight.name)
        out, root, skipped, relu, residual = node.output[0], node, [], False, None
        add = None if out in materialized else only_consumer(out, "Add")
        if add is not None and node_key(add) not in claimed:
            other = add.input[1] if add.input[0] == out else add.input[0]
            if other not in constants and other != out:
                skipped.append(node_key(root))
                out, root, residual = add.output[0], add, other
                claimed.add(node_key(add))
        act = None if out in materialized else only_consumer(out, "Relu")
        if act is not None:
            skipped.append(node_key(root))
            out, root, relu = act.output[0], act, True
        layers.append(FusedLayer(
            name=weight.name, weight=weight, input=node.input[0], output=out,
            root=node_key(root), skipped=tuple(skipped), relu=relu, residual=residual))

    parent: dict[str, str] = {}

    def find(t: str) -> str:
        while parent.get(t, t) != t:
            t = parent[t]
        return t

    for n in graph.node:
        if n.op_type in SCALE_SHARING_OPS:
            members = [t for t in n.input if t not in constants] + [n.output[0]]
            for t in members[1:]:
                parent[find(t)] = find(members[0])
    groups = {t: find(t) for t in parent}
    groups.update({find(t): find(t) for t in parent})
    return GraphAnalysis(
        layers=tuple(layers), scale_groups=groups,
        consumers={t: tuple(node_key(n) for n in ns) for t, ns in consumers.items()},
    )
