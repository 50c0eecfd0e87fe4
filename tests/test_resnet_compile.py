"""ResNet-18 / ResNet-50 (torch 2.13 export, random weights) compile, run, and agree with the
numpy reference pipeline (plan.simulate).

The ONNX graphs are generated into a tmp dir by scripts/export_resnet.py (no binaries in the
repo); torch is a dev-only dependency, so the module is skipped without it. Tolerance: every
integer layer is bit-exact (test_compile_flow), but GAP runs in float between the last integer
tensor and the fc, and a different summation order may move one fc input by one quantization
step; so logits may differ by at most one fc input step times the largest row sum of |W_fc|
(the same bound as test_compile_flow's classifier test), and top-1 must agree.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tvm_ternary.compiler import compile_model  # noqa: E402
from tvm_ternary.plan import QuantConfig, simulate  # noqa: E402
from tvm_ternary.runtime import load  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "export_resnet.py"


def _export_module():
    spec = importlib.util.spec_from_file_location("export_resnet", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _images(n, seed):
    return np.random.default_rng(seed).normal(size=(n, 3, 224, 224)).astype(np.float32)


def _check(arch, tmp_path, *, calib, samples):
    onnx_path = _export_module().export(arch, tmp_path / f"{arch}.onnx", seed=0)
    # "exact" (FGQ least squares) instead of the default data-aware fit: the flow under test is
    # the same, and it plans ResNet-18 in seconds instead of minutes on 2 cores.
    cm = compile_model(onnx_path, config=QuantConfig(method="exact"), calib_images=_images(calib, 1),
                       progress=False)
    assert cm.rewrite.left_float == {}
    assert len(cm.rewrite.fused) == len(cm.plan.layers)
    x = _images(samples, 2)
    got, want = cm.run(x), simulate(cm.plan, x)
    fc = cm.plan.layers["/fc/Gemm"]
    step = fc.input_quant.scale * np.abs(fc.weights.dequantize()).sum(axis=1).max()
    diff = float(np.abs(got - want).max())
    print(f"{arch}: max |lib - simulate| = {diff:.3g} (bound {step:.3g}), logit range {np.ptp(want):.3g}")
    assert diff <= step
    assert (got.argmax(1) == want.argmax(1)).all()
    lib = tmp_path / f"{arch}.so"
    meta = cm.export(lib)
    assert json.loads((tmp_path / f"{arch}.so.json").read_text())["coverage"] == meta["coverage"]
    np.testing.assert_array_equal(load(lib).run(x[:1]), got[:1])  # the .so is the same program


def test_export_has_no_batchnorm_left_and_static_batch(tmp_path):
    import onnx

    model = onnx.load(str(_export_module().export("resnet18", tmp_path / "r18.onnx")))
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 224, 224]


def test_resnet18_compiles_runs_and_matches_reference(tmp_path):
    _check("resnet18", tmp_path, calib=8, samples=2)


@pytest.mark.slow
def test_resnet50_compiles_runs_and_matches_reference(tmp_path):
    _check("resnet50", tmp_path, calib=8, samples=2)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-s", "-m", "slow or not slow"]))
