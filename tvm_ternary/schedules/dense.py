"""Quantized dense kernels ``y[N, K] = epilogue(x[N, C] . w[K, C]^T)``.

A dense layer is scheduled as a 1x1 conv over a 1 x N image (the batch rows are the pixels that
share the decoded weights); weights use the conv formats with R = S = 1.

Example::

    from tvm_ternary.schedules import DenseSpec, dense_kernel, kernel_arg_names
    spec = DenseSpec(batch=1, in_features=2048, out_features=1000, out="f32")
    func = dense_kernel(spec, target=None)          # host target
    kernel_arg_names(spec.as_conv(), "vnni512")     # ['x', 'weights', 'codes', 'scale', 'y']
"""

from __future__ import annotations

from .conv2d import conv2d_kernel
from .spec import DenseSpec
from .tiling import Tiling


def dense_kernel(spec: DenseSpec, *, target=None, schedule=True, isa: str | None = None,
                 tiling: Tiling | None = None):
    """A scheduled PrimFunc for ``spec`` (see :func:`conv2d_kernel` for the switches)."""
    if not isinstance(spec, DenseSpec):
        raise TypeError(f"spec must be a DenseSpec, got {type(spec).__name__}")
    return conv2d_kernel(spec.as_conv(), target=target, schedule=schedule, isa=isa,
                         tiling=tiling)
