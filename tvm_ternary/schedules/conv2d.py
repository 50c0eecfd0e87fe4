"""Quantized NHWC conv2d kernels: entry point and the default (untuned) hand schedules.

Tiled schedule (every ISA but depthwise)::

    parallel for (oc_tile, n)                      # decode computed here: one weight tile in
      decode weights of the tile (int32 words)     #   L1/L2, reused by every pixel
      for oh, ow_tile:
        acc[ow_block, oc_tiles, lanes] = 0         # local -> vector registers
        for r, s, cb:                              # reduction
          for owi, kbi (unrolled): intrinsic(acc[owi, kbi], x[.., cb*depth:+depth], w[kbi, r, s, cb])
        epilogue(acc) -> y                         # fused, vectorised over lanes

Example::

    from tvm_ternary import tvm_adapter as ta
    from tvm_ternary.schedules import ConvSpec, conv2d_kernel
    spec = ConvSpec(batch=1, in_channels=64, height=56, width=56, out_channels=64,
                    kernel=3, padding=1, act="u8", out="u8", relu=True)
    func = conv2d_kernel(spec, target=ta.make_target("znver4"))
    mod = ta.build(func, target=ta.make_target("znver4"))
"""

from __future__ import annotations

from .. import tvm_adapter as ta
from . import amx
from .amx import AmxBlock, amx_blocks, amx_form, amx_rows
from .compute import (ConvParts, conv_compute, depthwise_compute, depthwise_pairs_compute,
                      depthwise_pairs_form, depthwise_vnni_compute, depthwise_vnni_form)
from .compute_ternary import ternary_conv_compute
from .intrin import depthwise_intrin_name, group_intrin_name, intrin_name
from .spec import ConvSpec, maddubs_form
from .tiling import Tiling, default_tiling


# Output pixels per depthwise register tile (the largest divisor of the output width up to it).
DEPTHWISE_OW_BLOCK = 8
# Output rows per band of the VNNI depthwise kernel (the largest divisor of the output height up
# to it): its input words are made per band, (rows - 1) * stride + R input rows, so a band
# re-makes R - stride rows of its neighbour's and stays in L2 (8 x 56 x 144 words: 0.3 MB).
DEPTHWISE_OH_BAND = 8


def _tag(func, isa: str):
    # Callers (Relax passes) need to know which argument list (kernel_arg_names) was built.
    return func.with_attr("tvm_ternary.isa", isa)


def _threads(target) -> int:
    cores = ta.as_target(target).attrs.get("num-cores", None)
    return int(cores) if cores else 1


