"""2-bit packed ternary weights, laid out for the kernels' inner loop.

Layout (after TVM's VNNI 16-output x 4-input block and BitNet's I2_S code ``t + 1``)::

    packed[ko, co, r, s, ki]   uint8, shape [ceil(K/16), ceil(C/4), R, S, 16]
    bits 2j..2j+1 of that byte = t[16*ko + ki, 4*co + j, r, s] + 1      (j = 0..3)

One byte holds the four input channels that one 32-bit lane of ``vpdpbusd`` multiplies with
four consecutive activation bytes, so 16 bytes are one 16-output x 4-input block (64 int8
weights after decoding). Codes: 0 -> -1, 1 -> 0, 2 -> +1; 3 never occurs. Output channels
past K and input channels past C are padded with code 1 (weight 0). Dense weights [K, C] use
R = S = 1. A 3x3 64->64 conv packs to 9 KiB instead of 36 KiB of int8.

Example::

    >>> import numpy as np
    >>> t = np.random.default_rng(0).integers(-1, 2, size=(20, 6, 3, 3)).astype(np.int8)
    >>> p = pack_ternary(t)
    >>> p.shape, bool((unpack_ternary(p, shape=t.shape) == t).all())
    ((2, 2, 3, 3, 16), True)
"""

from __future__ import annotations

import numpy as np

OUT_BLOCK = 16  # output channels per block: one 512-bit accumulator of int32 lanes
IN_BLOCK = 4  # input channels per byte: one vpdpbusd lane
CODE_OFFSET = 1  # stored code = t + 1 (I2_S)


def packed_shape(shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
    k, c = shape[:2]
    r, s = shape[2:] if len(shape) == 4 else (1, 1)
    return (-(-k // OUT_BLOCK), -(-c // IN_BLOCK), r, s, OUT_BLOCK)


def pack_ternary(values: np.ndarray) -> np.ndarray:
    """Pack ternary ``values`` ([K, C, R, S] or [K, C], entries in {-1, 0, 1}) to uint8."""
    t = np.asarray(values)
    if t.ndim not in (2, 4):
        raise ValueError(f"ternary weights must be [K, C] or [K, C, R, S], got shape {t.shape}")
    if not np.isin(t, (-1, 0, 1)).all():
        raise ValueError("pack_ternary takes values in {-1, 0, +1} only")
    if t.ndim == 2:
        t = t[:, :, None, None]
    k, c, r, s = t.shape
    ko, co, _, _, _ = packed_shape(t.shape)
    codes = np.full((ko * OUT_BLOCK, co * IN_BLOCK, r, s), CODE_OFFSET, dtype=np.uint8)
    codes[:k, :c] = (t + CODE_OFFSET).astype(np.uint8)
    # [ko, ki, co, j, r, s] -> [ko, co, r, s, ki, j]
    blocks = codes.reshape(ko, OUT_BLOCK, co, IN_BLOCK, r, s).transpose(0, 2, 4, 5, 1, 3)
    shifts = (2 * np.arange(IN_BLOCK, dtype=np.uint8)).reshape(1, 1, 1, 1, 1, IN_BLOCK)
    return np.bitwise_or.reduce(blocks << shifts, axis=-1).astype(np.uint8)


def unpack_ternary(packed: np.ndarray, *, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pack_ternary`: int8 ternary weights of ``shape``."""
    p = np.asarray(packed, dtype=np.uint8)
    if p.shape != packed_shape(shape):
        raise ValueError(f"packed shape {p.shape} does not fit weight shape {tuple(shape)}")
    ko, co, r, s, _ = p.shape
    shifts = (2 * np.arange(IN_BLOCK, dtype=np.uint8)).reshape(1, 1, 1, 1, 1, IN_BLOCK)
    codes = (p[..., None] >> shifts) & 3  # [ko, co, r, s, ki, j]
    full = codes.transpose(0, 4, 1, 5, 2, 3).reshape(ko * OUT_BLOCK, co * IN_BLOCK, r, s)
    k, c = shape[:2]
    t = full[:k, :c].astype(np.int8) - CODE_OFFSET
    return t.reshape(shape)


def packed_bytes(*, shape: tuple[int, ...], num_groups: int) -> int:
    """Bytes a ternary layer needs: 2-bit packed weights, one byte per group code (7- and
    4-bit codes are stored byte-aligned) and a float32 scale per output channel."""
    return int(np.prod(packed_shape(shape))) + num_groups + 4 * shape[0]
