"""TE compute definitions of the quantized conv2d / dense kernels (NHWC, channels innermost).

Stages (names are what the schedules look blocks up by):

- ``pad``:    ``xp[n, h, w, g, c]`` the padded activations, per group, channels rounded up to the
              intrinsic depth; on VNNI signed inputs are shifted by +128 here (pad value 128, the
              shifted zero), on the int16 ISAs they are widened here.  Skipped when not needed.
- ``decode``: ``wd[kb, r, s, cb, ki]`` int32 words of ``depth`` int8/int16 weights ``q_g * v`` (the intrinsic's
              block layout (``ki`` output lanes x ``cl`` reduction depth contiguous).
- ``conv``:   ``acc[n, oh, ow, kb, ki]`` int32 accumulators over (r, s, cb, cl).
- ``y``:       ``y[n, oh, ow, k]`` (the epilogue): + bias, then requantize or dequantize, ReLU, residual.

Example::

    parts = conv_compute(spec, isa="vnni512")
    func = tvm_adapter.create_prim_func(parts.args)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tvm import te

from .. import tvm_adapter as ta
from .epilogue import epilogue_value
from .intrin import BLOCKS, Block
from .spec import ACT_DTYPES, OUT_DTYPES, ConvSpec, kernel_arg_names, needs_compensation


@dataclass(frozen=True)
class ConvParts:
    """The TE tensors of one kernel; ``args`` is the PrimFunc signature, in order."""

    args: tuple
    block: Block
    has_pad: bool
    tensorizable: bool  # one group per output block: the intrinsic's A operand is block-uniform
    form: str | None = None  # "avx2t" / "avx512t": the ternary vpmaddubsw kernel (compute_ternary)
    chunks: object = None  # its compute_ternary.ChunkPlan
    decoded: bool = True  # False: no ``decode`` stage, the codes scale the accumulator instead


def _pad_stage(spec: ConvSpec, x_at, blk: Block, shift: bool, acc_width: int):
    n_, cg = spec.batch, spec.cin_per_group
    pt, pl, pb, pr = spec.padding
    hp, wp = spec.height + pt + pb, spec.width + pl + pr
    # columns read by the padded accumulator width (garbage pixels the epilogue drops)
    wp = max(wp, (acc_width - 1) * spec.stride[1] + (spec.kernel[1] - 1) * spec.dilation[1] + 1)
    cp = -(-cg // blk.depth) * blk.depth
    # The value a padded element must have so that it contributes 0 once the bias has paid the
    # offsets back: the zero point (imported models), plus 128 after the shift.
    pad_val = ta.const(spec.x_zero_point + (128 if shift else 0), blk.a_dtype)

    def fn(n, h, w, g, c):
        inside = te.all(h >= pt, h < pt + spec.height, w >= pl, w < pl + spec.width, c < cg)
        v = x_at(n, h - pt, w - pl, g * cg + c)
        if shift:
            v = (v.astype("int16") + 128).astype("uint8")
        else:
            v = v.astype(blk.a_dtype)
        return ta.if_then_else(inside, v, pad_val)

    return te.compute((n_, hp, wp, spec.groups, cp), fn, name="pad")


def input_stage(spec: ConvSpec, blk: Block, shift: bool, acc_width: int):
    """``(x, a_at, has_pad)``: the input placeholder and the activation ``a_at(n, h, w, g, c)``
    the reduction reads: ``x`` itself, or a padded stage where the block needs one (padding,
    the +128 shift, another element type, channels not a multiple of the block depth, a
    widened accumulator)."""
    x = te.placeholder(spec.x_shape, ACT_DTYPES[spec.act], name="x")
    if spec.dense:
        def x_at(n, h, w, c):
            return x[w, c]
    else:
        def x_at(n, h, w, c):
            return x[n, h, w, c]

    cg = spec.cin_per_group
    has_pad = (any(spec.padding) or shift or blk.a_dtype != ACT_DTYPES[spec.act]
               or cg % blk.depth != 0 or acc_width != spec.out_width)
    if has_pad:
        xp = _pad_stage(spec, x_at, blk, shift, acc_width)

        def a_at(n, h, w, g, c):
            return xp[n, h, w, g, c]
    else:
        def a_at(n, h, w, g, c):
            return x_at(n, h, w, g * cg + c)
    return x, a_at, has_pad


def _decode_stage(spec: ConvSpec, weights, codes, blk: Block):
    """Weights ``q_g * v`` as int32 words, one per (output lane, intrinsic depth) block.

    ``wd[kb, r, s, cb, ki]`` packs the ``depth`` weights of output ``kb*lanes + ki`` at inputs
    ``cb*depth + j`` (j = 0..depth-1) into byte (int16 half) j.  Computing whole words lets the
    decode vectorise over ki with contiguous loads of the packed bytes and of the codes, which
    come in the layout ``[kb, r, s, g, ki]`` (:func:`block_codes_shape`, made at compile time by
    ``params.kernel_codes``); an int8 [ki, j] layout would need a per-byte gather.
    """
    k_, cg, (r_, s_) = spec.out_channels, spec.cin_per_group, spec.kernel
    ob, depth, n_grp = blk.lanes, blk.depth, spec.group_size
    kb_n, cb_n, bits = -(-k_ // ob), -(-cg // depth), 32 // depth
    i32 = lambda v: ta.const(v, "int32")  # noqa: E731

    ternary = spec.weight_bits == 2
    if ternary and depth == 4 and n_grp % 4 == 0 and cg % 4 == 0:
        return te.compute((kb_n, r_, s_, cb_n, ob), _ternary_words(spec, weights, codes, ob), name="decode")

    def fn(kb, r, s, cb, ki):
        k, c0 = kb * ob + ki, cb * depth
        # One source element per output lane: the packed byte of 4 codes (2-bit; padding has
        # code 1, so no bounds tests), or the int32 word of 4 int8 values (4/8-bit).
        src = weights[spec.weight_index(k // 16, c0 // 4, r, s, k % 16)].astype("int32")
        if depth == 2:
            # The odd half of the 4-element source.  A constant shift under a select whose
            # condition is an index: an index expression inside the data arithmetic (or a
            # comparison of data) is widened to int64 by index_dtype_override.
            src = ta.select(cb % 2 == 1, src >> i32(4 if ternary else 16), src)
        word = None
        for j in range(depth):
            q = codes[kb, r, s, te.min(c0 + j, cg - 1) // n_grp, ki].astype("int32")
            if ternary:
                v = ((src >> i32(2 * j)) & i32(3)) - i32(1)  # t = code - 1
            else:  # sign-extend byte j
                v = (src << i32(24 - 8 * j)) >> i32(24)
            # |q * v| <= 127 by the number-format contract: no int32 overflow (TVM emits nsw)
            term = ((q * v) & i32((1 << bits) - 1)) << i32(bits * j)
            word = term if word is None else word | term
        return word

    return te.compute((kb_n, r_, s_, cb_n, ob), fn, name="decode")


def _ternary_words(spec: ConvSpec, weights, codes, lanes: int):
    """The decode of :func:`_decode_stage` for 4-byte words whose 4 weights share one group code
    ``q`` (N a multiple of 4, C too): bytes ``q * t_j`` with ``t_j = c_j - 1`` the 2-bit codes
    ``c_j`` of the packed byte. In uint32 words (wrapping, no carry between bytes by the bounds):

        spread = sum_j c_j << 8j                   (each byte 0..2)
        word   = q * spread  (+)  (-q & 255) * 0x01010101

    with ``(+)`` a bytewise add mod 256 (SWAR: the low 7 bits added, the top bit xor-ed), since
    ``q * t_j = q * c_j - q``. One code load and two multiplies a word instead of four each
    (the decode is about a sixth of a 7x7 layer's call; docs/KERNELS.md, stop 26)."""
    u32 = lambda v: ta.const(v, "uint32")  # noqa: E731
    low7, top = u32(0x7F7F7F7F), u32(0x80808080)
    group_size = spec.group_size

    def fn(kb, r, s, cb, ki):
        k, c0 = kb * lanes + ki, cb * 4
        src = weights[spec.weight_index(k // 16, c0 // 4, r, s, k % 16)].astype("uint32")
        spread = ((src & u32(3)) | ((src & u32(0xC)) << u32(6)) | ((src & u32(0x30)) << u32(12))
                  | ((src & u32(0xC0)) << u32(18)))
        q = codes[kb, r, s, c0 // group_size, ki].astype("uint32")
        a = q * spread  # bytes q * c_j <= 254: no carry
        b = ((u32(256) - q) & u32(255)) * u32(0x01010101)  # bytes -q mod 256
        word = ((a & low7) + (b & low7)) ^ ((a ^ b) & top)
        return word.astype("int32")

    return fn


def block_codes_shape(spec: ConvSpec, blk: Block) -> tuple:
    """Shape of the ``codes`` argument of the int16 / VNNI / plain kernels: uint8
    ``[ceil(K / lanes), R, S, G, lanes]``, the group codes of each output block contiguous over
    its lanes (``params.kernel_codes`` transposes ``[K, G, R, S]`` into it at compile time; the
    kernels gathered it per call before: a scalar byte gather of K*G*R*S codes)."""
    r, s = spec.kernel
    return (-(-spec.out_channels // blk.lanes), r, s, spec.n_groups_q, blk.lanes)


def codes_in_epilogue(spec: ConvSpec, isa: str) -> bool:
    """Whether ``spec``'s kernel skips the weight decode on ``isa``: a conv / dense with 4-, 7- or
    8-bit weights and one group code per output channel (``n_groups_q == 1``, and for a kernel
    wider than 1x1 the ``cluster`` grouping: the same code at every (r, s)), on vnni512.  Its
    blocked weight words ``v`` (``layout.block_weights``: 4 signed bytes, 16 output lanes) are
    already the ``vpdpbusd`` operand, and ``sum x * q * v = q * sum x * v`` exactly in integers,
    so the kernel multiplies the accumulator by ``q[k]`` before the epilogue instead of decoding
    K*C*R*S/4 words per call (what dominated the batch-1 GEMV of a classifier: every weight is
    used once; and :func:`unpacked_spec`'s small maps)."""
    return (isa == "vnni512" and spec.weight_bits != 2 and spec.n_groups_q == 1
            and (spec.kernel == (1, 1) or spec.grouping == "cluster") and spec.groups == 1)


# Most output pixels (OH x OW per image) of a ternary conv whose weights the compiler stores
# unpacked on vnni512 (unpacked_spec). Zen 4, 1 thread, warm caches, bench_kernels' ResNet-50
# layers: 3x3 512->512 at 7x7 0.616 -> 0.513 ms unpacked; at 14x14 (256->256, not unpacked:
# 4x the library bytes for 5%) 0.538 -> 0.513.
UNPACK_MAX_PIXELS = 49


def unpacked_spec(spec: ConvSpec, isa: str) -> ConvSpec | None:
    """The 8-bit spec a ternary ``spec`` runs as on ``isa`` when its packed weights are not worth
    their per-call decode, else None.

    A kernel decodes its 2-bit codes and group codes into ``q_g * t`` words on every call; on a
    small map (at most :data:`UNPACK_MAX_PIXELS` output pixels) each decoded word is used by few
    pixels and the decode is a sixth of the call.  There the compiler stores the words
    themselves (``IntegerWeights.decode_int8``: int8 ``q_g * t`` in [-127, 127], 4x the packed
    bytes) as an 8-bit layer with one code of 1 per output channel, which :func:`codes_in_epilogue`
    runs without a decode. The integers are the same, so the kernel is bit-exact with the packed
    one. Only 3x3 and wider kernels: a 1x1 layer gained 3-6% standalone on a Zen 4, and nothing
    measurable end to end on an AMX Xeon, where its 4x larger weights came from L3 on every call
    (docs/KERNELS.md, stop 26).
    """
    if (isa != "vnni512" or spec.weight_bits != 2 or spec.groups != 1 or spec.dense
            or spec.kernel == (1, 1) or spec.out_height * spec.out_width > UNPACK_MAX_PIXELS):
        return None
    return replace(spec, weight_bits=8, group_size=spec.cin_per_group, grouping="cluster")


def weight_at(wd, blk: Block, kb, r, s, cb, ki, cl, word=None):
    """The weight of reduction lane ``cl`` from a decoded word (mirrors the intrinsic desc);
    ``word`` overrides ``wd[kb, r, s, cb, ki]``."""
    bits = 32 // blk.depth
    word = wd[kb, r, s, cb, ki] if word is None else word
    # int64 shift: the form create_prim_func(index_dtype_override="int64") produces anyway,
    # spelled out so that it matches the intrinsic description structurally.
    return (word.astype("int64") >> (cl * bits)).astype(blk.b_dtype).astype("int32")


def conv_compute(spec: ConvSpec, *, isa: str, acc_width: int | None = None) -> ConvParts:
    """TE tensors for ``spec`` using ``isa``'s block (``plain`` works on any target).

    ``acc_width`` >= OW pads the accumulator's W so that a register tile divides it.
    """
    acc_width = acc_width or spec.out_width
    blk = BLOCKS[isa]
    if isa == "plain":
        blk = Block(blk.lanes, blk.depth, ACT_DTYPES[spec.act], "int8")
    shift = needs_compensation(spec, isa)
    x, a_at, has_pad = input_stage(spec, blk, shift, acc_width)
    weights = te.placeholder(spec.weight_shape, "uint8" if spec.weight_bits == 2 else "int32",
                             name="weights")
    codes = te.placeholder(block_codes_shape(spec, blk), "uint8", name="codes")

    cg, kg, k_ = spec.cin_per_group, spec.cout_per_group, spec.out_channels
    ob, depth = blk.lanes, blk.depth
    (r_, s_), (sh, sw), (dh, dw) = spec.kernel, spec.stride, spec.dilation

    decoded = not codes_in_epilogue(spec, isa)
    if decoded:
        wd = _decode_stage(spec, weights, codes, blk)

        def word_at(kb, r, s, cb, ki):
            return wd[kb, r, s, cb, ki]
    else:
        def word_at(kb, r, s, cb, ki):  # the blocked words (lanes == 16)
            return weights[spec.weight_index(kb, cb, r, s, ki)]
    tensorizable = spec.groups == 1 or kg % ob == 0

    def group_of(kb, ki):
        if spec.groups == 1:
            return 0
        if tensorizable:  # write it so that the index is visibly independent of ki
            return kb // (kg // ob)
        return (kb * ob + ki) // kg

    r = te.reduce_axis((0, r_), name="r")
    s = te.reduce_axis((0, s_), name="s")
    cb = te.reduce_axis((0, -(-cg // depth)), name="cb")
    cl = te.reduce_axis((0, depth), name="cl")
    acc_shape = (spec.batch, spec.out_height, acc_width, -(-k_ // ob), ob)
    acc = te.compute(
        acc_shape,
        lambda n, oh, ow, kb, ki: te.sum(
            a_at(n, oh * sh + r * dh, ow * sw + s * dw, group_of(kb, ki), cb * depth + cl)
            .astype("int32") * weight_at(None, blk, kb, r, s, cb, ki, cl,
                                         word=word_at(kb, r, s, cb, ki)),
            axis=[r, s, cb, cl],
        ),
        name="conv",
    )
    if decoded:
        def acc_at(n, oh, ow, k):
            return acc[n, oh, ow, k // ob, k % ob]
    else:
        def acc_at(n, oh, ow, k):  # q * sum x * v: |q * v| <= 127, so no int32 overflow
            return acc[n, oh, ow, k // ob, k % ob] * codes[k // ob, 0, 0, 0, k % ob].astype("int32")
    args, y = _epilogue_stage(spec, isa, acc_at)
    return ConvParts((x, weights, codes, *args, y), blk, has_pad, tensorizable, decoded=decoded)


def _epilogue_stage(spec: ConvSpec, isa: str, acc_at):
    """Placeholders for the epilogue parameters (in ``kernel_arg_names`` order) and ``y``.

    ``acc_at(n, oh, ow, k)`` reads the int32 accumulator of output channel k.
    """
    k_ = spec.out_channels
    names = kernel_arg_names(spec, isa)[3:-1]
    dtypes = {"bias": "int32", "residual_scale": "float32", "requant_scale": "float32", "scale": "float32", "float_bias": "float32"}
    ph = {}
    for name in names:
        if name == "residual":
            ph[name] = te.placeholder(spec.out_shape, ACT_DTYPES[spec.residual], name=name)
        else:
            ph[name] = te.placeholder((k_,), dtypes[name], name=name)

    def fn(*idx):
        k = idx[-1]
        a = acc_at(0, 0, idx[0], k) if spec.dense else acc_at(idx[0], idx[1], idx[2], k)
        res = ph["residual"][idx] if "residual" in ph else None
        return epilogue_value(spec, a, k, ph, res)

    y = te.compute(spec.out_shape, fn, name="y")  # block "y" is the fused epilogue
    return [ph[n] for n in names], y


def _depthwise_inputs(spec: ConvSpec, pad_dtype: str):
    """The placeholders of both depthwise kernels and the padded input in ``pad_dtype`` (the
    border holds the input zero point): ``(x, weights, codes, xp)``."""
    x = te.placeholder(spec.x_shape, ACT_DTYPES[spec.act], name="x")
    weights = te.placeholder(spec.weight_shape, "uint8" if spec.weight_bits == 2 else "int32",
                             name="weights")
    codes = te.placeholder(spec.codes_shape, "uint8", name="codes")
    pt, pl, pb, pr = spec.padding

    def pad_fn(n, h, w, c):
        inside = te.all(h >= pt, h < pt + spec.height, w >= pl, w < pl + spec.width)
        return ta.if_then_else(inside, x[n, h - pt, w - pl, c].astype(pad_dtype),
                               ta.const(spec.x_zero_point, pad_dtype))

    xp = te.compute((spec.batch, spec.height + pt + pb, spec.width + pl + pr, spec.out_channels),
                    pad_fn, name="pad")
    return x, weights, codes, xp


def _depthwise_tap(spec: ConvSpec, weights, codes, r, s, k):
    """``q * v`` of tap (r, s) of channel k, int32: the 2-bit code or byte 0 of the block's
    int32 word (input channel 0), sign-extended, times the channel's group code."""
    qv = codes[k, 0, r, s].astype("int32")
    w = weights[spec.weight_index(k // 16, 0, r, s, k % 16)]
    if spec.weight_bits == 2:
        return qv * ((w & ta.const(3, "uint8")).astype("int32") - ta.const(1, "int32"))
    return qv * ((w << ta.const(24, "int32")) >> ta.const(24, "int32"))


def depthwise_compute(spec: ConvSpec) -> ConvParts:
    """Depthwise conv (one input and one output channel per group): plain int32 math over k."""
    blk = Block(16, 1, "int16", "int16")
    x, weights, codes, xp = _depthwise_inputs(spec, "int16")
    k_, (r_, s_) = spec.out_channels, spec.kernel
    (sh, sw), (dh, dw) = spec.stride, spec.dilation

    wd = te.compute((r_, s_, k_),
                    lambda r, s, k: _depthwise_tap(spec, weights, codes, r, s, k).astype("int16"),
                    name="decode")
    r = te.reduce_axis((0, r_), name="r")
    s = te.reduce_axis((0, s_), name="s")
    acc = te.compute(
        (spec.batch, spec.out_height, spec.out_width, k_),
        lambda n, oh, ow, k: te.sum(
            xp[n, oh * sh + r * dh, ow * sw + s * dw, k].astype("int32")
            * wd[r, s, k].astype("int32"), axis=[r, s]),
        name="conv",
    )
    args, y = _epilogue_stage(spec, "plain", lambda n, oh, ow, k: acc[n, oh, ow, k])
    return ConvParts((x, weights, codes, *args, y), blk, True, False)


def depthwise_vnni_form(spec: ConvSpec, isa: str) -> bool:
    """Whether ``spec`` runs the VNNI depthwise kernel (:func:`depthwise_vnni_compute`) on
    ``isa``: a VNNI ISA, unsigned activations (``vpdpbusd`` multiplies u8 by s8; signed ones
    would need the +128 shift and its bias term), a kernel row of at most 4 taps (one word), and
    whole channel blocks.  Otherwise :func:`depthwise_compute`'s int32 kernel."""
    return (spec.depthwise and isa in ("vnni512", "avxvnni") and spec.act in ("u8", "u4")
            and spec.kernel[1] <= 4 and spec.out_channels % BLOCKS[isa].lanes == 0)


def depthwise_vnni_compute(spec: ConvSpec, isa: str) -> ConvParts:
    """Depthwise conv as one ``vpdpbusd`` per kernel row: the S taps of a row are bytes of one
    word per (row, output pixel, channel) (stage ``words``, made from the padded input), the
    S weights of the row bytes of one word per (row, channel) (stage ``decode``), and a lane
    accumulates their 4-byte dot product (``intrin.depthwise_intrin_name``): R instructions per
    output vector instead of R*S widen-multiply-adds.  Same arguments as
    :func:`depthwise_compute`.  Exact: bytes past S are 0 in both words, |q*v| <= 127 (s8) by
    the number-format contract, u8 activations."""
    if not depthwise_vnni_form(spec, isa):
        raise ValueError(f"no VNNI depthwise kernel for {spec} on {isa!r}")
    blk = BLOCKS[isa]
    x, weights, codes, xp = _depthwise_inputs(spec, "uint8")
    k_, (r_, s_) = spec.out_channels, spec.kernel
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    hp = spec.height + spec.padding[0] + spec.padding[2]  # the padded rows the words cover
    i32 = lambda v: ta.const(v, "int32")  # noqa: E731

    def words_fn(n, h, ow, c):
        word = None
        for j in range(s_):
            b = xp[n, h, ow * sw + j * dw, c].astype("int32") << i32(8 * j)
            word = b if word is None else word | b
        return word

    xw = te.compute((spec.batch, hp, spec.out_width, k_), words_fn, name="words")

    def dec_fn(r, k):
        word = None
        for j in range(s_):
            b = (_depthwise_tap(spec, weights, codes, r, j, k) & i32(255)) << i32(8 * j)
            word = b if word is None else word | b
        return word

    wd = te.compute((r_, k_), dec_fn, name="decode")
    r = te.reduce_axis((0, r_), name="r")
    cl = te.reduce_axis((0, 4), name="cl")
    acc = te.compute(
        (spec.batch, spec.out_height, spec.out_width, k_),
        lambda n, oh, ow, k: te.sum(
            (xw[n, oh * sh + r * dh, ow, k].astype("int64") >> (cl * 8)).astype("uint8").astype("int32")
            * (wd[r, k].astype("int64") >> (cl * 8)).astype("int8").astype("int32"),
            axis=[r, cl]),
        name="conv",
    )
    args, y = _epilogue_stage(spec, "plain", lambda n, oh, ow, k: acc[n, oh, ow, k])
    return ConvParts((x, weights, codes, *args, y), blk, True, True, form=f"depthwise_{isa}")


def depthwise_pairs_form(spec: ConvSpec, isa: str) -> bool:
    """Whether ``spec`` runs the int16-pair depthwise kernel (:func:`depthwise_pairs_compute`)
    on ``isa``: avx2 / avx512 (no VNNI), unsigned activations, whole channel blocks, stride 1;
    any kernel width.  Otherwise :func:`depthwise_compute`'s int32 kernel.  Stride 2 stays on
    the int32 kernel: a band's words cover twice the rows and columns per output there, and
    making them cost more than the multiplies saved (Zen 3, MobileNetV2's 96@112 s2 0.29 ->
    0.39 ms; stride 1: 32@112 0.71 -> 0.27 ms, 144@56 0.41 -> 0.30 ms)."""
    return (spec.depthwise and isa in ("avx2", "avx512") and spec.act in ("u8", "u4")
            and spec.stride == (1, 1) and spec.out_channels % BLOCKS[isa].lanes == 0)


def depthwise_pairs_compute(spec: ConvSpec, isa: str) -> ConvParts:
    """Depthwise conv as one ``vpmaddwd`` per two taps of a kernel row: every padded input
    column's word holds its pixel and the one ``dw`` columns right as int16 halves (stage
    ``words``, per channel), the weights of taps (2j, 2j+1) of a row are the halves of one word
    per (row, j, channel) (stage ``decode``, 0 past the last tap), and a lane accumulates the
    halves' dot product (``intrin.depthwise_intrin_name``): R * ceil(S/2) instructions per
    output vector where the int32 kernel widens and multiplies R * S times.  Same arguments as
    :func:`depthwise_compute`.  Exact: u8 x s8 products and their pair sums fit int32."""
    if not depthwise_pairs_form(spec, isa):
        raise ValueError(f"no int16-pair depthwise kernel for {spec} on {isa!r}")
    blk = BLOCKS[isa]
    x, weights, codes, xp = _depthwise_inputs(spec, "uint8")
    k_, (r_, s_) = spec.out_channels, spec.kernel
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    pt, pl, pb, pr = spec.padding
    hp, wp = spec.height + pt + pb, spec.width + pl + pr
    pairs = (s_ + 1) // 2
    i32 = lambda v: ta.const(v, "int32")  # noqa: E731

    # words past the padded width read the pad value: their weight half is 0 (an odd S)
    xw = te.compute((spec.batch, hp, wp + dw, k_),
                    lambda n, h, w, c: xp[n, h, w, c].astype("int32")
                    | (xp[n, h, w + dw, c].astype("int32") << i32(16)), name="words")

    def dec_fn(r, p, k):
        lo = _depthwise_tap(spec, weights, codes, r, 2 * p, k) & i32(0xFFFF)
        odd = te.min(2 * p + 1, s_ - 1)  # clamped: the select below zeroes the missing tap
        hi = ta.if_then_else(2 * p + 1 < s_,
                             _depthwise_tap(spec, weights, codes, r, odd, k) << i32(16), i32(0))
        return lo | hi

    wd = te.compute((r_, pairs, k_), dec_fn, name="decode")
    r = te.reduce_axis((0, r_), name="r")
    p = te.reduce_axis((0, pairs), name="p")
    hf = te.reduce_axis((0, 2), name="hf")
    acc = te.compute(
        (spec.batch, spec.out_height, spec.out_width, k_),
        lambda n, oh, ow, k: te.sum(
            (xw[n, oh * sh + r * dh, ow * sw + 2 * p * dw, k].astype("int64") >> (hf * 16))
            .astype("int16").astype("int32")
            * (wd[r, p, k].astype("int64") >> (hf * 16)).astype("int16").astype("int32"),
            axis=[r, p, hf]),
        name="conv",
    )
    args, y = _epilogue_stage(spec, "plain", lambda n, oh, ow, k: acc[n, oh, ow, k])
    return ConvParts((x, weights, codes, *args, y), blk, True, True, form=f"depthwise_pairs_{isa}")


__all__ = ["ConvParts", "UNPACK_MAX_PIXELS", "codes_in_epilogue", "conv_compute", "depthwise_compute",
           "depthwise_pairs_compute", "depthwise_pairs_form", "depthwise_vnni_compute",
           "depthwise_vnni_form", "unpacked_spec", "OUT_DTYPES"]
