"""TE compute of the ``vpmaddubsw`` kernels (forms ``avx2t`` / ``avx512t``: ternary layers, and
4/8-bit layers whose pair sums fit int16, on AVX2 / AVX-512BW targets without VNNI).

The values ``v`` (ternary ``t`` in {-1, 0, +1}, or 4/8-bit) stay signed bytes in the inner loop;
the group codes ``q`` are applied once per *chunk* of steps that share them::

    acc[k]   = sum_chunks  sum_h  q[k, chunk, h] * acc16[k, chunk, h]          (int32, vpmaddwd)
    acc16[k, chunk, h] = sum_{steps of the chunk} sum_j  x[c] * v[k, c]         (int16, vpmaddubsw)
              with c = 4 * cb + 2 * h + j: h picks the pair of the 4-channel step

Why it is exact: one ``vpmaddubsw`` pair sum is at most ``spec.pair_bound(spec)`` in magnitude
(``2 * amax * vmax``; ``amax`` = 255 for u8 and for s8/s4 shifted by +128 into u8, 15 for u4), at
most 32767 by ``maddubs_form``, so its int16 saturation never triggers; a run of
``32767 // pair_bound`` int16 additions (64 for ternary x u8, 1092 for ternary x u4) cannot
overflow, and :func:`plan_chunks` never puts more steps in a chunk.  Both channels of a pair
belong to one group when N is even (or there is one group), so the pair's code is one int16
lane of ``q``.

The ``codes`` argument is in the kernel layout of :func:`codes_layout` (``params.kernel_codes``
makes it from ``[K, G, R, S]`` at compile time).  Stages (block names the schedule looks up):
``pad`` (as compute.py), ``decode`` (``v`` as int32 words of 4 signed bytes,
``wt[kb, r, s, cb, ki]``: unpacked from 2 bits, or the 4/8-bit blocked words as they are), ``codes_t`` (int32 words of the two pairs' int16 codes
``q[kb, chunk.., ki]``),
``acc16``, ``conv`` (int32), ``y`` (the epilogue of compute.py).

Example::

    parts = ternary_conv_compute(spec, isa="avx2", acc_width=spec.out_width)
    parts.chunks   # ChunkPlan(span=2, rs_inside=False, steps=2) for FGQ N=8
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tvm import te

from .. import tvm_adapter as ta
from .intrin import BLOCKS
from .spec import INT16_MAX, ConvSpec, maddubs_form, needs_compensation, pair_bound


@dataclass(frozen=True)
class ChunkPlan:
    """How the reduction is cut into int16 runs.

    span: 4-channel steps along C per chunk (every step of a chunk has the chunk's codes);
    rs_inside: the chunk also runs over the kernel's (r, s) (cluster grouping: one code for
        N channels x R x S), else the chunk sits at one (r, s);
    steps: ``vpmaddubsw`` steps per chunk (<= max_steps).
    """

    span: int
    rs_inside: bool
    steps: int


def max_steps(spec: ConvSpec) -> int:
    """Steps an int16 accumulator takes exactly: ``32767 // pair_bound(spec)`` (64 for ternary
    x u8, 1092 for ternary x u4, 9 for 4-bit x u8)."""
    return INT16_MAX // pair_bound(spec)


def plan_chunks(spec: ConvSpec) -> ChunkPlan:
    """The longest exact chunks for ``spec`` (see the module docstring)."""
    cb_n = -(-spec.cin_per_group // 4)
    n = spec.group_size
    if spec.n_groups_q == 1:
        per_group = cb_n  # one group: every step shares its codes
    elif n % 4 == 0:
        per_group = n // 4
    else:  # N even, N % 4 == 2: a step's two pairs may be in two groups; q is per pair
        per_group = 1
    limit = max_steps(spec)
    rs = spec.kernel[0] * spec.kernel[1]
    rs_inside = spec.grouping == "cluster" and 1 < rs <= limit
    per_step = rs if rs_inside else 1
    # a chunk must not straddle a group, nor run past the last step
    common = math.gcd(per_group, cb_n)
    span = max(d for d in range(1, common + 1) if common % d == 0 and d * per_step <= limit)
    return ChunkPlan(span=span, rs_inside=rs_inside, steps=span * per_step)


def codes_layout(spec: ConvSpec, isa: str) -> tuple[tuple, int]:
    """``(shape, pairs)`` of the ``codes`` argument of the vpmaddubsw form of ``isa``: uint8
    ``[ceil(K / lanes), (R, S,) chunks, lanes, pairs]`` (cluster chunks drop R, S), the code of
    every chunk (and ``vpmaddubsw`` pair when a step's two pairs can be in two groups,
    ``pairs = 2``) per output lane, contiguous over lanes so that the kernel widens it to
    int16 with vector loads.  Made at compile time by ``params.kernel_codes``: the per-call
    gather of ``[K, G, R, S]`` codes took 40% of a 3x3 512@7 layer at N=4."""
    blk = BLOCKS[maddubs_form(spec, isa)]
    chunks = plan_chunks(spec)
    cb_n = -(-spec.cin_per_group // 4)
    co_n = cb_n // chunks.span
    pairs = 1 if spec.n_groups_q == 1 or spec.group_size % 4 == 0 else 2
    rs = () if chunks.rs_inside else tuple(spec.kernel)
    return (-(-spec.out_channels // blk.lanes), *rs, co_n, blk.lanes, pairs), pairs


def chunk_group(spec: ConvSpec, co, h):
    """Group of pair ``h`` in chunk ``co`` (its first channel's; a chunk is inside a group)."""
    chunks = plan_chunks(spec)
    return min((co * chunks.span * 4 + h * 2) // spec.group_size, spec.n_groups_q - 1)


def ternary_conv_compute(spec: ConvSpec, *, isa: str, acc_width: int):
    """TE tensors of ``spec``'s vpmaddubsw kernel on ``isa`` (``avx2`` / ``avx512``)."""
    from .compute import ConvParts, _epilogue_stage, input_stage

    form = maddubs_form(spec, isa)
    if form is None:
        raise ValueError(f"{spec} has no vpmaddubsw kernel on {isa!r}")
    blk = BLOCKS[form]
    chunks = plan_chunks(spec)
    shift = needs_compensation(spec, isa)
    # signed activations are always shifted here (needs_compensation), so the block's u8 input
    # pads exactly where channels, padding or the shift ask for it
    x, a_at, has_pad = input_stage(spec, blk, shift, acc_width)
    ternary = spec.weight_bits == 2
    weights = te.placeholder(spec.weight_shape, "uint8" if ternary else "int32", name="weights")
    codes_shape, pairs = codes_layout(spec, isa)
    codes = te.placeholder(codes_shape, "uint8", name="codes")
    cg, kg, k_ = spec.cin_per_group, spec.cout_per_group, spec.out_channels
    ob = blk.lanes
    (r_, s_), (sh, sw), (dh, dw) = spec.kernel, spec.stride, spec.dilation
    kb_n, cb_n = -(-k_ // ob), -(-cg // 4)

    i32 = lambda v: ta.const(v, "int32")  # noqa: E731

    u32 = lambda v: ta.const(v, "uint32")  # noqa: E731

    def decode_fn(kb, r, s, cb, ki):
        # The packed byte's 4 codes t + 1 (2 bits each) spread to one byte each, then per byte
        # (code + 0x7f) ^ 0x80 = t as a signed byte (0x81 at most: no carry between bytes).
        # uint32: TVM marks int32 adds nsw, and 0x02020202 + 0x7f7f7f7f passes 2^31.
        k = kb * ob + ki  # < 16 * ceil(K / 16): padded lanes read code 1 (t = 0)
        if not ternary:  # 4/8-bit: the blocked int32 word already holds the 4 signed bytes
            return weights[spec.weight_index(k // 16, cb, r, s, k % 16)]
        b = weights[spec.weight_index(k // 16, cb, r, s, k % 16)].astype("uint32")
        x = (b | (b << u32(12))) & u32(0x000F000F)
        x = (x | (x << u32(6))) & u32(0x03030303)
        return ((x + u32(0x7F7F7F7F)) ^ u32(0x80808080)).astype("int32")

    wt = te.compute((kb_n, r_, s_, cb_n, ob), decode_fn, name="decode")

    span = chunks.span
    chunk_shape = codes_shape[1:-2]

    def codes_fn(kb, *rest):
        # One int32 word per lane, its two int16 halves the pairs' codes: what one vpmaddwd
        # lane eats.  Made with contiguous byte loads and a multiply (q * 0x10001 copies q into
        # both halves), no per-pair index arithmetic (it would gather).
        *chunk, ki = rest
        q0 = codes[(kb, *chunk, ki, 0)].astype("int32")
        if pairs == 1:
            return q0 * i32(0x10001)
        return q0 | (codes[(kb, *chunk, ki, 1)].astype("int32") << i32(16))

    cw = te.compute((kb_n, *chunk_shape, ob), codes_fn, name="codes_t")

    def group_of(kb):
        return 0 if spec.groups == 1 else kb // (kg // ob)

    cbi = te.reduce_axis((0, span), name="cbi")
    j = te.reduce_axis((0, 2), name="j")
    if chunks.rs_inside:
        r = te.reduce_axis((0, r_), name="r")
        s = te.reduce_axis((0, s_), name="s")
        steps = [r, s, cbi]
    else:
        steps = [cbi]

    def acc16_fn(n, oh, ow, kb, *rest):
        *chunk, ki, h = rest
        if chunks.rs_inside:
            (co,), rr, ss = chunk, r, s
        else:
            rr, ss, co = chunk
        cb = co * span + cbi
        a = a_at(n, oh * sh + rr * dh, ow * sw + ss * dw, group_of(kb), cb * 4 + h * 2 + j)
        t = (wt[kb, rr, ss, cb, ki].astype("int64") >> ((h * 2 + j) * 8)).astype("int8")
        return te.sum(a.astype("int16") * t.astype("int16"), axis=[*steps, j])

    acc_lead = (spec.batch, spec.out_height, acc_width, kb_n)
    acc16 = te.compute((*acc_lead, *chunk_shape, ob, 2), acc16_fn, name="acc16")

    red = [te.reduce_axis((0, e), name=nm) for e, nm in
           zip(chunk_shape, ("co",) if chunks.rs_inside else ("r", "s", "co"))]
    h = te.reduce_axis((0, 2), name="h")
    acc = te.compute(
        (*acc_lead, ob),
        lambda n, oh, ow, kb, ki: te.sum(
            acc16[(n, oh, ow, kb, *red, ki, h)].astype("int32")
            * (cw[(kb, *red, ki)].astype("int64") >> (h * 16)).astype("int16").astype("int32"),
            axis=[*red, h]),
        name="conv",
    )
    args, y = _epilogue_stage(spec, isa, lambda n, oh, ow, k: acc[n, oh, ow, k // ob, k % ob])
    return ConvParts((x, weights, codes, *args, y), blk, has_pad, True, form=form, chunks=chunks)
