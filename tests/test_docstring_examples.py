"""The docstring examples of the public quantization API run and print what they claim."""

import doctest
import importlib

import pytest

MODULES = [
    "tvm_ternary.quant.formats",
    "tvm_ternary.quant.ternary",
    "tvm_ternary.quant.intscales",
    "tvm_ternary.quant.activations",
    "tvm_ternary.quant.packing",
    "tvm_ternary.quant.reference",
    "tvm_ternary.quant.data_aware",
    "tvm_ternary.quant.reconstruct",
    "tvm_ternary.plan.config",  # QuantConfig (tvm_ternary.QuantConfig)
    "tvm_ternary.plan.sensitivity",  # largest_verified_share
    "tvm_ternary.progress",
    "tvm_ternary.inputs",
    "tvm_ternary.benchmark",
    "tvm_ternary.peak",
    "tvm_ternary.quant.imported",
    "tvm_ternary.passes.onnx_qdq",
    "tvm_ternary.schedules.amx",  # amx_rows / amx_blocks
    "tvm_ternary.cpu_features",
]  # tvm_ternary.api's examples need model files: tests/test_api.py runs them


@pytest.mark.parametrize("name", MODULES)
def test_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0


def test_qdq_import_does_not_import_tvm():
    import subprocess
    import sys

    code = ("import sys, tvm_ternary.passes.onnx_qdq, tvm_ternary.plan.imported, "
            "tvm_ternary.export_onnx; print('tvm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_quant_core_does_not_import_tvm():
    import subprocess
    import sys

    code = "import sys, tvm_ternary.quant; print('tvm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
