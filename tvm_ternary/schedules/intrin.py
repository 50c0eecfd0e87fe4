"""Dot-product tensor intrinsics for x86: one reference description per block shape, paired with
per-ISA implementations.

Block shapes (``lanes`` output channels x ``depth`` reduction elements, int32 accumulators):

================  =========  ============================  =======================================
ISA               block      operands (B: int32 words)     instructions per block
================  =========  ============================  =======================================
``vnni512``       16 x 4     A u8[4], B s8[16, 4]          ``vpdpbusd zmm`` (1)
``avxvnni``        8 x 4     A u8[4], B s8[8, 4]           ``{vex} vpdpbusd ymm`` (1)
``avx512``        16 x 2     A s16[2], B s16[16, 2]        ``vpmaddwd zmm`` + ``vpaddd`` (2)
``avx2``           8 x 2     A s16[2], B s16[8, 2]         ``vpmaddwd ymm`` + ``vpaddd`` (2)
``avx512t``       16 x 4     A u8[4], B t s8[16, 4]        step: ``vpmaddubsw zmm`` + ``vpaddw``;
                             group: codes s16[16, 2]       group: ``vpmaddwd zmm`` + ``vpaddd``
                             (as int32 words)
``avx2t``          8 x 4     A u8[4], B t s8[8, 4]         the same on ymm
depthwise VNNI    16 / 8     A u8[lanes, 4] (int32 words,  ``vpdpbusd`` (1), no broadcast
                  lanes x 4  one per channel), B s8 words  (``depthwise_intrin_name``)
depthwise pairs   16 / 8     A s16[lanes, 2] (int32 words, ``vpmaddwd`` + ``vpaddd`` (2), no
(avx512 / avx2)   lanes x 2  one per channel), B s16 words broadcast (``depthwise_intrin_name``)
================  =========  ============================  =======================================

The forms ``avx2t`` / ``avx512t`` (ternary layers, and 4/8-bit ones whose pair sums fit int16,
on avx2 / avx512 targets: ``spec.maddubs_form``) keep the values (ternary ``t`` in {-1, 0, +1})
in the inner loop and have two intrinsics: a *step* (``vpmaddubsw(u8 x, s8 v)`` adds int16 pair
sums, ``|sum| <= spec.pair_bound``, e.g. 2*255 for ternary, into an int16 accumulator: never
saturates) and a *group* (``vpmaddwd(acc16, group codes)`` + ``vpaddd`` into int32), applied
once per run of steps that share their group codes.  The kernel bounds a run so that the int16
accumulator is exact (``compute_ternary.plan_chunks``).

Without VNNI we widen to int16 and use ``vpmaddwd`` rather than TVM's ``vpmaddubsw`` pair: the
u8 x s8 pair sum of ``vpmaddubsw`` saturates at int16 (255*127*2 > 32767), so it is not bit-exact
for full-range u8 activations.  ``plain`` has no intrinsic (scalar/auto-vectorised loops).

The shipped ``dot_16x4_vnni`` of TVM 0.27 passes ``<16 x i32>`` operands to
``llvm.x86.avx512.vpdpbusd.512``; LLVM 22 declares ``(<16 x i32>, <64 x i8>, <64 x i8>)`` and the
module fails verification, so the A broadcast and B are reinterpreted to byte vectors here.

Example::

    from tvm_ternary.schedules import intrin
    name = intrin.intrin_name("vnni512")   # registered on first call
    sch.tensorize(inner_loop, name)
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T


@dataclass(frozen=True)
class Block:
    """Shape of one intrinsic call: ``lanes`` output channels x ``depth`` inputs."""

    lanes: int
    depth: int
    a_dtype: str  # activation element type the kernel feeds (after +128 shift / widening)
    b_dtype: str  # decoded weight element type


# Block used by each ISA.  ``plain`` mirrors vnni512's layout so the reference path shares it.
BLOCKS = {
    "vnni512": Block(16, 4, "uint8", "int8"),
    "avxvnni": Block(8, 4, "uint8", "int8"),
    "avx512": Block(16, 2, "int16", "int16"),
    "avx2": Block(8, 2, "int16", "int16"),
    "plain": Block(16, 4, "int8", "int8"),  # a_dtype is the raw input dtype on this path
    # ternary forms: b_dtype is the type of t in the inner loop (the codes are int16)
    "avx512t": Block(16, 4, "uint8", "int8"),
    "avx2t": Block(8, 4, "uint8", "int8"),
}
TERNARY_FORMS = {"avx512": "avx512t", "avx2": "avx2t"}

# LLVM intrinsic per (ISA): VNNI ones accumulate, pmaddwd ones need a separate add.
_VNNI_LLVM = {"vnni512": "llvm.x86.avx512.vpdpbusd.512", "avxvnni": "llvm.x86.avx512.vpdpbusd.256"}
_PMADDWD_LLVM = {"avx512": "llvm.x86.avx512.pmaddw.d.512", "avx2": "llvm.x86.avx2.pmadd.wd"}
_PMADDUBSW_LLVM = {"avx512t": "llvm.x86.avx512.pmaddubs.w.512",
                   "avx2t": "llvm.x86.avx2.pmadd.ub.sw"}
_TERNARY_PMADDWD_LLVM = {"avx512t": _PMADDWD_LLVM["avx512"], "avx2t": _PMADDWD_LLVM["avx2"]}


def _desc(blk: Block):
    lanes, depth, a_dt, b_dt = blk.lanes, blk.depth, blk.a_dtype, blk.b_dtype
    bits = 32 // depth

    # B holds one int32 word per output lane: its `depth` weights packed little-endian, the
    # layout one vpdpbusd / vpmaddwd lane consumes.  The weight of reduction element k is the
    # k-th byte (int16 half) of the word, sign-extended.  Index dtype int64 matches the
    # kernels (create_prim_func(..., index_dtype_override="int64")).
    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((depth,), a_dt, offset_factor=1),
        B: T.Buffer((lanes,), "int32", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:depth], B[0:lanes])
            T.writes(C[0:lanes])
            for i, k in T.grid(T.int64(lanes), T.int64(depth)):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast(
                        "int32", T.Cast(b_dt, T.Cast("int64", B[vi]) >> vk * T.int64(bits))
                    )

    return desc


def _vnni_impl(blk: Block, llvm_name: str):
    lanes, depth = blk.lanes, blk.depth
    nbytes = lanes * depth
    acc_t, byte_t = f"int32x{lanes}", f"int8x{nbytes}"

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((depth,), "uint8", offset_factor=1),
        B: T.Buffer((lanes,), "int32", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:depth], B[0:lanes])
            T.writes(C[0:lanes])
            # 4 activation bytes -> one i32, broadcast to every lane, then viewed as bytes again
            # because LLVM 22's vpdpbusd takes byte vectors.
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_bytes = T.reinterpret(T.broadcast(a_i32, lanes), dtype=byte_t)
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name),
                C.vload([0], dtype=acc_t),
                a_bytes,
                T.reinterpret(B.vload([0], dtype=acc_t), dtype=byte_t),
                dtype=acc_t,
            )

    return impl


def _pmaddwd_impl(blk: Block, llvm_name: str):
    lanes, depth = blk.lanes, blk.depth
    acc_t, half_t = f"int32x{lanes}", f"int16x{lanes * depth}"

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((depth,), "int16", offset_factor=1),
        B: T.Buffer((lanes,), "int32", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:depth], B[0:lanes])
            T.writes(C[0:lanes])
            # The int16 pair (a0, a1) viewed as one i32 and broadcast: vpmaddwd then forms
            # a0*b[i,0] + a1*b[i,1] exactly in int32 (no saturation, unlike vpmaddubsw).
            a_i32 = T.reinterpret(A.vload([0], "int16x2"), dtype="int32")
            a_pairs = T.reinterpret(T.broadcast(a_i32, lanes), dtype=half_t)
            C[T.ramp(T.int32(0), 1, lanes)] = C.vload([0], dtype=acc_t) + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name),
                a_pairs,
                T.reinterpret(B.vload([0], dtype=acc_t), dtype=half_t),
                dtype=acc_t,
            )

    return impl


def _ternary_step_desc(blk: Block):
    lanes = blk.lanes

    # One step: the int16 pair (h) of lane i gains A[2h]*t[i,2h] + A[2h+1]*t[i,2h+1], t being
    # byte 2h+j of B's word i, sign-extended (the form compute_ternary's acc16 stage spells).
    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes,), "int32", offset_factor=1),
        C: T.Buffer((lanes, 2), "int16", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes, 0:2], A[0:4], B[0:lanes])
            T.writes(C[0:lanes, 0:2])
            for i, h, j in T.grid(T.int64(lanes), T.int64(2), T.int64(2)):
                with T.sblock("update"):
                    vi, vh, vj = T.axis.remap("SSR", [i, h, j])
                    C[vi, vh] = C[vi, vh] + T.Cast("int16", A[vh * T.int64(2) + vj]) * T.Cast(
                        "int16", T.Cast("int8", T.Cast("int64", B[vi])
                                        >> (vh * T.int64(2) + vj) * T.int64(8)))

    return desc


def _ternary_step_impl(blk: Block, llvm_name: str):
    lanes = blk.lanes
    half_t, byte_t = f"int16x{2 * lanes}", f"int8x{4 * lanes}"

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes,), "int32", offset_factor=1),
        C: T.Buffer((lanes, 2), "int16", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes, 0:2], A[0:4], B[0:lanes])
            T.writes(C[0:lanes, 0:2])
            # vpmaddubsw multiplies unsigned bytes (the 4 activations, broadcast) by signed
            # bytes (t); its int16 saturation never triggers: |pair| <= 2*255.  vpaddw after.
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_bytes = T.reinterpret(T.broadcast(a_i32, lanes), dtype=byte_t)
            C[0, T.ramp(T.int64(0), 1, 2 * lanes)] = C.vload([0, 0], dtype=half_t) + \
                T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(llvm_name),
                    a_bytes,
                    T.reinterpret(B.vload([0], dtype=f"int32x{lanes}"), dtype=byte_t),
                    dtype=half_t,
                )

    return impl


def _ternary_group_desc(blk: Block):
    lanes = blk.lanes

    # One group: lane i gains q[i,0]*acc16[i,0] + q[i,1]*acc16[i,1] in int32, q[i,h] being
    # int16 half h of B's word i (the codes of the two pairs).
    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((lanes, 2), "int16", offset_factor=1),
        B: T.Buffer((lanes,), "int32", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes, 0:2], B[0:lanes])
            T.writes(C[0:lanes])
            for i, h in T.grid(T.int64(lanes), T.int64(2)):
                with T.sblock("update"):
                    vi, vh = T.axis.remap("SR", [i, h])
                    C[vi] = C[vi] + T.Cast("int32", A[vi, vh]) * T.Cast(
                        "int32", T.Cast("int16", T.Cast("int64", B[vi]) >> vh * T.int64(16)))

    return desc


def _ternary_group_impl(blk: Block, llvm_name: str):
    lanes = blk.lanes
    acc_t, half_t = f"int32x{lanes}", f"int16x{2 * lanes}"

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((lanes, 2), "int16", offset_factor=1),
        B: T.Buffer((lanes,), "int32", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes, 0:2], B[0:lanes])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = C.vload([0], dtype=acc_t) + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name),
                A.vload([0, 0], dtype=half_t),
                T.reinterpret(B.vload([0], dtype=acc_t), dtype=half_t),
                dtype=acc_t,
            )

    return impl


# Depthwise word blocks: activation and weight element types of a word, per ISA.
_DEPTHWISE_ELEMENTS = {"vnni512": ("uint8", "int8"), "avxvnni": ("uint8", "int8"),
                       "avx512": ("int16", "int16"), "avx2": ("int16", "int16")}


def _depthwise_desc(lanes: int, a_dtype: str, b_dtype: str):
    # Depthwise block: lane i (one channel) gains the dot product of the elements of its own
    # activation word A[i] (the taps of a kernel row: 4 u8 for VNNI,
    # compute.depthwise_vnni_compute; 2 int16 otherwise, compute.depthwise_pairs_compute) and
    # of its weight word B[i]: no broadcast, unlike the dense blocks.
    bits = {"uint8": 8, "int8": 8, "int16": 16}[a_dtype]
    elems = 32 // bits  # elements of a word

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((lanes,), "int32", offset_factor=1),
        B: T.Buffer((lanes,), "int32", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes], B[0:lanes])
            T.writes(C[0:lanes])
            for i, k in T.grid(T.int64(lanes), T.int64(elems)):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.Cast(
                        "int32", T.Cast(a_dtype, T.Cast("int64", A[vi]) >> vk * T.int64(bits))
                    ) * T.Cast("int32", T.Cast(b_dtype, T.Cast("int64", B[vi]) >> vk * T.int64(bits)))

    return desc


def _depthwise_vnni_impl(lanes: int, llvm_name: str):
    acc_t, byte_t = f"int32x{lanes}", f"int8x{4 * lanes}"

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((lanes,), "int32", offset_factor=1),
        B: T.Buffer((lanes,), "int32", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes], B[0:lanes])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name),
                C.vload([0], dtype=acc_t),
                T.reinterpret(A.vload([0], dtype=acc_t), dtype=byte_t),
                T.reinterpret(B.vload([0], dtype=acc_t), dtype=byte_t),
                dtype=acc_t,
            )

    return impl


def _depthwise_pmaddwd_impl(lanes: int, llvm_name: str):
    acc_t, half_t = f"int32x{lanes}", f"int16x{2 * lanes}"

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((lanes,), "int32", offset_factor=1),
        B: T.Buffer((lanes,), "int32", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes], B[0:lanes])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = C.vload([0], dtype=acc_t) + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name),
                T.reinterpret(A.vload([0], dtype=acc_t), dtype=half_t),
                T.reinterpret(B.vload([0], dtype=acc_t), dtype=half_t),
                dtype=acc_t,
            )

    return impl


def depthwise_intrin_name(isa: str) -> str:
    """Register (once) and return the depthwise intrinsic of ``isa``: per lane, the elements of
    its own activation word (not a broadcast) times those of its weight word -- 4 bytes with
    ``vpdpbusd`` on VNNI ISAs, 2 int16 with ``vpmaddwd`` + ``vpaddd`` on avx512 / avx2."""
    if isa not in _DEPTHWISE_ELEMENTS:
        raise ValueError(f"no depthwise intrinsic for {isa!r}; expected one of {sorted(_DEPTHWISE_ELEMENTS)}")
    name = f"tvm_ternary_depthwise_{isa}"
    if TensorIntrin.get(name, allow_missing=True) is None:
        lanes = BLOCKS[isa].lanes
        impl = (_depthwise_vnni_impl(lanes, _VNNI_LLVM[isa]) if isa in _VNNI_LLVM
                else _depthwise_pmaddwd_impl(lanes, _PMADDWD_LLVM[isa]))
        TensorIntrin.register(name, _depthwise_desc(lanes, *_DEPTHWISE_ELEMENTS[isa]), impl)
    return name


def group_intrin_name(isa: str) -> str:
    """Register (once) and return the *group* intrinsic of a ternary form (``avx2t``...)."""
    if isa not in _TERNARY_PMADDWD_LLVM:
        raise ValueError(f"{isa!r} is not a ternary form; expected one of {sorted(_TERNARY_PMADDWD_LLVM)}")
    name = f"tvm_ternary_group_{isa}"
    if TensorIntrin.get(name, allow_missing=True) is None:
        blk = BLOCKS[isa]
        TensorIntrin.register(name, _ternary_group_desc(blk),
                              _ternary_group_impl(blk, _TERNARY_PMADDWD_LLVM[isa]))
    return name


def intrin_name(isa: str) -> str | None:
    """Register (once) and return the tensor-intrinsic name for ``isa``; ``None`` for plain."""
    if isa == "plain":
        return None
    if isa not in BLOCKS:
        raise ValueError(f"unknown ISA {isa!r}; expected one of {sorted(BLOCKS)}")
    name = f"tvm_ternary_dot_{isa}"
    if TensorIntrin.get(name, allow_missing=True) is None:
        blk = BLOCKS[isa]
        if isa in _PMADDUBSW_LLVM:  # a ternary form: this is its step; the group one too
            TensorIntrin.register(name, _ternary_step_desc(blk),
                                  _ternary_step_impl(blk, _PMADDUBSW_LLVM[isa]))
            group_intrin_name(isa)
            return name
        if isa in _VNNI_LLVM:
            impl = _vnni_impl(blk, _VNNI_LLVM[isa])
        else:
            impl = _pmaddwd_impl(blk, _PMADDWD_LLVM[isa])
        TensorIntrin.register(name, _desc(blk), impl)
    return name


def reference_desc(isa: str):
    """The TVMScript description of ``isa``'s block (what tests compare implementations to);
    for a ternary form, the description of its step."""
    if isa in _PMADDUBSW_LLVM:
        return _ternary_step_desc(BLOCKS[isa])
    return _desc(BLOCKS[isa])
