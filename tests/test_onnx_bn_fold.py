"""onnx_normalize folds Conv -> BatchNormalization so the numpy plan sees conv -> relu chains."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tvm_ternary.numpy_graph import NumpyGraph
from tvm_ternary.passes.onnx_normalize import normalize_onnx
from tvm_ternary.plan import analyse


def _bn_model(*, conv_bias: bool, second_user: bool = False):
    rng = np.random.default_rng(0)
    k = 4
    arrays = {"w": rng.normal(size=(k, 3, 3, 3)), "b": rng.normal(size=k),
              "g": rng.uniform(0.5, 1.5, k), "beta": rng.normal(size=k),
              "m": rng.normal(size=k), "v": rng.uniform(0.5, 2, k)}
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    nodes = [helper.make_node("Conv", ["x", "w"] + (["b"] if conv_bias else []), ["c"], name="conv", pads=[1] * 4),
             helper.make_node("BatchNormalization", ["c", "g", "beta", "m", "v"], ["n"], name="bn", epsilon=1e-3),
             helper.make_node("Relu", ["n"], ["y"], name="relu")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, k, 5, 5])]
    if second_user:  # the conv output is also read elsewhere: folding would change that reader
        nodes.append(helper.make_node("Relu", ["c"], ["z"], name="relu2"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, k, 5, 5]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_bn_after_conv_is_folded_and_relu_fuses():
    x = np.random.default_rng(1).normal(size=(1, 3, 5, 5)).astype(np.float32)
    for conv_bias in (False, True):
        model = _bn_model(conv_bias=conv_bias)
        prep = normalize_onnx(model)
        ops = [n.op_type for n in prep.model.graph.node]
        assert ops == ["Conv", "Relu"]
        assert any("BatchNormalization folded" in note for note in prep.notes)
        np.testing.assert_allclose(NumpyGraph(prep.model).run(x), NumpyGraph(model).run(x), rtol=1e-5, atol=1e-5)
        (layer,) = analyse(prep.model).layers
        assert layer.relu and layer.output == "y"


def test_bn_not_folded_when_conv_output_has_other_readers():
    model = _bn_model(conv_bias=True, second_user=True)
    graph = model.graph
    del graph.output[1:]  # keep the single-output contract; relu2 stays as an extra reader
    prep = normalize_onnx(model)
    assert "BatchNormalization" in [n.op_type for n in prep.model.graph.node]
