"""onnx_io: load errors; weights from fp16, graph inputs, DequantizeLinear, Gemm, MatMul."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tvm_ternary.errors import BadWeightError, InvalidModelError, ModelFileError, UserError
from tvm_ternary.onnx_io import LayerWeight, find_weighted_layers, load_model

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet" / "models"
needs_real_models = pytest.mark.skipif(not MODELS.is_dir(), reason=f"{MODELS} not present")
RNG = np.random.default_rng(0)


def make_model(nodes, initializers, *, inputs=None, outputs=None, opset=13, ir_version=8,
               weights_as_inputs=False):
    """A graph from `x` [1, C, 8, 8] float to `y`, with initializers (numpy dict) as constants."""
    tensors = [numpy_helper.from_array(value, name) for name, value in initializers.items()]
    if inputs is None:
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])]
    if weights_as_inputs:  # IR < 4 exporters (Caffe2) list every initializer as an input too
        inputs = inputs + [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in tensors]
    outputs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)]
    graph = helper.make_graph(nodes, "test", inputs, outputs, tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def conv_model(weight, **kwargs):
    return make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                      {"w": weight}, **kwargs)


def save(model, tmp_path, name="model.onnx") -> Path:
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


# --- load_model ---------------------------------------------------------------------------------


def test_load_model_reads_a_valid_file(tmp_path):
    path = save(conv_model(RNG.normal(size=(8, 4, 3, 3)).astype(np.float32)), tmp_path)
    assert load_model(path).graph.node[0].op_type == "Conv"


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "no such file"),
        (b"", "empty"),
        (b"hello, this is plain text\n", "not an ONNX model"),
        (bytes(RNG.integers(0, 256, 4000, dtype=np.uint8)), "not an ONNX model"),
    ],
)
def test_load_model_rejects_bad_files(tmp_path, content, expected):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelFileError, match=expected) as caught:
        load_model(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_load_model_rejects_a_directory(tmp_path):
    with pytest.raises(ModelFileError, match="directory"):
        load_model(tmp_path)


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.1])
def test_load_model_says_truncated(tmp_path, keep):
    data = conv_model(RNG.normal(size=(8, 4, 3, 3)).astype(np.float32)).SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelFileError, match="truncated"):
        load_model(path)


def test_load_model_reports_checker_failures_on_one_line(tmp_path):
    node = helper.make_node("Conv", ["x", "missing_weight"], ["y"])
    with pytest.raises(InvalidModelError, match="checker") as caught:
        load_model(save(make_model([node], {}), tmp_path))
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, UserError)


# --- find_weighted_layers -----------------------------------------------------------------------


def test_conv_attributes_bias_and_output_size():
    weight = RNG.normal(size=(8, 2, 3, 3)).astype(np.float32)
    bias = RNG.normal(size=8).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="c1", group=2, strides=[2, 2],
                            pads=[1, 1, 1, 1], dilations=[1, 1])
    [layer] = find_weighted_layers(make_model([node], {"w": weight, "b": bias}))
    assert (layer.name, layer.op_type, layer.onnx_op_type) == ("c1", "conv", "Conv")
    assert (layer.groups, layer.strides, layer.pads, layer.dilations) == (2, (2, 2), (1, 1, 1, 1), (1, 1))
    np.testing.assert_array_equal(layer.weight, weight)
    np.testing.assert_array_equal(layer.bias, bias)
    assert layer.output_spatial == (4, 4) and layer.macs == weight.size * 16
    assert layer.reads_model_input and not layer.is_depthwise
    assert not layer.weight.flags.writeable


def test_fp16_weights_listed_as_graph_inputs_become_float32():
    weight = RNG.normal(size=(8, 4, 3, 3)).astype(np.float16)
    model = conv_model(weight, opset=7, ir_version=3, weights_as_inputs=True)
    onnx.checker.check_model(model)
    [layer] = find_weighted_layers(model)
    assert layer.weight.dtype == np.float32
    np.testing.assert_array_equal(layer.weight, weight.astype(np.float32))


def test_unnamed_nodes_are_named_after_their_output():
    node = helper.make_node("Conv", ["x", "w"], ["conv_out"])
    model = make_model([node, helper.make_node("Relu", ["conv_out"], ["y"])],
                       {"w": np.ones((2, 4, 1, 1), np.float32)})
    assert find_weighted_layers(model)[0].name == "conv_out"


def test_dequantize_linear_per_channel_int8():
    quantized = RNG.integers(-128, 128, size=(6, 4, 3, 3), dtype=np.int8)
    scale = RNG.uniform(0.01, 0.1, size=6).astype(np.float32)
    zero_point = RNG.integers(-3, 4, size=6, dtype=np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
             helper.make_node("Conv", ["x", "w"], ["y"], name="qconv")]
    [layer] = find_weighted_layers(make_model(nodes, {"wq": quantized, "ws": scale, "wz": zero_point}))
    expected = (quantized.astype(np.float32) - zero_point[:, None, None, None]) * scale[:, None, None, None]
    np.testing.assert_allclose(layer.weight, expected, rtol=1e-6)


def test_dequantize_linear_per_tensor_uint8_matches_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    constants = {"wq": RNG.integers(0, 256, size=(3, 5), dtype=np.uint8),
                 "ws": np.array(0.05, np.float32), "wz": np.array(128, np.uint8)}
    dequantize = helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"])
    reference_model = make_model([dequantize], constants, inputs=[],
                                 outputs=[helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 5])])
    reference = ort.InferenceSession(reference_model.SerializeToString()).run(None, {})[0]
    matmul = make_model([dequantize, helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
                        constants, inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])])
    [layer] = find_weighted_layers(matmul)
    np.testing.assert_array_equal(layer.weight, reference.T)  # MatMul's [C, K] as [K, C]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_weight_is_k_by_c_with_alpha_and_beta(trans_b):
    weight_kc = RNG.normal(size=(5, 3)).astype(np.float32)
    bias = RNG.normal(size=5).astype(np.float32)
    stored = weight_kc if trans_b else weight_kc.T
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=trans_b,
                            alpha=2.0, beta=0.5)
    model = make_model([node], {"w": stored, "b": bias},
                       inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])])
    [layer] = find_weighted_layers(model)
    assert layer.op_type == "dense" and layer.macs == 15
    np.testing.assert_allclose(layer.weight, 2.0 * weight_kc)
    np.testing.assert_allclose(layer.bias, 0.5 * bias)


def test_matmul_constant_weight_is_transposed_and_runtime_weight_skipped():
    weight_ck = RNG.normal(size=(3, 4)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 4])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("MatMul", ["h", "z"], ["y"], name="runtime_weight")]
    [layer] = find_weighted_layers(make_model(nodes, {"w": weight_ck}, inputs=[x, z]))
    assert layer.name == "fc"
    np.testing.assert_array_equal(layer.weight, weight_ck.T)


def test_weights_through_identity_cast_and_transpose():
    weight = RNG.normal(size=(4, 4, 1, 1)).astype(np.float16)
    nodes = [helper.make_node("Transpose", ["w16"], ["wt"], perm=[1, 0, 2, 3]),
             helper.make_node("Identity", ["wt"], ["wi"]),
             helper.make_node("Cast", ["wi"], ["w"], to=TensorProto.FLOAT),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    [layer] = find_weighted_layers(make_model(nodes, {"w16": weight}))
    np.testing.assert_array_equal(layer.weight, weight.transpose(1, 0, 2, 3).astype(np.float32))


def test_model_without_conv_has_no_layers():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], {})
    assert find_weighted_layers(model) == []


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weight_names_the_layer(bad):
    weight = np.ones((2, 4, 3, 3), np.float32)
    weight[1, 2, 0, 0] = bad
    with pytest.raises(BadWeightError, match="layer conv.*NaN/Inf"):
        find_weighted_layers(conv_model(weight))


def test_layer_weight_is_frozen():
    layer = LayerWeight(name="fc", op_type="dense", node_name="fc", onnx_op_type="Gemm",
                        weight=np.zeros((2, 3), np.float32))
    with pytest.raises(AttributeError):
        layer.name = "other"


# --- the real models ----------------------------------------------------------------------------


@needs_real_models
def test_squeezenet_fp16_weights_as_graph_inputs():
    layers = find_weighted_layers(load_model(MODELS / "squeezenet1.1.onnx"))
    assert len(layers) == 26 and all(layer.op_type == "conv" for layer in layers)
    assert layers[0].weight.shape == (64, 3, 3, 3) and layers[0].weight.dtype == np.float32
    assert [layer.name for layer in layers if layer.reads_model_input] == [layers[0].name]
    assert 340e6 < sum(layer.macs for layer in layers) < 360e6  # SqueezeNet 1.1: ~350 M MACs


@needs_real_models
def test_mobilenet_int8_weights_behind_dequantize_linear():
    model = load_model(MODELS / "mobilenet_v2_wint8.onnx")
    layers = find_weighted_layers(model)
    assert len(layers) == 53
    assert sum(layer.is_depthwise for layer in layers) == 17
    assert [layer.op_type for layer in layers].count("dense") == 1
    assert layers[-1].weight.shape == (1000, 1280)
    # First conv: check against the initializers by hand.
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    expected = (inits["W_1_q"].astype(np.float32) - inits["W_1_zp"]) * inits["W_1_s"]
    np.testing.assert_allclose(layers[0].weight, expected, rtol=1e-6)
