"""The ops at the edges of, and between, the quantized layers (TE + small schedules).

* ``quantize``: float32 NCHW (or [N, C]) -> int8/uint8 NHWC: ``clip(rint(f64(x) / f64(s)))``,
  exactly as ``quant.quantize_activation`` rounds (float64 division, half to even), and the
  layout change into the quantized region in the same pass over the data;
* ``dequantize``: int NHWC -> float32 NCHW ``f32(q) * f32(s)`` (one rounding, as numpy);
* ``max_pool``: integer NHWC max pooling (pads with the dtype's minimum; ceil mode as padding);
* ``concat``: integer NHWC tensors joined along channels (Relax's default lowering of concat
  is a scalar loop: 21% of SqueezeNet's time, 1.6 GB/s);
* ``global_mean``: the float32 global average pool of a kernel's NHWC output, written NCHW
  ``[N, C, 1, 1]`` (a classifier's head: without it, the output was transposed to NCHW and then
  averaged, 0.14 ms of SqueezeNet's 3 ms), or of its integer output, dequantized in the same
  pass (ResNet-50's and MobileNetV2's heads).

Each is parallelised over the outer loops and vectorised over channels: untouched, TVM lowers
them to scalar loops that would cost more than the conv kernels around them.

Example::

    func = quantize_func(shape=(1, 3, 224, 224), scale=0.02, bits=8, signed=True)
"""

from __future__ import annotations

from tvm import te

from .. import tvm_adapter as ta

VECTOR_BYTES = 64  # one zmm register


def _container(bits: int, signed: bool) -> str:
    del bits  # int4 values live in 8-bit containers
    return "int8" if signed else "uint8"


