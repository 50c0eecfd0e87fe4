"""Whole-model QDQ import (slow: minutes on 2 cores): SqueezeNet 1.1 and MobileNetV2 quantized
by onnxruntime.quantization.quantize_static (QDQ, u8 activations, s8 per-channel weights,
calibrated on every 10th calib1000 image), compiled without calibration, against ORT on val200.

Run with ``pytest -m slow tests/test_qdq_models.py``; the figures are scripts/qdq_agreement.py's.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("qdq_agreement", REPO / "scripts" / "qdq_agreement.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("key", ["squeezenet", "mobilenetv2"])
def test_ort_quantized_model_agrees_with_ort(key, tmp_path):
    res = _script().measure(key, workdir=tmp_path, calib_count=100, val_limit=None, emit_onnx=True)
    assert not res["left_float"] and res["library_vs_numpy_reference_max_abs_diff_first8"] < 1e-4
    # Top-1 on a quantized output: two classes on the same step are ties that ORT breaks by
    # index; tie-aware agreement counts our top-1 when ORT has it on its top step too.
    assert res["top1_agreement_with_ort_tie_aware"] >= 0.99
    # ORT against itself (fused integer kernels vs the graph as written) is the noise floor
    # of strict agreement after ~50 requantizations; we must not be below it.
    assert res["top1_agreement_with_ort"] >= min(0.99, res["top1_agreement_ort_vs_ort_unoptimized"])
    rt = res["emit_onnx"]
    assert rt["reimport_bit_identical"]
    assert rt["top1_agreement_ort_on_emitted_vs_library"] >= min(
        0.99, rt["top1_agreement_ort_vs_ort_unoptimized_on_emitted"])
