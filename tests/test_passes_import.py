"""Pass 1 (ONNX import and clean-up): structure of the imported Relax module and its numbers.

Numerical checks run the imported module with TVM (untuned build, fine for tiny graphs) and
compare with ONNX Runtime on the original ONNX model, which is the reference semantics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tvm_ternary import tvm_adapter as ta
from tvm_ternary.errors import UserError
from tvm_ternary.passes.import_onnx import import_onnx
from tvm_ternary.passes.onnx_normalize import parse_input_shape

ort = pytest.importorskip("onnxruntime")

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "imagenet"
rng = np.random.default_rng(0)


def make_model(nodes, inits, *, opset=13, in_shape=(1, 3, 8, 8), out_shape=None,
               dtype=TensorProto.FLOAT, weights_as_inputs=False):
    inputs = [helper.make_tensor_value_info("x", dtype, list(in_shape))]
    if weights_as_inputs:  # IR < 4 style (Caffe2): every initializer is a graph input too
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    outputs = [helper.make_tensor_value_info("y", dtype, out_shape)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = helper.find_min_ir_version_for(opsets)  # what ORT accepts per opset
    return model


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def ops_in(mod):
    return [ta.call_op_name(value) for _, value in ta.main_bindings(mod)]


def run_tvm(imported, x):
    vm = ta.build_relax_vm(imported.bound_module())
    return ta.run_relax_vm(vm, x.astype(np.float32))[0]


def run_ort(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def conv_bn_model(*, conv_bias: bool, opset: int = 15):
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    inits = [init("w", w), init("gamma", rng.uniform(0.5, 2, 4).astype(np.float32)),
             init("beta", rng.normal(size=4).astype(np.float32)),
             init("mean", rng.normal(size=4).astype(np.float32)),
             init("var", rng.uniform(0.1, 2, 4).astype(np.float32))]
    conv_in = ["x", "w"]
    if conv_bias:
        inits.append(init("b", rng.normal(size=4).astype(np.float32)))
        conv_in.append("b")
    nodes = [helper.make_node("Conv", conv_in, ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"],
                              ["bn"], epsilon=1e-3),
             helper.make_node("Relu", ["bn"], ["y"])]
    return make_model(nodes, inits, opset=opset, out_shape=[1, 4, 8, 8])


@pytest.mark.parametrize("conv_bias", [False, True])
def test_batch_norm_folds_into_conv(conv_bias):
    model = conv_bn_model(conv_bias=conv_bias)
    imported = import_onnx(model)
    ops = ops_in(imported.module)
    assert "relax.nn.batch_norm" not in ops
    assert ops.count("relax.nn.conv2d") == 1
    assert any("BatchNormalization" in note for note in imported.notes)
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    # Folding rescales each weight once (float64, rounded to float32): results differ from the
    # unfolded graph by float32 rounding only, well inside 1e-4 relative at these magnitudes.
    np.testing.assert_allclose(run_tvm(imported, x), run_ort(model, x), rtol=1e-4, atol=1e-4)


def test_batch_norm_without_conv_is_decomposed():
    inits = [init(n, rng.uniform(0.5, 1.5, 3).astype(np.float32))
             for n in ("gamma", "beta", "mean", "var")]
    nodes = [helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["y"])]
    model = make_model(nodes, inits, opset=9, out_shape=[1, 3, 8, 8])
    imported = import_onnx(model)
    assert "relax.nn.batch_norm" not in ops_in(imported.module)
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_tvm(imported, x), run_ort(model, x), rtol=1e-5, atol=1e-5)


def small_cnn(opset: int):
    """Conv -> Relu -> MaxPool -> Dropout -> Identity -> Flatten -> Gemm(transB), any opset."""
    inits = [init("w", rng.normal(size=(8, 3, 3, 3)).astype(np.float32)),
             init("b", rng.normal(size=8).astype(np.float32)),
             init("fw", rng.normal(size=(5, 32)).astype(np.float32)),
             init("fb", rng.normal(size=5).astype(np.float32))]
    dropout = (helper.make_node("Dropout", ["p"], ["d"], ratio=0.3) if opset < 12
               else helper.make_node("Dropout", ["p"], ["d"]))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv1"),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], strides=[3, 3]),
             dropout,
             helper.make_node("Identity", ["d"], ["i"]),
             helper.make_node("Flatten", ["i"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1, name="fc")]
    return make_model(nodes, inits, opset=opset, out_shape=[1, 5])


@pytest.mark.parametrize("opset", [7, 11, 13, 17, 21])
def test_opsets_import_clean_and_match_onnxruntime(opset):
    model = small_cnn(opset)
    imported = import_onnx(model)
    ops = ops_in(imported.module)
    assert "relax.nn.dropout" not in ops
    assert [(layer.name, layer.op_type) for layer in imported.layers] == [
        ("conv1", "conv"), ("fc", "dense")]
    assert imported.opset == opset and imported.output_shape == (1, 5)
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    # Same float32 ops in a different summation order: a few ulp of the ~10-magnitude outputs.
    np.testing.assert_allclose(run_tvm(imported, x), run_ort(model, x), rtol=1e-4, atol=1e-4)


def test_fp16_model_with_weights_as_inputs_computes_in_fp32():
    w = rng.normal(size=(4, 3, 1, 1)).astype(np.float16)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Cast", ["c"], ["c16"], to=TensorProto.FLOAT16),
             helper.make_node("Relu", ["c16"], ["y"])]
    model = make_model(nodes, [init("w", w)], opset=7, dtype=TensorProto.FLOAT16,
                       out_shape=[1, 4, 8, 8], weights_as_inputs=True)
    imported = import_onnx(model)
    func = imported.module["main"]
    # the data input, then the layer's weight (a parameter of its own, not a second data input)
    assert [ta.var_name(p) for p in func.params] == ["x", "w"]
    assert [layer.weight_param for layer in imported.layers] == ["w"]
    assert all(ta.tensor_dtype(p) == "float32" for p in func.params)
    assert len(imported.bound_module()["main"].params) == 1
    assert all(ta.tensor_dtype(var) != "float16" for var, _ in ta.main_bindings(imported.module))
    assert imported.input_dtype == "float16" and imported.output_dtype == "float16"
    assert imported.layers[0].weight_dtype == "float16"
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float16)
    # ORT computes in fp16 (≈3 significant digits); we compute the same values in fp32.
    np.testing.assert_allclose(run_tvm(imported, x), run_ort(model, x).astype(np.float32),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_dequantize_linear_weights_fold_to_constants(per_channel):
    q = rng.integers(-127, 128, size=(4, 3, 3, 3)).astype(np.int8)
    scale = (rng.uniform(0.01, 0.1, 4) if per_channel else np.array(0.05)).astype(np.float32)
    zp = np.zeros(scale.shape, np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
             helper.make_node("Conv", ["x", "w"], ["y"], name="qconv")]
    model = make_model(nodes, [init("wq", q), init("ws", scale), init("wz", zp)],
                       opset=13, out_shape=[1, 4, 6, 6])
    imported = import_onnx(model)
    assert "relax.dequantize" not in ops_in(imported.module)
    assert imported.int8_weight_layers == ("qconv",)
    assert any("DequantizeLinear" in note for note in imported.notes)
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_tvm(imported, x), run_ort(model, x), rtol=1e-5, atol=1e-5)


def test_dynamic_batch_needs_input_shape():
    model = small_cnn(13)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    with pytest.raises(UserError, match="--input-shape x:1,3,8,8"):
        import_onnx(model)
    imported = import_onnx(model, input_shapes={"x": (1, 3, 8, 8)})
    assert imported.input_shape == (1, 3, 8, 8)
    with pytest.raises(UserError, match="model input is 'x'"):
        import_onnx(model, input_shapes={"data": (1, 3, 8, 8)})
    with pytest.raises(UserError, match="dim 1 is fixed to 3"):
        import_onnx(model, input_shapes={"x": (1, 4, 8, 8)})


def test_parse_input_shape():
    assert parse_input_shape("input.1:1,3,224,224") == ("input.1", (1, 3, 224, 224))
    for bad in ("1,3,224,224", "x:", "x:1,a", "x:0,3"):
        with pytest.raises(UserError):
            parse_input_shape(bad)


def test_unsupported_op_is_a_user_error():
    nodes = [helper.make_node("NoSuchOp", ["x"], ["y"])]
    with pytest.raises(UserError, match="ONNX frontend"):
        import_onnx(make_model(nodes, [], out_shape=[1, 3, 8, 8]))


# --------------------------------------------------------------------------- real models

requires_models = pytest.mark.skipif(not (SHARED / "models").is_dir(),
                                     reason="shared ImageNet models not present")


@requires_models
def test_real_mobilenet_int8_weights_structure():
    imported = import_onnx(SHARED / "models" / "mobilenet_v2_wint8.onnx")
    ops = ops_in(imported.module)
    assert "relax.dequantize" not in ops
    assert len(imported.layers) == 53 and len(imported.int8_weight_layers) == 53
    assert imported.layers[-1].op_type == "dense"
    assert imported.input_shape == (1, 3, 224, 224) and imported.output_shape == (1, 1000)


@requires_models
def test_real_squeezenet_matches_onnxruntime_top1():
    from tvm_ternary.preprocess import PreprocessConfig, load_image_folder, preprocess_images

    path = SHARED / "models" / "squeezenet1.1.onnx"
    imported = import_onnx(path)
    ops = ops_in(imported.module)
    assert "relax.nn.dropout" not in ops and len(imported.layers) == 26
    assert imported.input_dtype == "float16"
    paths, _ = load_image_folder(SHARED / "images" / "val200", limit=2)
    x = preprocess_images(paths, config=PreprocessConfig.preset("caffe"), dtype="float16")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    vm = ta.build_relax_vm(imported.bound_module())
    for sample in x:
        ours = ta.run_relax_vm(vm, sample[None].astype(np.float32))[0].reshape(-1)
        ref = session.run(None, {"data_0": sample[None]})[0].reshape(-1).astype(np.float32)
        assert int(np.argmax(ours)) == int(np.argmax(ref))
        # Probabilities: fp16 (ORT) vs fp32 (ours) through 26 convs; observed max diff < 1e-2.
        assert np.abs(ours - ref).max() < 0.03


def test_docstring_examples():
    import doctest

    from tvm_ternary.passes import onnx_normalize

    result = doctest.testmod(onnx_normalize)
    assert result.attempted > 0 and result.failed == 0


@requires_models
@pytest.mark.slow
def test_real_mobilenet_matches_onnxruntime_top1():
    from tvm_ternary.preprocess import PreprocessConfig, load_image_folder, preprocess_images

    path = SHARED / "models" / "mobilenet_v2_wint8.onnx"
    imported = import_onnx(path)
    paths, _ = load_image_folder(SHARED / "images" / "val200", limit=4)
    x = preprocess_images(paths, config=PreprocessConfig.preset("torchvision"))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    vm = ta.build_relax_vm(imported.bound_module())
    for sample in x:
        ours = ta.run_relax_vm(vm, sample[None])[0].reshape(-1)
        ref = session.run(None, {"input": sample[None]})[0].reshape(-1)
        assert int(np.argmax(ours)) == int(np.argmax(ref))
        # Both fp32 with the same dequantized weights: observed max relative diff ~1e-6.
        assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
