"""Host-side (numpy, compile-time) argument preparation for the kernels.

ISA-dependent arguments: the int32 bias (on VNNI and the vpmaddubsw forms, u8 x s8,
signed activations are shifted by +128 inside the kernel, so the bias must subtract
``128 * sum(w[k])`` per output channel) and the group codes in the kernel's layout
(``kernel_codes``: per output block and lane).  Weights are constants: both are made once at compile time.

Example::

    b = kernel_bias(spec, isa="vnni512", weights=packed, codes=q, bias=bias_i32)
    # None when the kernel takes no bias argument
    c = kernel_codes(spec, isa="avx2", codes=q)   # the kernel's layout of the [K, G, R, S] codes
"""

from __future__ import annotations

import numpy as np

from ..quant import reference, unpack_ternary
from .layout import unblock_weights
from .spec import ConvSpec, needs_compensation, maddubs_form


def decoded_weights(spec: ConvSpec, *, weights, codes) -> np.ndarray:
    """int8 weights ``[K, Cg, R, S]`` (``q_g * v``) from the kernel's weight arguments."""
    r, s = spec.kernel
    shape = (spec.out_channels, spec.cin_per_group, r, s)
    if spec.weight_bits == 2:
        values = unpack_ternary(weights, shape=shape)
    else:
        values = unblock_weights(weights, shape=shape)
    return reference.decode_weights(values, codes, group_size=spec.group_size)


def compensation(spec: ConvSpec, *, weights, codes, offset: int = 128) -> np.ndarray:
    """``offset * sum_{c, r, s} w[k, c, r, s]`` per output channel, int32."""
    w = decoded_weights(spec, weights=weights, codes=codes).astype(np.int64)
    return (offset * w.reshape(w.shape[0], -1).sum(axis=1)).astype(np.int32)


def kernel_bias(spec: ConvSpec, *, isa: str, weights, codes, bias=None) -> np.ndarray | None:
    """The ``bias`` argument for a kernel built for ``isa`` (None if it takes none)."""
    if bias is not None and not spec.bias:
        raise ValueError("a bias was given but spec.bias is False")
    if spec.bias and bias is None:
        raise ValueError("spec.bias is True: pass the int32 bias")
    out = None if bias is None else np.asarray(bias, np.int64)
    if needs_compensation(spec, isa):
        comp = compensation(spec, weights=weights, codes=codes).astype(np.int64)
        out = -comp if out is None else out - comp
    if spec.x_zero_point:  # x ~ s (q - z): the kernel sums q * w, the bias pays z * sum(w) back
        comp = compensation(spec, weights=weights, codes=codes, offset=spec.x_zero_point)
        out = -comp.astype(np.int64) if out is None else out - comp.astype(np.int64)
    if out is None:
        return None
    if np.abs(out).max(initial=0) >= 2**31:
        raise OverflowError("bias (with +128 compensation) exceeds int32")
    return out.astype(np.int32)


def kernel_codes(spec: ConvSpec, *, isa: str, codes) -> np.ndarray:
    """The ``codes`` argument of a kernel built for ``isa`` from group codes ``[K, G, R, S]``:
    the vpmaddubsw forms (``spec.maddubs_form``) take ``compute_ternary.codes_layout`` (the
    code of each chunk and pair, per output lane), the other tiled kernels (VNNI, int16, plain)
    ``compute.block_codes_shape`` (``[ceil(K/lanes), R, S, G, lanes]``; padded lanes hold 0),
    depthwise kernels ``[K, G, R, S]`` itself."""
    from .compute import block_codes_shape
    from .compute_ternary import chunk_group, codes_layout, plan_chunks
    from .intrin import BLOCKS

    q = np.ascontiguousarray(codes, dtype=np.uint8)
    if q.shape != spec.codes_shape:
        raise ValueError(f"codes must have shape {spec.codes_shape}, got {q.shape}")
    if spec.depthwise:
        return q
    if maddubs_form(spec, isa) is None:
        kb_n, r, s, g, lanes = block_codes_shape(spec, BLOCKS[isa])
        full = np.zeros((kb_n * lanes, g, r, s), np.uint8)
        full[: q.shape[0]] = q
        # [kb, ki, g, r, s] -> [kb, r, s, g, ki]
        return np.ascontiguousarray(full.reshape(kb_n, lanes, g, r, s).transpose(0, 3, 4, 2, 1))
    shape, pairs = codes_layout(spec, isa)
    kb_n, lanes, co_n = shape[0], shape[-2], shape[-3]
    full = np.zeros((kb_n * lanes, *q.shape[1:]), np.uint8)  # padded lanes: t = 0 anyway
    full[: q.shape[0]] = q
    g = np.array([[chunk_group(spec, co, h) for h in range(pairs)] for co in range(co_n)])
    sel = full[:, g]  # [K', co, pairs, R, S]
    if plan_chunks(spec).rs_inside:  # cluster: one code over R x S, read at (0, 0)
        out = sel[..., 0, 0].reshape(kb_n, lanes, co_n, pairs).transpose(0, 2, 1, 3)
    else:
        r, s = spec.kernel
        out = sel.reshape(kb_n, lanes, co_n, pairs, r, s).transpose(0, 4, 5, 2, 1, 3)
    return np.ascontiguousarray(out).reshape(shape)
