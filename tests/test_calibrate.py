"""Pass 2 (calibration): the statistics are exact where they claim to be, the instrumented
module still computes the model, and the real models calibrate from an image folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from tvm_ternary import tvm_adapter as ta
from tvm_ternary.errors import UserError
from tvm_ternary.passes.calibrate import (HISTOGRAM_BINS, _Accumulator, calibrate,
                                          calibration_inputs)
from tvm_ternary.passes.import_onnx import import_onnx
from tvm_ternary.preprocess import PreprocessConfig

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "imagenet"
rng = np.random.default_rng(1)


def test_histogram_widens_without_losing_counts():
    acc = _Accumulator("t")
    first = rng.uniform(-1, 1, 10_000).astype(np.float32)
    second = rng.uniform(-50, 50, 10_000).astype(np.float32)  # forces several doublings
    acc.add_signed(first)
    acc.add_signed(second)
    stats = acc.result()
    both = np.abs(np.concatenate([first, second]))
    assert stats.count == both.size == stats.histogram.sum()
    assert stats.min == min(first.min(), second.min()) and stats.max == max(first.max(),
                                                                            second.max())
    assert stats.bin_width * HISTOGRAM_BINS >= stats.absmax
    assert stats.percentile(100) == stats.absmax
    for q in (50, 99, 99.9):  # percentile = upper edge of the bin holding it
        assert abs(stats.percentile(q) - np.percentile(both, q)) <= stats.bin_width
    assert not stats.histogram.flags.writeable


def test_all_zero_tensor_and_nan():
    acc = _Accumulator("z")
    acc.add_signed(np.zeros(10, np.float32))
    assert acc.result().absmax == 0 and acc.result().percentile(99) == 0
    with pytest.raises(UserError, match="NaN"):
        acc.add_signed(np.array([1.0, np.nan], np.float32))


def conv_model():
    """conv1 (1x1) -> relu -> conv2 (1x1): small enough to check statistics by hand."""
    w1 = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    w2 = rng.normal(size=(2, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), w1, w2


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    model, w1, w2 = conv_model()
    imported = import_onnx(model)
    samples = rng.normal(size=(3, 3, 4, 4)).astype(np.float32)
    path = tmp_path_factory.mktemp("calib") / "x.npy"
    np.save(path, samples)
    images = calibration_inputs(path, preprocess=None, input_shape=imported.input_shape)
    result = calibrate(imported, images=images, watch="all", progress=False)
    return imported, result, samples, w1, w2


def test_layer_statistics_are_exact(calibrated):
    imported, result, samples, w1, w2 = calibrated
    assert result.num_images == 3 and [l.name for l in result.layers] == ["conv1", "conv2"]
    c1 = np.einsum("kc,nchw->nkhw", w1[:, :, 0, 0], samples)
    c2 = np.einsum("kc,nchw->nkhw", w2[:, :, 0, 0], np.maximum(c1, 0))
    expected = [(samples, c1), (np.maximum(c1, 0), c2)]
    for layer, (x, y) in zip(result.layers, expected):
        # TVM's float32 1x1 conv vs numpy's einsum: summation order only.
        assert layer.input.min == pytest.approx(x.min(), rel=1e-5, abs=1e-6)
        assert layer.input.max == pytest.approx(x.max(), rel=1e-5)
        assert layer.output.absmax == pytest.approx(np.abs(y).max(), rel=1e-5)
        assert layer.output.count == y.size
    assert len(result.tensors) == 4  # input, conv1, relu, conv2 (watch="all")


def test_extra_outputs_keep_the_model_output(calibrated):
    imported = calibrated[0]
    names = [info.var_name for info in imported.layers]
    x = rng.normal(size=(1, 3, 4, 4)).astype(np.float32)
    plain = ta.run_relax_vm(ta.build_relax_vm(imported.module), x)
    watched = ta.run_relax_vm(ta.build_relax_vm(ta.with_extra_outputs(imported.module, names)), x)
    assert len(plain) == 1 and len(watched) == 3
    np.testing.assert_array_equal(plain[0], watched[0])
    np.testing.assert_array_equal(watched[2], plain[0])  # conv2 is the model output


def test_calibration_inputs_errors(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 5, 5), np.float32))
    with pytest.raises(UserError, match="expected \\[N, 3, 4, 4\\]"):
        calibration_inputs(tmp_path / "bad.npy", preprocess=None, input_shape=(1, 3, 4, 4))
    np.save(tmp_path / "one.npy", np.zeros((1, 3, 4, 4), np.float32))
    assert calibration_inputs(tmp_path / "one.npy", preprocess=None,
                              input_shape=(1, 3, 4, 4)).shape == (1, 3, 4, 4)
    np.save(tmp_path / "many.npy", np.zeros((5, 3, 4, 4), np.float32))
    assert len(calibration_inputs(tmp_path / "many.npy", preprocess=None,
                                  input_shape=(1, 3, 4, 4), limit=2)) == 2
    with pytest.raises(UserError, match="preprocessing"):
        calibration_inputs(tmp_path, preprocess=None, input_shape=(1, 3, 4, 4))
    with pytest.raises(UserError, match="positive"):
        calibration_inputs(tmp_path / "many.npy", preprocess=None, input_shape=(1, 3, 4, 4),
                           limit=0)


@pytest.mark.skipif(not (SHARED / "models").is_dir(), reason="shared ImageNet data not present")
def test_real_squeezenet_calibrates_from_image_folder(capsys):
    imported = import_onnx(SHARED / "models" / "squeezenet1.1.onnx")
    config = PreprocessConfig.preset("caffe")
    images = calibration_inputs(SHARED / "images" / "val200", preprocess=config,
                                input_shape=imported.input_shape, limit=3)
    result = calibrate(imported, images=images, preprocess=config, progress=True)
    assert result.num_images == 3 and len(result.layers) == 26
    first = result.layers[0]
    # caffe preprocessing: 0..255 minus (104, 117, 123), so the input spans about [-123, 151].
    assert -124 <= first.input.min < -90 and 100 < first.input.max <= 152
    for layer in result.layers[1:]:  # every later conv reads a ReLU output (or a pool of one)
        assert layer.input.min >= 0 and layer.input.absmax > 0
        assert layer.input.percentile(99.99) <= layer.input.absmax
    assert "calibrating" in capsys.readouterr().err  # tqdm progress on stderr


@pytest.mark.parametrize("channels, out, kernel, stride, pads, dilation, groups", [
    (3, 8, 3, 2, (1, 1, 1, 1), 1, 1),   # first-layer style
    (8, 8, 3, 1, (1, 0, 1, 2), 2, 8),   # depthwise, asymmetric padding, dilation
    (8, 4, 1, 1, (0, 0, 0, 0), 1, 1),   # pointwise
    (8, 6, 3, 1, (1, 1, 1, 1), 1, 2),   # grouped
])
def test_numpy_conv2d_matches_onnxruntime(channels, out, kernel, stride, pads, dilation, groups):
    from tvm_ternary.passes.calib_offload import numpy_conv2d

    ort = pytest.importorskip("onnxruntime")
    x = rng.normal(size=(1, channels, 11, 10)).astype(np.float32)
    w = rng.normal(size=(out, channels // groups, kernel, kernel)).astype(np.float32)
    top, left, bottom, right = pads  # Relax order; ONNX wants (top, left, bottom, right) too
    node = helper.make_node("Conv", ["x", "w"], ["y"], strides=[stride] * 2,
                            pads=[top, left, bottom, right], dilations=[dilation] * 2,
                            group=groups)
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    ref = ort.InferenceSession(model.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ours = numpy_conv2d(x, w, strides=(stride, stride), padding=pads,
                        dilation=(dilation, dilation), groups=groups)
    # float32 sums of ≤ 72 products of unit normals, different order: ~1e-6 absolute.
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_numpy_and_tvm_conv_backends_agree(calibrated):
    imported, result, samples = calibrated[:3]
    tvm_result = calibrate(imported, images=samples, watch="all", conv_backend="tvm",
                           progress=False)
    for name, stats in result.tensors.items():
        other = tvm_result.tensors[name]
        assert other.min == pytest.approx(stats.min, rel=1e-5, abs=1e-6)
        assert other.max == pytest.approx(stats.max, rel=1e-5, abs=1e-6)


def test_offload_docstring_and_cleanup():
    import doctest

    import tvm_ffi

    from tvm_ternary.passes import calib_offload

    assert doctest.testmod(calib_offload).failed == 0
    imported = import_onnx(conv_model()[0])
    with calib_offload.NumpyConvOffload(imported.module) as offload:
        names = list(offload.names)
        assert len(names) == 2 and tvm_ffi.get_global_func(names[0], allow_missing=True)
    assert tvm_ffi.get_global_func(names[0], allow_missing=True) is None
