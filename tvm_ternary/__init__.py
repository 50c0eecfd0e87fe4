"""tvm_ternary: ternary-weight, integer-activation CNN compiler for x86 CPUs on Apache TVM.

The public API (documented in :mod:`tvm_ternary.api`)::

    import tvm_ternary as tt
    m = tt.compile("model.onnx", calib="calib.npy", config=tt.QuantConfig(group_size=4))
    m.export("model.so")                    # model.so + model.so.json (the sidecar)
    y = tt.load("model.so").run(x)          # runtime only

The names are imported on first use, so ``import tvm_ternary`` loads neither TVM nor onnx.
The quantization core (:mod:`tvm_ternary.quant`) is numpy-only; everything that touches TVM
goes through :mod:`tvm_ternary.tvm_adapter`, so a TVM upgrade edits one module.
"""

__version__ = "0.1.0"

# public name -> (module, attribute), imported by __getattr__ on first use
_LAZY = {
    "compile": ("tvm_ternary.api", "compile"),
    "load": ("tvm_ternary.api", "load"),
    "QuantConfig": ("tvm_ternary.plan.config", "QuantConfig"),
    "PreprocessConfig": ("tvm_ternary.preprocess", "PreprocessConfig"),
    "UserError": ("tvm_ternary.errors", "UserError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'tvm_ternary' has no attribute {name!r}")
    import importlib

    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
