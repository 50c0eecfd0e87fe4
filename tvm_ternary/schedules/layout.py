"""Layout transforms the quantized kernels need: host-side (numpy, at compile time, for
constant weights) and in-graph (TE kernels for activations at the edges of an NHWC region).

Example::

    import numpy as np
    from tvm_ternary.schedules import layout
    v = np.ones((20, 6, 3, 3), np.int8)
    layout.block_weights(v).shape            # (2, 3, 3, 2, 16) int32
    f = layout.transpose_kernel((1, 3, 8, 8), "float32", to="nhwc")   # a PrimFunc
"""

from __future__ import annotations

import numpy as np
from tvm import te

from .. import tvm_adapter as ta

OUT_BLOCK, IN_BLOCK = 16, 4  # the packed ternary block; 4/8-bit values use the same blocks


def block_weights(values: np.ndarray) -> np.ndarray:
    """int8 values ``[K, Cg, R, S]`` (or ``[K, C]``) -> zero-padded 16x4 blocks, the 4 input
    channels of a block row viewed as one little-endian int32 word: int32
    ``[ceil(K/16), R, S, ceil(Cg/4), 16]``, the 4/8-bit weight argument of the kernels (one
    word is what one vpdpbusd lane consumes, so the decode needs no byte gathers; the words in
    the order the kernels' reduction reads them, ``ConvSpec.weight_index``)."""
    v = np.asarray(values)
    if v.ndim == 2:
        v = v[:, :, None, None]
    if v.ndim != 4:
        raise ValueError(f"weights must be [K, C] or [K, C, R, S], got shape {v.shape}")
    if v.min(initial=0) < -127 or v.max(initial=0) > 127:
        raise ValueError("weight values must lie in [-127, 127]")
    k, c, r, s = v.shape
    kb, cb = -(-k // OUT_BLOCK), -(-c // IN_BLOCK)
    full = np.zeros((kb * OUT_BLOCK, cb * IN_BLOCK, r, s), np.int8)
    full[:k, :c] = v
    # [kb, ki, cb, j, r, s] -> [kb, r, s, cb, ki, j]
    blocks = np.ascontiguousarray(
        full.reshape(kb, OUT_BLOCK, cb, IN_BLOCK, r, s).transpose(0, 4, 5, 2, 1, 3))
    return blocks.view("<i4").reshape(kb, r, s, cb, OUT_BLOCK)


def unblock_weights(blocked: np.ndarray, *, shape) -> np.ndarray:
    """Inverse of :func:`block_weights` for a weight of ``shape`` ([K, C, R, S] or [K, C])."""
    b = np.ascontiguousarray(blocked).view(np.int8).reshape(*np.shape(blocked), IN_BLOCK)
    kb, r, s, cb = b.shape[:4]
    # [kb, r, s, cb, ki, j] -> [kb, ki, cb, j, r, s]
    full = b.transpose(0, 4, 3, 5, 1, 2).reshape(kb * OUT_BLOCK, cb * IN_BLOCK, r, s)
    k, c = shape[:2]
    return full[:k, :c].reshape(shape)


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


def transpose_kernel(shape, dtype: str, *, to: str):
    """A scheduled PrimFunc ``x -> y`` converting an activation between NCHW and NHWC.

    ``shape`` is the input's shape; ``to`` is ``"nhwc"`` (input NCHW) or ``"nchw"`` (input NHWC).
    """
    if to not in ("nhwc", "nchw"):
        raise ValueError(f"to must be 'nhwc' or 'nchw', got {to!r}")
    n, a, b, c = (int(v) for v in shape)
    x = te.placeholder((n, a, b, c), dtype, name="x")
    if to == "nhwc":  # x is [N, C, H, W]
        y = te.compute((n, b, c, a), lambda i, h, w, ch: x[i, ch, h, w], name="transpose")
    else:  # x is [N, H, W, C]
        y = te.compute((n, c, a, b), lambda i, ch, h, w: x[i, h, w, ch], name="transpose")
    sch = ta.schedule_of(ta.create_prim_func([x, y]))
    blk = sch.get_sblock("transpose")
    loops = sch.get_loops(blk)
    sch.parallel(sch.fuse(loops[0], loops[1]))
    return ta.scheduled_func(sch)
