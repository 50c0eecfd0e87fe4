"""x86 kernels for ternary / 4-bit / 8-bit weight conv2d and dense (NHWC, int8 dot products).

Modules: ``spec`` (what a kernel computes, argument contract), ``compute`` + ``epilogue`` (TE),
``intrin`` (tensor intrinsics per ISA), ``tiling`` (knobs, untuned defaults), ``conv2d`` /
``dense`` (entry points and schedules), ``layout`` and ``params`` (host-side preparation).

Example::

    from tvm_ternary import tvm_adapter as ta
    from tvm_ternary.schedules import ConvSpec, conv2d_kernel, kernel_arg_names
    spec = ConvSpec(batch=1, in_channels=64, height=56, width=56, out_channels=64, kernel=3,
                    padding=1, act="u8", out="u8", relu=True)
    target = ta.host_target()
    func = conv2d_kernel(spec, target=target)
    names = kernel_arg_names(spec, func.attrs["tvm_ternary.isa"])
"""

from .conv2d import conv2d_kernel
from .dense import dense_kernel
from .spec import ConvSpec, DenseSpec, kernel_arg_names, needs_compensation
from .tiling import Tiling, default_tiling

__all__ = ["ConvSpec", "DenseSpec", "Tiling", "conv2d_kernel", "default_tiling", "dense_kernel",
           "kernel_arg_names", "needs_compensation"]
