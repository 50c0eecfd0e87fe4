"""The numpy executor against onnxruntime (the independent reference executor).

Tolerance: both run float32 convolutions with different summation orders; 1e-4 relative to
the output's magnitude covers that on these depths.
"""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tvm_ternary.errors import UserError
from tvm_ternary.numpy_graph import NumpyGraph
from tvm_ternary.passes.onnx_normalize import normalize_onnx

ort = pytest.importorskip("onnxruntime")
MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet" / "models"


def run_ort(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("name", ["squeezenet1.1.onnx", "mobilenet_v2_wint8.onnx"])
def test_real_models_match_onnxruntime(name):
    prep = normalize_onnx(onnx.load(MODELS / name))
    x = (np.random.default_rng(0).normal(size=prep.input_shape) * 50).astype(np.float32)
    got = NumpyGraph(prep.model).run(x)
    want = run_ort(prep.model, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def one_node_model(node, x_shape, inits=(), out_shape=None):
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(v, k) for k, v in inits],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


rng = np.random.default_rng(1)
CASES = [
    (helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1), (1, 4, 13, 13), []),
    (helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), (1, 4, 14, 14), []),
    (helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]), (1, 4, 7, 7), []),
    (helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1), (1, 2, 5, 5), []),
    (helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=[2, 2], pads=[3, 3, 3, 3]), (1, 3, 17, 17),
     [("w", rng.normal(size=(8, 3, 7, 7)).astype(np.float32)), ("b", rng.normal(size=8).astype(np.float32))]),
    (helper.make_node("Conv", ["x", "w"], ["y"], group=4, auto_pad="SAME_UPPER"), (1, 4, 9, 9),
     [("w", rng.normal(size=(4, 1, 3, 3)).astype(np.float32))]),
    (helper.make_node("Conv", ["x", "w"], ["y"], dilations=[2, 2], pads=[2, 2, 2, 2]), (1, 4, 9, 9),
     [("w", rng.normal(size=(6, 4, 3, 3)).astype(np.float32))]),
    (helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1), (2, 10),
     [("w", rng.normal(size=(5, 10)).astype(np.float32)), ("b", rng.normal(size=5).astype(np.float32))]),
    (helper.make_node("Clip", ["x", "lo", "hi"], ["y"]), (3, 4),
     [("lo", np.array(0, np.float32)), ("hi", np.array(6, np.float32))]),
    (helper.make_node("BatchNormalization", ["x", "s", "bb", "m", "v"], ["y"]), (1, 3, 4, 4),
     [("s", rng.random(3).astype(np.float32)), ("bb", rng.random(3).astype(np.float32)),
      ("m", rng.random(3).astype(np.float32)), ("v", rng.random(3).astype(np.float32) + 0.5)]),
    # activations and normalisations of common CNNs (AlexNet/GoogLeNet LRN, MobileNetV3, YOLO)
    (helper.make_node("LRN", ["x"], ["y"], size=5, alpha=1e-3, beta=0.75, bias=2.0), (1, 7, 3, 3), []),
    (helper.make_node("LeakyRelu", ["x"], ["y"], alpha=0.1), (1, 3, 4, 4), []),
    (helper.make_node("PRelu", ["x", "slope"], ["y"]), (1, 3, 4, 4), [("slope", rng.random((3, 1, 1)).astype(np.float32))]),
    (helper.make_node("Elu", ["x"], ["y"], alpha=0.5), (2, 5), []),
    (helper.make_node("HardSigmoid", ["x"], ["y"]), (2, 5), []),
    (helper.make_node("Tanh", ["x"], ["y"]), (2, 5), []),
    (helper.make_node("Softplus", ["x"], ["y"]), (2, 5), []),
    (helper.make_node("Max", ["x", "c"], ["y"]), (2, 5), [("c", rng.normal(size=5).astype(np.float32))]),
    (helper.make_node("Pad", ["x", "pads", "v"], ["y"]), (1, 2, 3, 3),
     [("pads", np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)), ("v", np.array(1.5, np.float32))]),
    (helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect"), (1, 2, 4, 4),
     [("pads", np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64))]),
]


@pytest.mark.parametrize("node,x_shape,inits", CASES, ids=[c[0].op_type + str(i) for i, c in enumerate(CASES)])
def test_ops_match_onnxruntime(node, x_shape, inits):
    model = one_node_model(node, x_shape, inits)
    x = rng.normal(size=x_shape).astype(np.float32) * 3
    # fp32 sums of up to 147 products (the 7x7 stem) that BLAS and ORT add in different orders
    # (and with or without FMA, by CPU): the rounding error grows like sqrt(terms) * eps *
    # sum|terms| ~ 2e-5 here, so atol 1e-5 failed on an AVX-512 Xeon; 1e-4 still catches any
    # real indexing or padding error (those are O(1)).
    np.testing.assert_allclose(NumpyGraph(model).run(x), run_ort(model, x), rtol=1e-5, atol=1e-4)


def test_hardswish_matches_onnxruntime():  # opset 14, not in CASES' opset 13
    model = one_node_model(helper.make_node("HardSwish", ["x"], ["y"]), (2, 5))
    model.opset_import[0].version = 14
    x = rng.normal(size=(2, 5)).astype(np.float32) * 4
    np.testing.assert_allclose(NumpyGraph(model).run(x), run_ort(model, x), rtol=1e-5, atol=1e-6)


def test_unsupported_op_is_named():
    model = one_node_model(helper.make_node("Hardmax", ["x"], ["y"]), (1, 4, 5, 5))
    with pytest.raises(UserError, match="unsupported ONNX op.*Hardmax"):
        NumpyGraph(model)


def test_hook_replaces_and_keep_returns_tensors():
    w = np.ones((2, 3, 1, 1), np.float32)
    model = one_node_model(helper.make_node("Conv", ["x", "w"], ["y"]), (1, 3, 2, 2), [("w", w)])
    graph = NumpyGraph(model)
    seen = []

    def hook(node, inputs):
        seen.append(node.op_type)
        return np.zeros((1, 2, 2, 2), np.float32)

    assert graph.run(np.ones((1, 3, 2, 2), np.float32), hook=hook).sum() == 0 and seen == ["Conv"]
    kept = graph.run(np.ones((1, 3, 2, 2), np.float32), keep={"y"})
    assert kept["y"][0, :, 0, 0].tolist() == [3.0, 3.0]
