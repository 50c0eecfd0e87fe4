"""Quantization plan: fusion analysis, policy, integer simulation on a tiny CNN."""

import numpy as np
import pytest
from tiny_models import tiny_cnn, tiny_images

from tvm_ternary.numpy_graph import NumpyGraph
from tvm_ternary.plan import QuantConfig, analyse, make_plan, simulate
from tvm_ternary.plan.summary import plan_summary
from tvm_ternary.quant import quantize_activation


@pytest.fixture(scope="module")
def model():
    return tiny_cnn()


def test_fusion_analysis(model):
    layers = {l.name: l for l in analyse(model).layers}
    assert layers["conv1"].relu and layers["conv1"].residual is None
    assert layers["res_b"].residual == "fire_cat" and layers["res_b"].relu
    assert layers["res_b"].root == "res_out" and layers["res_b"].skipped == ("res_b", "res_add")
    assert not layers["fc"].relu
    groups = analyse(model).scale_groups
    # the concat's inputs and output share one scale; so do the maxpool's
    assert groups["fire_e1_relu"] == groups["fire_e3_relu"] == groups["fire_cat"]
    assert groups["conv1_relu"] == groups["pool1"]


def test_policy_keeps_first_last_depthwise_at_8bit(model):
    plan = make_plan(model, tiny_images(8), config=QuantConfig(group_size=4, method="exact"), progress=False)
    bits = {name: d.bits for name, d in plan.decisions.items()}
    assert bits == {"conv1": 8, "fire_squeeze": 2, "fire_e1": 2, "fire_e3": 2, "res_a": 2,
                    "res_b": 2, "dw": 8, "fc": 8}
    reasons = {row["layer"]: row["reason"] for row in plan.coverage()}
    assert reasons["conv1"] == "first layer" and reasons["dw"] == "depthwise" and reasons["fc"] == "last layer"
    # concat inputs quantized with one shared scale, so the concat runs on integers
    assert plan.layers["fire_e1"].output_quant == plan.layers["fire_e3"].output_quant


def test_override_by_name_and_float(model):
    cfg = QuantConfig(group_size=4, method="exact", overrides=(("res_a", 4), ("fc", 0)))
    plan = make_plan(model, tiny_images(4), config=cfg, progress=False)
    assert plan.decisions["res_a"].bits == 4 and plan.decisions["fc"].bits == 0
    assert "fc" not in plan.layers
    assert [r["weights"] for r in plan.coverage() if r["layer"] == "fc"] == ["float"]


@pytest.mark.parametrize("pointwise, overrides, want", [
    (None, (), {"fire_squeeze": 4, "fire_e1": 4, "fire_e3": 4, "res_a": 4, "res_b": 4}),
    (2, (), {"fire_squeeze": 2, "fire_e1": 2, "fire_e3": 4, "res_a": 4, "res_b": 4}),
    (2, (("fire_e1", 8), ("res_a", 2)), {"fire_squeeze": 2, "fire_e1": 8, "fire_e3": 4, "res_a": 2, "res_b": 4}),
    (8, (), {"fire_squeeze": 8, "fire_e1": 8, "fire_e3": 4, "res_a": 4, "res_b": 4}),
])
def test_pointwise_group_size_applies_to_1x1_convs(model, pointwise, overrides, want):
    """1x1 convs (fire_squeeze, fire_e1) get pointwise_group_size; 3x3 ones group_size; a
    per-layer group_overrides entry wins over both; the precise layers have no groups."""
    cfg = QuantConfig(method="exact", pointwise_group_size=pointwise, group_overrides=overrides)
    plan = make_plan(model, tiny_images(4), config=cfg, progress=False)
    got = {name: lp.weights.group_size for name, lp in plan.layers.items() if lp.weights.bits == 2}
    assert got == want
    formats = {name: fmt for name, fmt in plan_summary(plan)["layer_formats"].items() if name in want}
    assert formats == {name: "ternary" if n == 4 else f"ternary N={n}" for name, n in want.items()}


def test_pointwise_group_size_is_validated_and_checked_against_channels(model):
    from tvm_ternary.errors import OptionError
    from tvm_ternary.inputs import check_config

    with pytest.raises(ValueError, match="pointwise group size must be a positive integer"):
        QuantConfig(pointwise_group_size=0)
    # fire_e1 reads fire_squeeze's 8 channels
    with pytest.raises(OptionError, match="layer fire_e1: group size N=16 exceeds its 8 input channels "
                                          r"\(use --pointwise-group-size 8 or less"):
        check_config(model, QuantConfig(pointwise_group_size=16))


def test_eight_bit_simulation_tracks_float(model):
    """8-bit weights and activations: logits within a few quantization steps of float."""
    calib, x = tiny_images(32), tiny_images(8, seed=7)
    plan = make_plan(model, calib, config=QuantConfig(weight_bits=8, method="exact"), progress=False)
    want = NumpyGraph(model).run(x)
    got = simulate(plan, x)
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.75


def test_simulated_layers_are_integer_and_chain_without_float_rounding(model):
    """Each integer layer's output, fed to the next, re-quantizes to exactly the same ints."""
    plan = make_plan(model, tiny_images(8), config=QuantConfig(method="exact"), progress=False)
    ints = {}
    simulate(plan, tiny_images(2, seed=3), keep_int=ints)
    e1 = plan.layers["fire_e1"]
    assert ints["fire_e1"].dtype == np.uint8  # after ReLU: unsigned
    deq = ints["fire_e1"].astype(np.float32) * np.float32(e1.output_quant.scale)
    np.testing.assert_array_equal(quantize_activation(deq, plan.layers["res_a"].input_quant), ints["fire_e1"])
    assert ints["fc"].dtype == np.int32  # the classifier dequantizes its accumulator


def test_data_aware_beats_exact_on_output(model):
    calib, x = tiny_images(64), tiny_images(16, seed=11)
    want = NumpyGraph(model).run(x)
    errs = {}
    for method in ("exact", "data-aware"):
        plan = make_plan(model, calib, config=QuantConfig(method=method, group_size=4), progress=False)
        errs[method] = float(np.mean((simulate(plan, x) - want) ** 2))
    assert errs["data-aware"] < errs["exact"]


def test_config_validation():
    with pytest.raises(ValueError, match="weight bits"):
        QuantConfig(weight_bits=3)
    with pytest.raises(ValueError, match="method"):
        QuantConfig(method="gptq")
    with pytest.raises(ValueError, match="group size"):
        QuantConfig(group_size=0)


def test_add_of_two_convs_is_fused_into_one_of_them():
    """ResNet's downsample block: conv_main and conv_down both feed one Add -> Relu."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 4, 1, 1)).astype(np.float32), n) for n in ("wa", "wb")]
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_main"),
             helper.make_node("Conv", ["x", "wb"], ["b"], name="conv_down"),
             helper.make_node("Add", ["a", "b"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 5, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    layers = {l.name: l for l in analyse(model).layers}
    assert layers["conv_main"].residual == "b" and layers["conv_main"].root == "relu"
    assert layers["conv_down"].residual is None and layers["conv_down"].output == "b"
    plan = make_plan(model, rng.normal(size=(4, 4, 5, 5)).astype(np.float32),
                     config=QuantConfig(weight_bits=8, method="exact", last_layer_bits=8), progress=False)
    x = rng.normal(size=(2, 4, 5, 5)).astype(np.float32)
    want = NumpyGraph(model).run(x)
    assert np.corrcoef(simulate(plan, x).ravel(), want.ravel())[0, 1] > 0.99
