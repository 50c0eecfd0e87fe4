"""Intel AMX (``amx-int8``) form of the VNNI conv kernel: ``tdpbusd`` on 16 x 64 byte tiles.

Same compute, arguments, layouts and epilogue as ``vnni512`` (u8 activations, +128 shift and
bias compensation for s8; decoded int32 weight words ``[kb, r, s, cb, 16]``: the 16 words of one
output block at one 4-channel step are one 64-byte row of an AMX B tile, so 16 steps are one
1 KB tile), a different schedule.  One intrinsic call (:class:`AmxBlock`) computes ``rows``
output pixels x ``nk`` blocks of 16 output channels over the layer's whole reduction::

    C[rows, nk, 16] int32 = sum over (r, s, 64-channel tile) of A[rows, 64] u8 . B[16, 16] s8x4

in tile registers: ``ldtilecfg`` (the configuration is per thread, so every call loads it),
``tilezero`` of the nk accumulators (the conv block's init is part of the intrinsic), per
(r, s, tile) one A load (row stride: the input's pixel stride times the conv's W stride), nk B
loads and nk ``tdpbusd``, then nk stores into the register tile's memory, which the epilogue
reads.  Tile numbers are immediates (``T.int8``): 0..nk-1 C, 4 A, 5..4+nk B.

When (``amx_form``): a ``vnni512`` target that also has ``amx-tile`` and ``amx-int8``, a dense
(groups = 1) conv, no dilation, any stride, input channels a multiple of 64 and at least
``MIN_STEPS`` tile products per call; any output channel count (the accumulator and the decoded
weights are padded to whole blocks of 16, as for VNNI); ternary, 4- or 8-bit weights.  Linux
hands out the tile state only on request: ``cpu_features.request_amx`` (called before any AMX
library runs), else the first tile instruction is a SIGILL.

Example::

    >>> from tvm_ternary.schedules.amx import amx_blocks, amx_rows
    >>> amx_rows(56), amx_rows(13), amx_rows(7), amx_blocks(1008), amx_blocks(256)
    (14, 13, 7, 3, 2)
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvm.script.ir_builder import IRBuilder
from tvm.tirx.script.builder import ir as TB

from .. import tvm_adapter as ta
from .spec import ConvSpec

# The schedule that tensorizes with these intrinsics: conv2d._schedule_amx.

DEPTH = 64  # input channels (bytes) per tile row
LANES = 16  # output channels per tile (int32 columns)
STEPS = DEPTH // 4  # int32 weight words per tile column = B tile rows
AMX_FEATURES = ("amx-tile", "amx-int8")
# Fewest tdpbusd per accumulator tile and call (taps x 64-channel steps) for the AMX form: with
# one, the tile configuration and the accumulator's load and store outweigh it (Xeon, 1 thread:
# ResNet-50's 1x1 64->256 @56 0.206 ms VNNI, 0.284 ms AMX; 256->64 @56, 4 steps: 0.157 -> 0.102).
MIN_STEPS = 2


def amx_rows(out_width: int) -> int:
    """Output pixels per tile: the largest divisor of the output width up to 16 (a tile never
    crosses an output row, whose pixels are contiguous in the input)."""
    return max(d for d in range(1, min(16, out_width) + 1) if out_width % d == 0)


def amx_blocks(out_channels: int) -> int:
    """Output blocks of 16 per call: 3 or 2 accumulator tiles where they divide the blocks (the
    A tile is loaded once for all of them), else 1.  Tiles: nk C + 1 A + nk B <= 8."""
    kb = -(-out_channels // LANES)
    return next(n for n in (3, 2, 1) if kb % n == 0)


def amx_form(spec: ConvSpec, isa: str, target) -> bool:
    """True when ``spec`` gets the AMX schedule on ``target`` (module docstring)."""
    if isa != "vnni512" or not ta.target_has_features(target, *AMX_FEATURES):
        return False
    (r_, s_), steps = spec.kernel, spec.in_channels // DEPTH
    return (not spec.depthwise and not spec.dense and spec.groups == 1
            and spec.dilation == (1, 1) and spec.in_channels % DEPTH == 0
            and r_ * s_ * steps >= MIN_STEPS and spec.out_width >= 4)


@dataclass(frozen=True)
class AmxBlock:
    """One call: ``rows`` pixels x ``nk`` output blocks of 16, the whole reduction of a layer
    (``r_`` x ``s_`` taps x ``cbn`` tiles of 64 input channels) accumulated in tile registers."""

    rows: int
    nk: int
    r_: int
    s_: int
    cbn: int
    padded: bool  # A is the padded stage [n, h, w, g, c] (else the input [n, h, w, c])
    stride: int = 1  # along W: the A tile's rows are pixels `stride` input pixels apart

    @property
    def name(self) -> str:
        flags = "p" if self.padded else "x"
        return (f"tvm_ternary_amx_{self.rows}x{self.nk}_{self.r_}x{self.s_}x{self.cbn}"
                f"_s{self.stride}_{flags}")


def _buffers(blk: AmxBlock):
    """(shape, dtype, strides) of the A, B and C operands of an :class:`AmxBlock`, the strides
    free variables for match_buffer."""
    from tvm import tirx

    rows, nk, r_, s_, steps = blk.rows, blk.nk, blk.r_, blk.s_, blk.cbn * STEPS
    span = (rows - 1) * blk.stride + s_
    a_shape = (r_, span, 1, blk.cbn * DEPTH) if blk.padded else (r_, span, blk.cbn * DEPTH)
    # B: the decoded words [kb, r, s, cb, ki], or the 4/8-bit weight argument (the same layout)
    b_shape = (nk, r_, s_, steps, LANES)

    def strided(shape):
        return [tirx.Var(f"st{i}", "int64") for i in range(len(shape) - 1)] + [1]

    return ((a_shape, "uint8", strided(a_shape)), (b_shape, "int32", strided(b_shape)),
            ((rows, nk, LANES), "int32", strided((rows, nk, LANES))))


def _desc(blk: AmxBlock):
    rows, nk, r_, s_, cbn = blk.rows, blk.nk, blk.r_, blk.s_, blk.cbn
    (a_shape, _, a_st), (b_shape, _, b_st), (c_shape, _, c_st) = _buffers(blk)
    a_all, b_all = (tuple(slice(0, e) for e in shape) for shape in (a_shape, b_shape))
    # Loops and iterators in the conv block's order (ow, kb, ki, r, s, cb, cl); blockize leaves
    # the iterators of unit loops (nk = 1, a 1x1 kernel) out of the block tensorize compares.
    names = ("ow", "kb", "ki", "r", "s", "cb", "cl")
    extents = dict(zip(names, (rows, nk, LANES, r_, s_, cbn * STEPS, 4)))
    live = [n for n in names if extents[n] > 1]
    kinds = "".join("S" if n in ("ow", "kb", "ki") else "R" for n in live)
    grid = [T.int64(extents[n]) for n in names]  # the loops keep their unit extents

    def at(v):
        """Every iterator by name (0 for those left out)."""
        d = {n: T.int64(0) for n in names}
        d.update(zip(live, v))
        return d

    def a_idx(v):
        i = at(v)
        pix, c = i["r"], i["ow"] * T.int64(blk.stride) + i["s"]
        ch = i["cb"] * T.int64(4) + i["cl"]
        return (pix, c, T.int64(0), ch) if blk.padded else (pix, c, ch)

    def b_idx(v):
        i = at(v)
        return (i["kb"], i["r"], i["s"], i["cb"], i["ki"])

    def c_idx(v):
        i = at(v)
        return (i["ow"], i["kb"], i["ki"])

    def shift(v):
        return at(v)["cl"] * T.int64(8)

    # Built with TVMScript's IR builder, not parsed: the number of iterators varies.  The
    # weight byte is the same sign-extending shift as the VNNI block's.
    with IRBuilder() as ib:
        with TB.prim_func(s_tir=True):
            TB.func_name("desc")
            a, b, c = (TB.arg(n, TB.handle()) for n in "abc")
            A = TB.match_buffer(a, a_shape, "uint8", strides=a_st, offset_factor=1)
            B = TB.match_buffer(b, b_shape, "int32", strides=b_st, offset_factor=1)
            C = TB.match_buffer(c, c_shape, "int32", strides=c_st, offset_factor=1)
            with TB.sblock("root"):
                TB.reads(A[a_all], B[b_all])  # (the block's init writes C first)
                TB.writes(C[0:rows, 0:nk, 0:LANES])
                with TB.grid(*grid) as loops:
                    with TB.sblock("update"):
                        loops = [lv for n, lv in zip(names, loops) if extents[n] > 1]
                        v = TB.axis.remap(kinds, loops)
                        v = list(v) if len(live) > 1 else [v]  # (one var comes back bare)
                        TB.reads(C[c_idx(v)], A[a_idx(v)], B[b_idx(v)])
                        TB.writes(C[c_idx(v)])
                        with TB.init():
                            TB.buffer_store(C, TB.int32(0), list(c_idx(v)))
                        w = TB.Cast("int8", TB.Cast("int64", B[b_idx(v)]) >> shift(v))
                        TB.buffer_store(C, C[c_idx(v)] + TB.Cast("int32", A[a_idx(v)])
                                        * TB.Cast("int32", w), list(c_idx(v)))
    desc = ib.get()
    return desc


def _impl(blk: AmxBlock):
    rows, nk, r_, s_, cbn = blk.rows, blk.nk, blk.r_, blk.s_, blk.cbn
    (a_shape, _, a_st), (b_shape, _, b_st), (c_shape, _, c_st) = _buffers(blk)
    padded = blk.padded
    a_all, b_all = (tuple(slice(0, e) for e in shape) for shape in (a_shape, b_shape))
    a_row = a_st[1] * T.int64(blk.stride)  # bytes between two output pixels' rows of A
    b_row = b_st[3]  # elements (words) between two 16-word steps of B
    c_row = c_st[0]

    # Tiles: 0..nk-1 accumulate C (rows x 16 int32), 4 holds A (rows x 64 u8), 5..5+nk-1 hold
    # B (16 steps x 16 words).  The configuration is per thread and loaded by every call (a
    # parallel task may run on any thread); the accumulators start at zero in their tiles,
    # stay there for the whole reduction and touch memory once.
    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, a_shape, "uint8", strides=a_st, offset_factor=1)
        B = T.match_buffer(b, b_shape, "int32", strides=b_st, offset_factor=1)
        C = T.match_buffer(c, c_shape, "int32", strides=c_st, offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:rows, 0:nk, 0:LANES], A[a_all], B[b_all])
            T.writes(C[0:rows, 0:nk, 0:LANES])
            # palette 1 (byte 0); bytes per row of tile t at 16 + 2t, its rows at 48 + t
            cfg = T.alloc_buffer((64,), "uint8", scope="local")
            for i in T.unroll(64):
                cfg[i] = T.Select(i == 0, T.uint8(1), T.Select(
                    (i >= 16) and (i < 32) and (i % 2 == 0) and ((i - 16) // 2 < 5 + nk)
                    and ((i - 16) // 2 < nk or (i - 16) // 2 >= 4), T.uint8(DEPTH), T.Select(
                        (i >= 48) and (i < 48 + nk), T.uint8(rows), T.Select(
                            i == 52, T.uint8(rows), T.Select(
                                (i >= 53) and (i < 53 + nk), T.uint8(STEPS), T.uint8(0))))))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", T.address_of(cfg[0])))
            for j in T.unroll(nk):
                T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.Cast("int8", j)))
            for r, s, cb in T.grid(T.int64(r_), T.int64(s_), T.int64(cbn)):
                T.evaluate(T.call_llvm_intrin(
                    "void", "llvm.x86.tileloadd64", T.int8(4),
                    T.address_of(A[r, s, 0, cb * T.int64(DEPTH)] if padded
                                 else A[r, s, cb * T.int64(DEPTH)]), a_row))
                for j in T.unroll(nk):
                    T.evaluate(T.call_llvm_intrin(
                        "void", "llvm.x86.tileloadd64", T.Cast("int8", j + 5),
                        T.address_of(B[j, r, s, cb * T.int64(STEPS), 0]),
                        b_row * T.int64(4)))
                    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbusd", T.Cast("int8", j),
                                                  T.int8(4), T.Cast("int8", j + 5)))
            for j in T.unroll(nk):
                T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.Cast("int8", j),
                                              T.address_of(C[0, j, 0]), c_row * T.int64(4)))

    return impl


_REGISTERED: set = set()


def intrin_name(blk: AmxBlock) -> str:
    """The tensor intrinsic of ``blk`` (registered on first call)."""
    if blk not in _REGISTERED:
        TensorIntrin.register(blk.name, _desc(blk), _impl(blk), override=True)
        _REGISTERED.add(blk)
    return blk.name
