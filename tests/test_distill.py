"""The plan's graph in torch (plan.torch_graph) and the end-to-end distillation (plan.distill)."""

import numpy as np
import pytest
import torch
from tiny_models import tiny_cnn, tiny_images

from tvm_ternary.numpy_graph import NumpyGraph
from tvm_ternary.passes.onnx_normalize import normalize_onnx
from tvm_ternary.plan import QuantConfig, make_plan, simulate
from tvm_ternary.plan.distill import _Layer, distill_plan
from tvm_ternary.plan.torch_graph import TorchGraph
from tvm_ternary.quant.intscales import code_max


@pytest.fixture(scope="module")
def planned():
    model = normalize_onnx(tiny_cnn(3)).model
    calib = tiny_images(48, seed=5)
    plan = make_plan(model, calib, config=QuantConfig(group_size=4, method="data-aware"), progress=False)
    return plan, calib


def test_float_graph_matches_numpy_graph(planned):
    """Same ops, same order: float32 results agree to float32 rounding (1e-4 relative: BLAS and
    oneDNN sum in different orders)."""
    plan, calib = planned
    want = NumpyGraph(plan.model).run(calib[:8])
    got = TorchGraph(plan.model, plan.analysis).run(torch.from_numpy(calib[:8])).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_fake_quantized_graph_matches_simulate(planned):
    """The torch view of the plan is the integer pipeline up to the fixed-point requantizer:
    a tie of rint(x / s) against the integer rhe can move one value by one step; logits agree
    within a few output steps and top-1 is the same."""
    plan, calib = planned
    graph = TorchGraph(plan.model, plan.analysis)
    layers = {n: _Layer(lp, tune_codes=True).forward for n, lp in plan.layers.items()}
    with torch.no_grad():
        got = graph.run(torch.from_numpy(calib), layers).numpy()
    want = simulate(plan, calib)
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.95
    np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())


@pytest.mark.parametrize("tune_codes", [False, True])
def test_distillation_lowers_the_kl_and_keeps_the_kernel_grid(planned, tune_codes):
    plan, calib = planned
    new, info = distill_plan(plan, calib, epochs=6, batch=8, progress=False, tune_codes=tune_codes,
                             augment=False)
    assert info["distilled"] and info["kl_last_epoch"] < info["kl_first_epoch"]

    def kl(p):
        ref = NumpyGraph(plan.model).run(calib)
        ls = lambda z: z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
        f, q = ls(ref), ls(simulate(p, calib))
        return float((np.exp(f) * (f - q)).sum(1).mean())

    assert kl(new) < kl(plan)  # measured by the bit-exact reference, not the torch view
    for name, lp in new.layers.items():
        old = plan.layers[name]
        assert np.array_equal(lp.weights.values, old.weights.values)  # the codes v are kept
        qmax = code_max(bits=lp.weights.bits, code_bits=lp.weights.code_bits)
        assert lp.weights.group_codes.max() <= qmax and lp.weights.group_codes.dtype == np.uint8
        assert np.abs(lp.weights.decode_int8().astype(int)).max() <= 127
        if not tune_codes:
            assert np.array_equal(lp.weights.group_codes, old.weights.group_codes)
    assert new.calibration["distill"]["epochs"] == 6


def test_compiled_distilled_plan_is_bit_exact_against_simulate():
    """--distill-epochs goes through make_plan: the library runs the distilled integer plan."""
    from tvm_ternary.compiler import compile_model

    model = tiny_cnn(0, conv_head=True)
    config = QuantConfig(group_size=4, method="data-aware", distill_epochs=2)
    cm = compile_model(model, config=config, calib_images=tiny_images(24), progress=False)
    assert cm.plan.calibration["distill"]["epochs"] == 2
    x = tiny_images(3, seed=9)
    np.testing.assert_array_equal(cm.run(x), simulate(cm.plan, x))


def test_distill_option_is_checked_before_any_work():
    with pytest.raises(ValueError, match="distillation epochs"):
        QuantConfig(distill_epochs=-1)
