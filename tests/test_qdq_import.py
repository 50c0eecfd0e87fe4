"""Quantized ONNX in: QDQ models compile with their own scales, zero points and weights.

A tiny CNN (every fusion / scale-sharing case) quantized by onnxruntime.quantization in the
test (u8 asymmetric activations, s8 per-channel weights): compiled without calibration, the
library is bit-exact with its numpy reference and close to ONNX Runtime on the same model;
weights are imported exactly (ternary per group at the group size found, int4, int8);
constructs we cannot run exactly are refused with one line naming the node.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from tiny_models import ort_qdq, tiny_cnn, tiny_images
from tvm_ternary.cli import main
from tvm_ternary.compiler import compile_model
from tvm_ternary.passes.onnx_normalize import normalize_onnx
from tvm_ternary.plan import QuantConfig, simulate
from tvm_ternary.quant.imported import import_weights


def _ort(model, x):
    # ONNX Runtime's QDQ graph as written (DequantizeLinear -> float op -> QuantizeLinear), not
    # its fused int8 kernels: on CPUs without VNNI their u8 x s8 vpmaddubsw pairs saturate at
    # int16 (measured: 7 steps off on an AVX2-only Zen 3), so they are not the semantics
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])


@pytest.fixture(scope="module")
def qdq_conv_head():
    return ort_qdq(tiny_cnn(conv_head=True), tiny_images(32))


@pytest.fixture(scope="module")
def compiled(qdq_conv_head):
    return compile_model(qdq_conv_head, config=QuantConfig(), progress=False)


def test_reads_scales_and_zero_points_from_the_model(qdq_conv_head, compiled):
    prep = normalize_onnx(qdq_conv_head)
    assert prep.is_quantized
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in prep.model.graph.node)
    quants = prep.activation_quants
    assert quants["input"].zero_point != 0  # ORT's asymmetric u8 of a signed tensor
    inits = {t.name: numpy_helper.to_array(t) for t in qdq_conv_head.graph.initializer}
    q = next(n for n in qdq_conv_head.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    assert quants["input"].scale == float(inits[q.input[1]])
    assert quants["input"].zero_point == int(inits[q.input[2]])
    plan = compiled.plan
    assert plan.source == "model"
    assert plan.layers["conv1"].input_quant == quants["input"]
    assert set(plan.layers) == {row["layer"] for row in plan.coverage()}  # every layer quantized
    assert not compiled.rewrite.left_float


def test_library_is_bit_exact_with_reference_and_close_to_ort(qdq_conv_head, compiled):
    x = tiny_images(40, seed=7)
    ours = compiled.run(x)
    np.testing.assert_array_equal(ours, simulate(compiled.plan, x))
    theirs = _ort(qdq_conv_head, x)
    step = compiled.plan.layers["head"].output_quant.scale
    diff = np.abs(ours - theirs) / step
    # Same integer grid and the same roundings (the model's Q/DQ on float paths are kept); ORT
    # requantizes in float, we in fixed point: a near-tie may land one step apart, rarely.
    assert np.all(np.isclose(diff, np.rint(diff), atol=1e-3))
    assert diff.max() <= 1 and np.mean(diff == 0) >= 0.99


def test_cli_compiles_a_qdq_model_without_calib(tmp_path, qdq_conv_head, capsys):
    path = tmp_path / "tiny_qdq.onnx"
    onnx.save(qdq_conv_head, path)
    rc = main(["compile", str(path), "-o", str(tmp_path / "tiny.so")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "quantization: read from the model" in out
    assert "model: int8 per channel, exact" in out and "tt_conv" in out


def _with_per_channel_activation_scale(model):
    model = onnx.ModelProto.FromString(model.SerializeToString())
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "res_b")
    for t in model.graph.initializer:
        if t.name == q.input[1]:
            t.CopyFrom(numpy_helper.from_array(np.full(32, numpy_helper.to_array(t), np.float32), t.name))
        if t.name == q.input[2]:
            t.CopyFrom(numpy_helper.from_array(np.zeros(32, np.uint8), t.name))
    for n in model.graph.node:
        if q.input[1] in n.input and n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            n.attribute.append(onnx.helper.make_attribute("axis", 1))
    return model, q.name


def test_per_channel_activation_scale_is_refused_naming_the_node(tmp_path, qdq_conv_head, capsys):
    model, node = _with_per_channel_activation_scale(qdq_conv_head)
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    out = tmp_path / "bad.so"
    rc = main(["compile", str(path), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert node in err[0] and "per-channel activation scale" in err[0]
    assert not out.exists()


# --- weights ----------------------------------------------------------------------------------

def _ternary(shape, n, seed=0):
    rng = np.random.default_rng(seed)
    k, c = shape[:2]
    t = rng.integers(-1, 2, size=shape)
    groups = -(-c // n)
    q = rng.integers(1, 40, size=(k, groups) + tuple(shape[2:]))
    q_full = np.repeat(q, n, axis=1)[:, :c]
    return (t * q_full).astype(np.int32)


@pytest.mark.parametrize("shape,n", [((8, 16, 3, 3), 4), ((8, 16, 3, 3), 16), ((6, 24, 1, 1), 8),
                                     ((10, 32), 2), ((5, 12, 3, 3), 8)])
def test_ternary_groups_are_found_and_exact(shape, n):
    v = _ternary(shape, n)
    s = np.linspace(0.001, 0.01, shape[0]).astype(np.float32)
    w = (v.astype(np.float32) * s.reshape((-1,) + (1,) * (len(shape) - 1))).astype(np.float32)
    found = import_weights(w, channel_scales=s)
    assert found.weights.bits == 2 and found.exact
    assert found.weights.group_size >= n and found.weights.group_size % n == 0 \
        or found.weights.group_size == shape[1]
    np.testing.assert_array_equal(found.weights.dequantize(), w)
    np.testing.assert_array_equal(found.weights.decode_int8(), v)


@pytest.mark.parametrize("vmax,bits", [(7, 4), (127, 8)])
def test_integer_weights_are_exact_at_the_bits_they_need(vmax, bits):
    rng = np.random.default_rng(3)
    v = rng.integers(-vmax, vmax + 1, size=(8, 16, 3, 3))
    s = rng.uniform(1e-3, 1e-2, size=8).astype(np.float32)
    w = (v.astype(np.float32) * s[:, None, None, None]).astype(np.float32)
    found = import_weights(w, channel_scales=s)
    assert found.weights.bits == bits and found.exact
    np.testing.assert_array_equal(found.weights.dequantize(), w)


def test_blocked_ternary_without_channel_scale_is_approximated_and_says_so():
    rng = np.random.default_rng(4)
    t = rng.integers(-1, 2, size=(4, 16, 1, 1)).astype(np.float32)
    alpha = np.repeat(rng.uniform(0.1, 1.0, size=(4, 4, 1, 1)), 4, axis=1).astype(np.float32)
    found = import_weights(t * alpha)  # opset-21 blocked scales: no per-channel grid
    assert found.weights.bits == 2 and found.weights.group_size == 4
    assert not found.exact and "7-bit codes" in found.description and found.error < 0.01


def _blocked(model, layer: str, n: int):
    """``model`` (our emitted QDQ) with ``layer``'s weight as opset-21 blocked DequantizeLinear:
    int8 ternary values, one scale per block of ``n`` input channels (s_k * q_g)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name: t for t in model.graph.initializer}
    w = numpy_helper.to_array(inits[f"{layer}__qweight"]).astype(np.int32)
    s = numpy_helper.to_array(inits[f"{layer}__qweight_scale"])
    k, c = w.shape[:2]
    q = np.abs(w).reshape(k, c // n, n, *w.shape[2:]).max(axis=2)
    scale = (q.astype(np.float32) * s.reshape((-1,) + (1,) * (q.ndim - 1))).astype(np.float32)
    inits[f"{layer}__qweight"].CopyFrom(numpy_helper.from_array(np.sign(w).astype(np.int8), f"{layer}__qweight"))
    inits[f"{layer}__qweight_scale"].CopyFrom(numpy_helper.from_array(scale, f"{layer}__qweight_scale"))
    inits[f"{layer}__qweight_zero_point"].CopyFrom(
        numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{layer}__qweight_zero_point"))
    dq = next(nd for nd in model.graph.node if nd.name == f"{layer}__qweight_DequantizeLinear")
    del dq.attribute[:]
    dq.attribute.extend([onnx.helper.make_attribute("axis", 1), onnx.helper.make_attribute("block_size", n)])
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 21
    model.ir_version = max(model.ir_version, 10)
    return model


def test_blocked_dequantize_weights_import_as_ternary_groups():
    cm = compile_model(tiny_cnn(conv_head=True), config=QuantConfig(group_size=4),
                       calib_images=tiny_images(16), progress=False)
    from tvm_ternary.export_onnx import qdq_model

    model = _blocked(qdq_model(cm.plan), "res_a", 4)
    onnx.checker.check_model(model)
    again = compile_model(model, config=QuantConfig(), progress=False)
    row = next(r for r in again.plan.coverage() if r["layer"] == "res_a")
    assert row["weights"] == "ternary" and row["reason"].startswith("model: ternary N=")
    assert again.plan.layers["res_a"].weights.group_size % 4 == 0
    assert row["weight_error"] < 1e-5  # block scales s_k*q_g: integer ratios, codes recovered
    x = tiny_images(20, seed=3)
    ours = again.run(x)
    np.testing.assert_array_equal(ours, simulate(again.plan, x))
    # the integer codes come back exactly; the channel scales within a float32 ulp
    got_w, want_w = again.plan.layers["res_a"].weights, cm.plan.layers["res_a"].weights
    np.testing.assert_array_equal(got_w.decode_int8(), want_w.decode_int8())
    np.testing.assert_allclose(got_w.channel_scales, want_w.channel_scales, rtol=2e-7)
    np.testing.assert_array_equal(ours, cm.run(x))  # (no ulp reaches a rounding: seed fixed)
