"""The plan-applying rewrite as pattern passes: layers found by their weight parameter (not by
program order), the plan's chain checked (a mismatch stays float, with its reason), integers
between layers, normalisation once per compile, and one layer policy for quantize-report.

Bit-exactness: models that end in a conv head read from the integer region, so the library
must equal the numpy reference (``plan.simulate``) exactly.
"""

from dataclasses import replace

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from tiny_models import tiny_cnn, tiny_images

from tvm_ternary import tvm_adapter as ta
from tvm_ternary.compiler import compile_model
from tvm_ternary.passes.import_onnx import import_onnx
from tvm_ternary.passes.quantize_graph import apply_plan
from tvm_ternary.plan import QuantConfig, simulate

rng = np.random.default_rng(3)


def _model(nodes, inits, out_channels, size=8):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, [1, out_channels, size, size])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _w(name, *shape):
    return numpy_helper.from_array((rng.normal(size=shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)


def _conv(name, x, w, *, k=3, stride=1, relu=True, bias=None):
    inputs = [x, w] + ([bias] if bias else [])
    nodes = [helper.make_node("Conv", inputs, [name], name=name, kernel_shape=[k, k], pads=[k // 2] * 4,
                              strides=[stride] * 2)]
    if relu:
        nodes.append(helper.make_node("Relu", [name], [name + "_r"], name=name + "_r"))
    return nodes, nodes[-1].output[0]


def shared_weight_model():
    """Two convs reading one initializer, and a head whose weight is a Constant node."""
    n1, x = _conv("conv1", "input", "w1", stride=2)
    na, x = _conv("conv_a", x, "shared")
    nb, x = _conv("conv_b", x, "shared")
    head_w = numpy_helper.to_array(_w("h", 4, 8, 1, 1))
    const = helper.make_node("Constant", [], ["head_w"], value=numpy_helper.from_array(head_w, "head_w"))
    nh, _ = _conv("head", x, "head_w", k=1, relu=False)
    return _model(n1 + na + nb + [const] + nh, [_w("w1", 8, 3, 3, 3), _w("shared", 8, 8, 3, 3)], 4)


def projection_residual_model(*, owner_first: bool):
    """``relu(conv_main(x) + conv_proj(x))``: the Add reads two convs; the plan fuses it into
    ``conv_main`` (the first in graph order), whichever side of the Add it is on."""
    n1, x = _conv("conv1", "input", "w1", stride=2)
    nm, m = _conv("conv_main", x, "wm", relu=False, bias="bm")
    nproj, p = _conv("conv_proj", x, "wp", k=1, relu=False, bias="bp")
    add = helper.make_node("Add", [m, p] if owner_first else [p, m], ["sum"], name="sum")
    relu = helper.make_node("Relu", ["sum"], ["sum_r"], name="sum_r")
    nh, _ = _conv("head", "sum_r", "wh", k=1, relu=False)
    inits = [_w("w1", 8, 3, 3, 3), _w("wm", 8, 8, 3, 3), _w("wp", 8, 8, 1, 1), _w("wh", 4, 8, 1, 1),
             numpy_helper.from_array(rng.normal(size=8).astype(np.float32) * 0.1, "bm"),
             numpy_helper.from_array(rng.normal(size=8).astype(np.float32) * 0.1, "bp")]
    return _model(n1 + nm + nproj + [add, relu] + nh, inits, 4)


def compiled(model, config=QuantConfig(method="exact"), **kwargs):
    return compile_model(model, config=config, calib_images=tiny_images(16), progress=False, **kwargs)


def test_each_layer_reads_its_own_weight_parameter():
    imported = import_onnx(shared_weight_model())
    layers = {layer.name: layer.weight_param for layer in imported.layers}
    assert list(layers) == ["conv1", "conv_a", "conv_b", "head"]
    # the shared initializer became one parameter per layer, named after it
    assert layers == {"conv1": "w1", "conv_a": "conv_a.weight", "conv_b": "conv_b.weight", "head": "head_w"}
    assert ta.param_names(imported.module) == ["input", *imported.weights]
    assert set(imported.weights) == set(layers.values())
    cm = compiled(shared_weight_model())
    assert cm.rewrite.left_float == {} and sorted(cm.rewrite.fused) == sorted(layers)
    x = tiny_images(3, seed=5)
    np.testing.assert_array_equal(cm.run(x), simulate(cm.plan, x))


def test_a_layer_output_read_twice_is_a_kernel_output():
    """A squeeze conv without ReLU read by two convs: its chain ends at the bias add, which has
    two readers (only links inside a chain must have one)."""
    n1, x = _conv("conv1", "input", "w1", stride=2)
    ns, s = _conv("squeeze", x, "ws", k=1, relu=False, bias="bs")
    na, a = _conv("e1", s, "wa", k=1)
    nb, b = _conv("e3", s, "wb")
    cat = helper.make_node("Concat", [a, b], ["cat"], name="cat", axis=1)
    nh, _ = _conv("head", "cat", "wh", k=1, relu=False)
    inits = [_w("w1", 8, 3, 3, 3), _w("ws", 8, 8, 1, 1), _w("wa", 8, 8, 1, 1), _w("wb", 8, 8, 3, 3),
             _w("wh", 4, 16, 1, 1), numpy_helper.from_array(np.full(8, 0.05, np.float32), "bs")]
    cm = compiled(_model(n1 + ns + na + nb + [cat] + nh, inits, 4))
    assert cm.rewrite.left_float == {} and len(cm.rewrite.fused) == 5
    assert cm.rewrite.integer_ops == ["concat"]
    x = tiny_images(3, seed=5)
    np.testing.assert_array_equal(cm.run(x), simulate(cm.plan, x))


@pytest.mark.parametrize("owner_first", [True, False], ids=["main+proj", "proj+main"])
def test_residual_add_of_two_convs_goes_to_the_plans_layer(owner_first):
    cm = compiled(projection_residual_model(owner_first=owner_first))
    fused = {layer.name: layer for layer in cm.plan.analysis.layers}
    assert fused["conv_main"].residual is not None and fused["conv_proj"].residual is None
    assert cm.rewrite.left_float == {}
    assert sorted(cm.rewrite.fused) == ["conv1", "conv_main", "conv_proj", "head"]
    x = tiny_images(3, seed=6)
    np.testing.assert_array_equal(cm.run(x), simulate(cm.plan, x))


def test_chain_the_plan_did_not_fuse_stays_float_with_the_reason():
    cm = compiled(tiny_cnn(conv_head=True))
    head = cm.plan.layers["head"]
    layers = dict(cm.plan.layers, head=replace(head, fused=replace(head.fused, relu=True)))
    cm2 = compiled(tiny_cnn(conv_head=True), plan=replace(cm.plan, layers=layers))
    assert "head" not in cm2.rewrite.fused
    assert cm2.rewrite.left_float == {
        "head": "the Relax graph has conv -> bias, the plan fused conv -> bias -> relu"}
    status = {row["layer"]: row["status"] for row in cm2.coverage}
    assert status["head"].startswith("float: the Relax graph has") and status["dw"] == "kernel"
    # The float head reads the same (dequantized) integers as the 8-bit head: per output they
    # differ only by the weight rounding (<= s_k/2 each, times at most C*R*S inputs of at most
    # s_x*(qmax-qmin) each) and the integer bias rounding (<= s_x*s_k/2).
    x = tiny_images(2, seed=4)
    s_x, s_k = head.input_quant.scale, head.weights.channel_scales.astype(np.float64)
    reach = s_x * (head.input_quant.qmax - head.input_quant.qmin) * np.prod(head.weights.values.shape[1:])
    bound = (0.5 * s_k * reach + 0.5 * s_x * s_k)[None, :, None, None]
    assert (np.abs(cm2.run(x) - cm.run(x)) <= bound).all()


def _region_calls(mod) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, value in ta.main_bindings(mod):
        if ta.call_op_name(value) == "relax.call_tir":
            kind = value.args[0].name_hint.rstrip("0123456789")
            counts[kind] = counts.get(kind, 0) + 1
    return counts


@pytest.mark.parametrize("conv_head", [True, False], ids=["conv-head", "gap-fc"])
def test_integers_between_layers_quantize_only_at_the_edges(conv_head):
    cm = compiled(tiny_cnn(conv_head=conv_head))
    mod, report = apply_plan(import_onnx(None, prepared=_prepared(cm)), plan=cm.plan, target=cm.target)
    counts = _region_calls(mod)
    assert counts["tt_max_pool"] == 1 and counts["tt_concat"] == 1
    assert counts["tt_conv"] == (8 if conv_head else 7)  # one call per conv layer
    assert report.integer_ops == ["max_pool2d", "concat"]
    if conv_head:  # the model input in; the head dequantizes in its epilogue
        assert counts["tt_quantize"] == 1 and "tt_dequantize" not in counts
    else:  # the input, and the dense input after the global average pool, which reads the
        # depthwise layer's integers and dequantizes them as it sums (nhwc_ops.NHWCGlobalMean)
        assert counts["tt_quantize"] == 2 and "tt_dequantize" not in counts
        assert counts["tt_global_mean"] == 1 and counts["tt_dense"] == 1
    assert len(mod["main"].params) == 1  # every weight is a constant again


def test_global_pool_of_the_head_reads_its_nhwc_output():
    """SqueezeNet's head: conv -> relu -> GlobalAveragePool. The pool reads the kernel's NHWC
    float output (tt_global_mean), no transpose to NCHW is left; the result equals the
    reference up to the float32 summation order (numpy sums pairwise)."""
    cm = compiled(tiny_cnn(conv_head=True, head_pool=True))
    mod, _ = apply_plan(import_onnx(None, prepared=_prepared(cm)), plan=cm.plan, target=cm.target)
    counts = _region_calls(mod)
    assert counts["tt_global_mean"] == 1
    ops = [ta.call_op_name(value) for _, value in ta.main_bindings(mod)]
    assert "relax.permute_dims" not in ops and "relax.mean" not in ops
    x = tiny_images(3, seed=5)
    got, want = cm.run(x), simulate(cm.plan, x)
    assert got.shape == want.shape == (3, 10, 1, 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def _prepared(cm):
    from tvm_ternary.passes.onnx_normalize import normalize_onnx

    return replace(normalize_onnx(cm.plan.model), model=cm.plan.model)


def test_the_api_normalises_the_model_once(monkeypatch):
    import tvm_ternary
    from tvm_ternary.passes import onnx_normalize

    calls = []
    real = onnx_normalize.normalize_onnx

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    # every normalisation goes through the module's function (compiler and import_onnx via
    # onnx_normalize.prepare), so patching it there counts them all
    monkeypatch.setattr(onnx_normalize, "normalize_onnx", counted)
    tvm_ternary.compile(tiny_cnn(conv_head=True), calib=tiny_images(8), config=QuantConfig(method="exact"),
                        progress=False)
    assert len(calls) == 1


def test_quantize_report_keeps_the_layers_compile_keeps():
    from tvm_ternary.commands.quantize_report import ReportConfig, build_report
    from tvm_ternary.onnx_io import find_weighted_layers

    model = tiny_cnn()
    cm = compiled(model, QuantConfig(method="exact"))
    report = build_report(find_weighted_layers(cm.plan.model), config=ReportConfig())
    kept = {layer.name: layer.kept_reason for layer in report.layers if layer.kept_reason}
    assert kept == {name: d.reason for name, d in cm.plan.decisions.items() if d.reason != "configured"}
    assert kept == {"conv1": "first layer", "dw": "depthwise", "fc": "last layer"}


def gemm_alpha_model(alpha: float):
    n1, x = _conv("conv1", "input", "w1", stride=2)
    nodes = n1 + [helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
                  helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
                  helper.make_node("Gemm", ["flat", "fw", "fb"], ["logits"], name="fc", transB=1, alpha=alpha)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])],
        [_w("w1", 8, 3, 3, 3), _w("fw", 5, 8), numpy_helper.from_array(np.full(5, 0.1, np.float32), "fb")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_gemm_alpha_is_applied_once(alpha):
    """The plan folds Gemm's alpha into the weight; the frontend scales the input by it: the
    kernel must read the unscaled input. The GAP before the classifier runs in float (another
    summation order): one input step of the dense layer times its largest row sum bounds it."""
    cm = compiled(gemm_alpha_model(alpha))
    assert sorted(cm.rewrite.fused) == ["conv1", "fc"]
    x = tiny_images(4, seed=9)
    got, want = cm.run(x), simulate(cm.plan, x)
    fc = cm.plan.layers["fc"]
    assert np.abs(got - want).max() <= fc.input_quant.scale * np.abs(fc.weights.dequantize()).sum(axis=1).max()


def test_duplicate_node_names_plan_and_compile():
    """ONNX does not require unique node names: two convs both named "conv" get distinct layer
    names (NAME:OUTPUT) and compile bit-exact against the reference."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from tvm_ternary.compiler import compile_model
    from tvm_ternary.plan import QuantConfig, simulate

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
             for n, s in (("w1", (8, 3, 3, 3)), ("w2", (8, 8, 1, 1)), ("w3", (4, 8, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["ar"], name="relu"),
             helper.make_node("Conv", ["ar", "w2"], ["b"], name="conv"),
             helper.make_node("Relu", ["b"], ["br"], name="relu"),
             helper.make_node("Conv", ["br", "w3"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "dup", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    calib = rng.normal(size=(8, 3, 8, 8)).astype(np.float32)
    cm = compile_model(model, config=QuantConfig(method="exact"), calib_images=calib, progress=False)
    assert [r["layer"] for r in cm.plan.coverage()] == ["conv", "conv:b", "head"]
    x = calib[:2]
    np.testing.assert_array_equal(cm.run(x), simulate(cm.plan, x))