def conv2d_kernel(spec: ConvSpec, *, target=None, schedule=True, isa: str | None = None,
                  tiling: Tiling | None = None):
    """A scheduled PrimFunc (no global symbol) computing ``spec``.

    ``schedule=False`` or ``"reference"``: the unscheduled ``plain`` compute, correct on any
    target (slow; the reference kernel a user can switch on).  ``isa`` overrides the choice made
    from the target's features; ``tiling`` overrides :func:`default_tiling` (and the AMX form:
    a vnni512 target with ``amx-int8`` gets :func:`_schedule_amx` where ``amx.amx_form`` says).  The returned
    function has attribute ``tvm_ternary.isa``: pass it to ``kernel_arg_names``.
    """
    if not isinstance(spec, ConvSpec):
        raise TypeError(f"spec must be a ConvSpec, got {type(spec).__name__}")
    if schedule in (False, "reference"):
        parts = depthwise_compute(spec) if spec.depthwise else conv_compute(spec, isa="plain")
        return _tag(ta.create_prim_func(parts.args), "plain")
    if schedule is not True and schedule != "default":
        raise ValueError(f"schedule must be True, 'default', False or 'reference': {schedule!r}")
    isa = isa or ta.choose_isa(target)
    if spec.depthwise and (depthwise_vnni_form(spec, isa) or depthwise_pairs_form(spec, isa)):
        vnni = depthwise_vnni_form(spec, isa)
        parts = depthwise_vnni_compute(spec, isa) if vnni else depthwise_pairs_compute(spec, isa)
        sch = ta.schedule_of(ta.create_prim_func(parts.args))
        _schedule_depthwise_words(sch, parts, depthwise_intrin_name(isa))
        # same argument list as the int32 depthwise kernel (no compensation): tagged alike
        return _tag(ta.scheduled_func(sch), "plain")
    if spec.depthwise:
        parts = depthwise_compute(spec)
        sch = ta.schedule_of(ta.create_prim_func(parts.args))
        _schedule_depthwise(sch, parts)
        return _tag(ta.scheduled_func(sch), "plain")
    if tiling is None and amx_form(spec, isa, target):
        parts = conv_compute(spec, isa=isa)
        sch = ta.schedule_of(ta.create_prim_func(parts.args))
        _schedule_amx(sch, parts, spec, rows=amx_rows(spec.out_width),
                      nk=amx_blocks(spec.out_channels))
        # the vnni512 kernel's arguments; the form is for the coverage report ("+ amx tiles")
        return _tag(ta.scheduled_func(sch), isa).with_attr("tvm_ternary.form", "amx")
    tiling = tiling or default_kernel_tiling(spec, isa=isa, target=target)
    kb_n = -(-spec.out_channels // _lanes(isa))
    if kb_n % tiling.oc_tiles:
        raise ValueError(f"oc_tiles={tiling.oc_tiles} must divide {kb_n} output blocks")
    acc_w = -(-spec.out_width // tiling.ow_block) * tiling.ow_block
    parts, func = tiled_workload(spec, isa=isa, acc_width=acc_w)
    sch = ta.schedule_of(func)
    schedule_tiled(sch, parts, isa=isa, ow_block=tiling.ow_block, oc_tiles=tiling.oc_tiles,
                   decode_at=tiling.decode_at)
    return _tag(ta.scheduled_func(sch), isa)


def default_kernel_tiling(spec: ConvSpec, *, isa: str, target) -> Tiling:
    """The untuned tiling :func:`conv2d_kernel` uses for ``spec`` on ``target``."""
    return default_tiling(spec, isa=isa, threads=_threads(target))


def tiled_workload(spec: ConvSpec, *, isa: str, acc_width: int):
    """``(parts, func)``: the *unscheduled* PrimFunc the tiled schedule starts from.

    This is the workload MetaSchedule keys tuning records on (its structural hash), so the
    tuner and :func:`conv2d_kernel` must both build it here.  ``acc_width`` is part of the
    workload (the padded accumulator width): a tuned ``ow_block`` must divide it.
    """
    if maddubs_form(spec, isa):
        parts = ternary_conv_compute(spec, isa=isa, acc_width=acc_width)
    else:
        parts = conv_compute(spec, isa=isa, acc_width=acc_width)
    return parts, ta.create_prim_func(parts.args)


def schedule_tiled(sch, parts: ConvParts, *, isa: str, ow_block, oc_tiles, decode_at: str) -> None:
    """Apply the tiled schedule to ``sch`` (a schedule over :func:`tiled_workload`'s function).

    ``ow_block`` / ``oc_tiles`` may be ints or MetaSchedule random variables (e.g. from
    ``sch.sample_categorical``): split factors given as random variables are replayed with new
    decisions by the tuner, so one trace covers every value.  ``decode_at`` changes the loop
    structure, so it must be a plain string (a tuner makes one design space per value).
    """
    if decode_at not in ("tile", "root"):
        raise ValueError(f"decode_at must be 'tile' or 'root', got {decode_at!r}")
    if parts.form is not None:
        _schedule_ternary(sch, parts, ow_block=ow_block, oc_tiles=oc_tiles, decode_at=decode_at)
        return
    _schedule_tiled(sch, parts, isa=isa, ow_block=ow_block, oc_tiles=oc_tiles, decode_at=decode_at)


def _lanes(isa: str) -> int:
    from .intrin import BLOCKS

    return BLOCKS[isa].lanes  # the ternary forms keep their ISA's lane count


def _vectorize_inner(sch, block, width: int) -> None:
    """Vectorise the innermost loop of ``block``, split to ``width`` when it is longer."""
    loop = sch.get_loops(block)[-1]
    ext = sch.get(loop).extent
    if not hasattr(ext, "value"):
        return
    if ext.value > width and ext.value % width == 0:
        loop = sch.split(loop, [None, width])[-1]
    elif ext.value > width:
        return
    sch.vectorize(loop)


def _vectorize_epilogue(sch, epi, lanes: int, *, guarded: bool = False) -> None:
    """The epilogue of a register tile: output channels in blocks of ``lanes`` outermost, the
    tile's pixels inside, the channel lanes vectorised: the per-channel parameters (bias,
    multiplier, shift and the rounding terms made from it) are then invariant over the pixel
    loop, and LLVM hoists them out of it instead of reloading and re-widening them per pixel.
    Without ``guarded`` only where the channels are a multiple of ``lanes`` (else the inner
    loop alone is vectorised); ``guarded`` splits any channel count, the last block guarded
    (the AMX form: SqueezeNet's conv10, K = 1000, keeps a vectorised epilogue)."""
    ow, k = sch.get_loops(epi)[-2:]
    ext = sch.get(k).extent
    if guarded or (hasattr(ext, "value") and ext.value > lanes and ext.value % lanes == 0):
        ko, ki = sch.split(k, [None, lanes])
        sch.reorder(ko, ow, ki)
        sch.vectorize(ki)
        return
    _vectorize_inner(sch, epi, lanes)


def _place_decode_and_pad(sch, parts: ConvParts, anchor, lanes: int) -> None:
    """The weight decode per parallel task (at ``anchor``; None: once at the root, in parallel)
    and the padded input stage (parallel over (n, h), vectorised by 64 bytes), when present."""
    if parts.decoded:  # (the codes come in the kernel's layout: no codes_t stage)
        stage = sch.get_sblock("decode")
        if anchor is not None:
            sch.compute_at(stage, anchor, preserve_unit_loops=True)
        else:
            sch.parallel(sch.get_loops(stage)[0])
        _vectorize_inner(sch, stage, lanes)
    if parts.has_pad:
        pad = sch.get_sblock("pad")
        loops = sch.get_loops(pad)
        sch.parallel(sch.fuse(loops[0], loops[1]))
        _vectorize_inner(sch, pad, 64)


def _register_tile(sch, ow_block, oc_tiles, *, reduction_inside: bool):
    """The register tile both conv schedules start from: ``ow_block`` output pixels x
    ``oc_tiles`` output blocks under ``(kb tile, n, oh, pixel tile)``, the epilogue computed per
    pixel tile. ``reduction_inside``: the tile's loops outside the reduction (r, s, cb), as one
    AMX intrinsic call takes the whole reduction; else the reduction outside the tile (the
    vector kernels' accumulators stay in registers across it). Returns ``(conv, epilogue,
    (kbo, n, oh, owi, kbi, ki, r, cl))``."""
    conv = sch.get_sblock("conv")
    n, oh, ow, kb, ki, r, s, cb, cl = sch.get_loops(conv)
    owo, owi = sch.split(ow, [None, ow_block])
    kbo, kbi = sch.split(kb, [None, oc_tiles])
    tile, reduction = [owi, kbi, ki], [r, s, cb]
    inner = tile + reduction if reduction_inside else reduction + tile
    sch.reorder(kbo, n, oh, owo, *inner, cl)
    epi = sch.get_sblock("y")
    sch.reverse_compute_at(epi, owo, preserve_unit_loops=True)
    return conv, epi, (kbo, n, oh, owi, kbi, ki, r, cl)


def _schedule_amx(sch, parts: ConvParts, spec: ConvSpec, *, rows: int, nk: int) -> None:
    """The AMX form (schedules/amx.py) of the ``conv_compute(spec, isa="vnni512")`` workload::

        parallel for (kb tile of nk blocks, n):  decode the tile's weights (int32 words)
          for oh, owo (rows pixels):
            amx block: acc = the whole reduction (r, s, 64-channel tiles), in tile registers
              (the conv block's init is part of the intrinsic: tilezero)
            epilogue(acc) -> y
    """
    _, epi, (kbo, n, _, owi, *_) = _register_tile(sch, rows, nk, reduction_inside=True)
    par = sch.fuse(kbo, n)
    sch.parallel(par)
    _place_decode_and_pad(sch, parts, par, parts.block.lanes)
    _vectorize_epilogue(sch, epi, parts.block.lanes, guarded=True)
    blk = AmxBlock(rows, nk, spec.kernel[0], spec.kernel[1], spec.in_channels // amx.DEPTH,
                   padded=parts.has_pad, stride=spec.stride[1])
    sch.tensorize(owi, amx.intrin_name(blk))


def _schedule_tiled(sch, parts: ConvParts, *, isa: str, ow_block, oc_tiles, decode_at: str) -> None:
    blk = parts.block
    conv, epi, (kbo, n, oh, owi, kbi, ki, r, cl) = _register_tile(sch, ow_block, oc_tiles, reduction_inside=False)
    if decode_at == "tile":
        par = sch.fuse(kbo, n)
        anchor = par
    else:
        par = sch.fuse(kbo, n, oh)
        anchor = None
    sch.parallel(par)
    _place_decode_and_pad(sch, parts, anchor, blk.lanes)
    _vectorize_epilogue(sch, epi, blk.lanes)
    sch.unroll(owi)
    sch.unroll(kbi)
    name = intrin_name(isa) if parts.tensorizable else None
    if name is None:
        # no intrinsic: output lanes innermost so LLVM vectorises over ki (vectorize must
        # precede decompose_reduction)
        sch.reorder(cl, ki)
        sch.vectorize(ki)
    init = sch.decompose_reduction(conv, r)
    sch.vectorize(sch.get_loops(init)[-1])
    if name is not None:
        sch.tensorize(ki, name)


def _place_weight_stages(sch, par, decode_at: str, lanes: int) -> None:
    """decode + codes_t per (oc tile, image) inside the parallel loop, or once at the root."""
    for name in ("decode", "codes_t"):  # decode first: codes_t then lands before it
        stage = sch.get_sblock(name)
        if decode_at == "tile":
            sch.compute_at(stage, par, preserve_unit_loops=True)
        else:
            sch.parallel(sch.get_loops(stage)[0])
        _vectorize_inner(sch, stage, lanes)


def _schedule_ternary(sch, parts: ConvParts, *, ow_block, oc_tiles, decode_at: str) -> None:
    """The ternary vpmaddubsw kernel (compute_ternary): the register tile of ``conv`` (int32)
    and, per chunk, of ``acc16`` (int16) over the same (ow, kb) cells::

        for r, s, co (chunk; cluster: co only):
          acc16[owi, kbi] = 0
          for steps of the chunk (cbi; cluster: r, s, cbi):
            for owi, kbi: acc16 += vpmaddubsw(x bytes, t)          # step intrinsic
          for owi, kbi: acc[owi, kbi] += vpmaddwd(acc16, codes)    # group intrinsic
    """
    n_chunk = 1 if parts.chunks.rs_inside else 3
    conv = sch.get_sblock("conv")
    n, oh, ow, kb, ki, *rest = sch.get_loops(conv)
    chunk, h = rest[:n_chunk], rest[n_chunk]
    owo, owi = sch.split(ow, [None, ow_block])
    kbo, kbi = sch.split(kb, [None, oc_tiles])
    sch.reorder(kbo, n, oh, owo, *chunk, owi, kbi, ki, h)
    epi = sch.get_sblock("y")
    sch.reverse_compute_at(epi, owo, preserve_unit_loops=True)
    par = sch.fuse(kbo, n) if decode_at == "tile" else sch.fuse(kbo, n, oh)
    sch.parallel(par)
    acc16 = sch.get_sblock("acc16")
    sch.compute_at(acc16, chunk[-1], preserve_unit_loops=True)
    _place_weight_stages(sch, par, decode_at, parts.block.lanes)
    if parts.has_pad:
        pad = sch.get_sblock("pad")
        loops = sch.get_loops(pad)
        sch.parallel(sch.fuse(loops[0], loops[1]))
        _vectorize_inner(sch, pad, 64)
    _vectorize_epilogue(sch, epi, parts.block.lanes)

    loops = sch.get_loops(acc16)
    depth = len(sch.get_loops(conv)) - 4  # conv's loops down to chunk[-1] (then owi kbi ki h)
    inner = loops[depth:]
    # spatial loops under the chunk: n oh ow kb [chunk..] ki h (unit ones kept), then reductions
    n_sp = 4 + n_chunk + 2
    sp, red = inner[:n_sp], inner[n_sp:]
    a_ow, a_kb, a_ki, a_h = sp[2], sp[3], sp[-2], sp[-1]
    *steps, a_j = red
    sch.reorder(*steps, a_ow, a_kb, a_ki, a_h, a_j)
    sch.unroll(a_ow)
    sch.unroll(a_kb)
    init16 = sch.decompose_reduction(acc16, steps[0])
    il = sch.get_loops(init16)
    sch.vectorize(sch.fuse(il[-2], il[-1]))
    sch.tensorize(a_ki, intrin_name(parts.form))

    sch.unroll(owi)
    sch.unroll(kbi)
    init = sch.decompose_reduction(conv, chunk[0])
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(ki, group_intrin_name(parts.form))


def _schedule_depthwise(sch, parts: ConvParts) -> None:
    """Depthwise: 16 channels (one int32 zmm) x up to 8 output pixels of one row per register
    tile; the padding is inlined into the taps (bounds tests on h/w only, uniform over the
    channel vector) instead of a padded int16 copy of the whole input: 1.3-2.4x faster on
    MobileNetV2's depthwise layers (stride 2 gains most: it read the copy at 1/4 density)."""
    conv = sch.get_sblock("conv")
    n, oh, ow, k, r, s = sch.get_loops(conv)
    width = sch.get(ow).extent.value
    ow_block = max(d for d in range(1, DEPTHWISE_OW_BLOCK + 1) if width % d == 0)
    ko, ki = sch.split(k, [None, 16])
    owo, owi = sch.split(ow, [None, ow_block])
    sch.reorder(n, oh, ko, owo, r, s, owi, ki)
    sch.set_scope(conv, 0, "local")
    epi = sch.get_sblock("y")
    sch.reverse_compute_at(epi, owo, preserve_unit_loops=True)
    sch.parallel(sch.fuse(n, oh))
    dec = sch.get_sblock("decode")
    _vectorize_inner(sch, dec, 16)
    sch.compute_inline(sch.get_sblock("pad"))
    _vectorize_inner(sch, epi, 16)
    sch.unroll(owi)
    sch.vectorize(ki)  # before decompose_reduction (TVM 0.27 refuses it after)
    init = sch.decompose_reduction(conv, r)
    sch.vectorize(sch.get_loops(init)[-1])


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _schedule_depthwise_words(sch, parts: ConvParts, intrin: str) -> None:
    """The word depthwise kernels (compute.depthwise_vnni_compute, one vpdpbusd per row;
    compute.depthwise_pairs_compute, one vpmaddwd per two taps of a row: reduction loops r, p)::

        parallel for (n, band of output rows, channel block):
          words of the band's input rows (pad inlined, the block's channels vectorised)
          for oh in band, ow tile:
            acc[ow tile, lanes] = 0                      # vector registers
            for r (, p): for owi (unrolled): acc[owi] += dot(words[.., owi, lanes], w[r, lanes])
            epilogue(acc) -> y
    """
    lanes = parts.block.lanes
    conv = sch.get_sblock("conv")
    n, oh, ow, k, *red, cl = sch.get_loops(conv)
    oh_n, ow_n = sch.get(oh).extent.value, sch.get(ow).extent.value
    oho, ohi = sch.split(oh, [None, _largest_divisor(oh_n, DEPTHWISE_OH_BAND)])
    owo, owi = sch.split(ow, [None, _largest_divisor(ow_n, DEPTHWISE_OW_BLOCK)])
    ko, ki = sch.split(k, [None, lanes])
    sch.reorder(n, oho, ko, ohi, owo, *red, owi, ki, cl)
    epi = sch.get_sblock("y")
    sch.reverse_compute_at(epi, owo, preserve_unit_loops=True)
    par = sch.fuse(n, oho, ko)  # bands x channel blocks: work for every thread on 7x7 maps too
    sch.parallel(par)
    sch.compute_inline(sch.get_sblock("pad"))
    words = sch.get_sblock("words")
    sch.compute_at(words, par, preserve_unit_loops=True)
    _vectorize_inner(sch, words, lanes)
    _vectorize_inner(sch, sch.get_sblock("decode"), lanes)
    _vectorize_inner(sch, epi, lanes)
    sch.unroll(owi)
    init = sch.decompose_reduction(conv, red[0])
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(ki, intrin)