def _limits(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def quantize_func(*, shape: tuple[int, ...], scale: float, bits: int, signed: bool,
                  zero_point: int = 0, fma: bool = False):
    """float32 ``shape`` (NCHW or [N, C]) -> quantized NHWC (or [N, C]).

    ``fma``: the target has FMA; the division by the scale is then a reciprocal multiply with
    one FMA correction (``tvm_adapter.exact_quotient``, the same correctly rounded quotient,
    2x faster than ``vdivpd``). Without FMA hardware LLVM would call libm's ``fma``: divide."""
    x = te.placeholder(tuple(shape), "float32", name="x")
    lo, hi = _limits(bits, signed)
    dtype = _container(bits, signed)

    def q(value):
        wide = value.astype("float64")
        if fma:
            v = ta.nearbyint(ta.exact_quotient(wide, float(scale)))
        else:
            v = ta.nearbyint(wide / ta.const(float(scale), "float64"))
        if zero_point:
            v = v + ta.const(float(zero_point), "float64")
        v = te.min(te.max(v, ta.const(float(lo), "float64")), ta.const(float(hi), "float64"))
        return v.astype(dtype)

    if len(shape) == 4:
        n, c, h, w = shape
        y = te.compute((n, h, w, c), lambda b, i, j, k: q(x[b, k, i, j]), name="y")
    else:
        y = te.compute(tuple(shape), lambda *idx: q(x[idx]), name="y")
    return _schedule_map(ta.create_prim_func([x, y]), int(y.shape[-1]))


def dequantize_func(*, shape: tuple[int, ...], dtype: str, scale: float, zero_point: int = 0):
    """quantized NHWC (or [N, C]) ``shape`` -> float32 NCHW (or [N, C]): ``f32(q - z) * s``."""
    q = te.placeholder(tuple(shape), dtype, name="q")
    s = ta.const(float(scale), "float32")

    def dq(value):
        if zero_point:  # the difference in int32 is exact; one float rounding, as numpy
            return (value.astype("int32") - ta.const(zero_point, "int32")).astype("float32") * s
        return value.astype("float32") * s

    if len(shape) == 4:
        n, h, w, c = shape
        y = te.compute((n, c, h, w), lambda b, k, i, j: dq(q[b, i, j, k]), name="y")
    else:
        y = te.compute(tuple(shape), lambda *idx: dq(q[idx]), name="y")
    return _schedule_map(ta.create_prim_func([q, y]), int(y.shape[-1]))


def max_pool_func(*, shape: tuple[int, ...], dtype: str, kernel, stride, padding):
    """Integer NHWC max pooling; ``padding`` (top, left, bottom, right) already includes any
    ceil-mode extra."""
    n, h, w, c = shape
    (kh, kw), (sh, sw) = kernel, stride
    top, left, bottom, right = padding
    oh = (h + top + bottom - kh) // sh + 1
    ow = (w + left + right - kw) // sw + 1
    x = te.placeholder(tuple(shape), dtype, name="x")
    lowest = ta.const(-128 if dtype == "int8" else 0, dtype)
    padded = te.compute(
        (n, h + top + bottom, w + left + right, c),
        lambda b, i, j, k: ta.if_then_else(
            te.all(i >= top, i < h + top, j >= left, j < w + left), x[b, i - top, j - left, k], lowest),
        name="pad")
    ri = te.reduce_axis((0, kh), name="ri")
    rj = te.reduce_axis((0, kw), name="rj")
    y = te.compute((n, oh, ow, c),
                   lambda b, i, j, k: te.max(padded[b, i * sh + ri, j * sw + rj, k], axis=[ri, rj]),
                   name="y")
    func = ta.create_prim_func([x, y])
    sch = ta.schedule_of(func)
    sch.compute_inline(sch.get_sblock("pad"))
    block = sch.get_sblock("y")
    b, i, j, k, ri_, rj_ = sch.get_loops(block)
    sch.reorder(b, i, j, ri_, rj_, k)
    sch.parallel(sch.fuse(b, i))
    _vectorize(sch, k, c, dtype)
    sch.decompose_reduction(block, ri_)
    return ta.scheduled_func(sch)


def concat_func(*, shapes: list, dtype: str):
    """NHWC tensors of ``shapes`` (equal N, H, W) concatenated along channels.

    Channels are copied in blocks of ``L`` (the largest power of two up to one vector that
    divides every input's channel count): each block comes from one input, so which input it
    reads is a branch on the block index, uniform over the vector, and the copy vectorises.
    """
    n, h, w = shapes[0][:3]
    counts = [int(sh[3]) for sh in shapes]
    lanes = VECTOR_BYTES // (1 if "8" in dtype else 4)
    block = lanes
    while any(c % block for c in counts):
        block //= 2
    xs = [te.placeholder(tuple(sh), dtype, name=f"x{i}") for i, sh in enumerate(shapes)]
    offsets = [sum(counts[:i]) for i in range(len(counts))]

    def fn(b, i, j, k):
        value = xs[-1][b, i, j, k - offsets[-1]]
        for x, off in zip(reversed(xs[:-1]), reversed(offsets[1:])):
            # k // block < off // block is k < off, written so that it is visibly uniform
            # over a vector of `block` channels once k is split by `block`
            value = ta.if_then_else(k // block < off // block, x[b, i, j, k - (off - x.shape[3])],
                                    value)
        return value

    y = te.compute((n, h, w, sum(counts)), fn, name="y")
    sch = ta.schedule_of(ta.create_prim_func([*xs, y]))
    loops = sch.get_loops(sch.get_sblock("y"))
    sch.parallel(sch.fuse(loops[0], loops[1]))
    _, inner = sch.split(loops[3], factors=[None, block])
    sch.vectorize(inner)
    return ta.scheduled_func(sch)


def global_mean_func(*, shape: tuple[int, ...], quant: tuple[str, float, int] | None = None):
    """NHWC ``shape`` -> float32 ``[N, C, 1, 1]``: the mean over H and W, as TVM's own ``mean``
    computes it (a float32 sum, then divided by H*W), summed in pixel order with the channels
    as vector lanes (contiguous loads) instead of per channel across strided pixels.

    ``quant`` = ``(dtype, scale, zero_point)``: the input holds integers and each is dequantized
    as :func:`dequantize_func` does (``f32(q - z) * s``) before it is added, so the result is the
    very float ``mean(dequantize(q))`` computes, without writing the float NCHW tensor between
    them (ResNet-50's last 7x7x2048: 0.21 -> 0.02 ms on a Zen 4)."""
    n, h, w, c = (int(v) for v in shape)
    x = te.placeholder((n, h, w, c), "float32" if quant is None else quant[0], name="x")

    def value(b, i, j, k):
        if quant is None:
            return x[b, i, j, k]
        _, scale, zero_point = quant
        v = x[b, i, j, k]
        if zero_point:  # the difference in int32 is exact; one float rounding, as dequantize_func
            v = v.astype("int32") - ta.const(int(zero_point), "int32")
        return v.astype("float32") * ta.const(float(scale), "float32")

    rh = te.reduce_axis((0, h), name="rh")
    rw = te.reduce_axis((0, w), name="rw")
    total = te.compute((n, c), lambda b, k: te.sum(value(b, rh, rw, k), axis=[rh, rw]), name="sum")
    count = ta.const(float(h * w), "float32")
    y = te.compute((n, c, 1, 1), lambda b, k, i, j: total[b, k] / count, name="y")
    sch = ta.schedule_of(ta.create_prim_func([x, y]))
    block = sch.get_sblock("sum")
    b, k, rh_, rw_ = sch.get_loops(block)
    lanes = VECTOR_BYTES // 4
    if c % lanes == 0:
        ko, ki = sch.split(k, factors=[None, lanes])
        sch.reorder(b, ko, rh_, rw_, ki)
        sch.parallel(sch.fuse(b, ko))
        sch.vectorize(ki)
        sch.decompose_reduction(block, rh_)
    else:  # all channels in one row of accumulators (C floats, in L1), pixels outermost
        sch.reorder(b, rh_, rw_, k)
        _vectorize(sch, k, c, "float32")
        sch.decompose_reduction(block, rh_)
    loops = sch.get_loops(sch.get_sblock("y"))
    _vectorize(sch, loops[1], c, "float32")
    return ta.scheduled_func(sch)


def _vectorize(sch, loop, extent: int, dtype: str) -> None:
    lanes = VECTOR_BYTES // (1 if "8" in dtype else 4)
    if extent > lanes and extent % lanes == 0:
        _, inner = sch.split(loop, factors=[None, lanes])
        sch.vectorize(inner)
    elif extent <= lanes:
        sch.vectorize(loop)


def _schedule_map(func, extent: int):
    """Parallel over the outer loops, vectorised over the innermost one (of ``extent``)."""
    sch = ta.schedule_of(func)
    block = sch.get_sblock("y")
    loops = sch.get_loops(block)
    if len(loops) > 1:
        sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])
    _vectorize(sch, loops[-1], extent, "float32")
    return ta.scheduled_func(sch)
