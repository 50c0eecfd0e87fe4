"""tvm_ternary: ternary-weight, integer-activation CNN compiler for x86 CPUs on Apache TVM.

The quantization core (:mod:`tvm_ternary.quant`) is numpy-only; everything that touches TVM
goes through :mod:`tvm_ternary.tvm_adapter`, so a TVM upgrade edits one module.
"""

__version__ = "0.1.0"
