"""Kernel specifications (frozen, validated eagerly) and the kernel argument contract.

A spec says *what* a kernel computes; the ISA and tiling say *how*.  Argument order of every
kernel built from a spec (``kernel_arg_names`` is the source of truth)::

    x, weights, codes, [bias], [requant_scale], [residual, residual_scale], [scale], [float_bias], y

- ``x``: NHWC activations ``[N, H, W, C]`` (dense: ``[N, C]``), uint8 for u8/u4, int8 for s8/s4.
- ``weights``: ternary -> 2-bit packed ``[ceil(K/16), ceil(Cg/4), R, S, 16]`` uint8;
  4/8-bit -> int8 values in the same 16x4 blocks, zero padded, each 4 input channels viewed as
  one little-endian int32 word, in the order the kernels read them: ``[ceil(K/16), R, S,
  ceil(Cg/4), 16]`` int32 (``layout.block_weights``; ``spec.weight_index``).  ``Cg = C /
  groups``; dense uses R = S = 1.
- ``codes``: integer group scale codes ``q[K, ceil(Cg/N), R, S]`` uint8 (``spec.codes_shape``);
  with ``grouping="cluster"`` (N whole kernels share one code) they must not vary over (R, S).
  Kernels take them in their own layout, made at compile time by
  ``params.kernel_codes(spec, isa=isa, codes=q)``: ``[ceil(K/lanes), R, S, G, lanes]``
  (``compute.block_codes_shape``) for the VNNI / int16 / plain kernels, per chunk and lane for
  the vpmaddubsw kernels of avx2 / avx512 targets (``maddubs_form``), ``q`` itself for depthwise.
- ``bias``: int32 ``[K]``; present when ``spec.bias`` or when the ISA needs the +128
  compensation (s8/s4 activations on VNNI or a vpmaddubsw form: pass ``params.kernel_bias(...)``).
- requantize (``out`` in u8/s8/u4/s4): float32 ``requant_scale[K]`` =
  ``reference.requantize_scale(M, shift)``; with a residual also ``residual`` (same shape as y,
  dtype ``spec.residual``) and float32 ``residual_scale[K]`` = ``requantize_scale(R, shift)``.
- dequantize (``out == "f32"``): float32 ``scale[K]`` and, with ``float_bias``, float32 ``[K]``.
- ``y``: NHWC ``[N, OH, OW, K]`` (dense ``[N, K]``) of dtype ``container(out)``.

Example::

    spec = ConvSpec(batch=1, in_channels=64, height=56, width=56, out_channels=64,
                    kernel=3, padding=1, group_size=64, act="u8", out="u8", bias=True, relu=True)
    spec.out_shape   # (1, 56, 56, 64)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..quant.formats import WEIGHT_BITS, value_max

ACT_DTYPES = {"u8": "uint8", "s8": "int8", "u4": "uint8", "s4": "int8"}
OUT_DTYPES = {**ACT_DTYPES, "i32": "int32", "f32": "float32"}
# Value range of each quantized container kind (ARCHITECTURE.md, "Activations").
RANGES = {"u8": (0, 255), "s8": (-128, 127), "u4": (0, 15), "s4": (-8, 7)}
GROUPINGS = ("fgq", "cluster")  # quant.groups: FGQ groups at one (r, s); cluster over R x S


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(x) for x in v)
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v!r}")
    return t


def _padding4(v) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) from an int, (ph, pw) or a 4-tuple."""
    if isinstance(v, int):
        return (v, v, v, v)
    t = tuple(int(x) for x in v)
    if len(t) == 2:
        return (t[0], t[1], t[0], t[1])
    if len(t) == 4:
        return t
    raise ValueError(f"padding must be an int, (ph, pw) or (top, left, bottom, right), got {v!r}")


def _check_epilogue(spec) -> None:
    if spec.act not in ACT_DTYPES:
        raise ValueError(f"act must be one of {sorted(ACT_DTYPES)}, got {spec.act!r}")
    if spec.out not in OUT_DTYPES:
        raise ValueError(f"out must be one of {sorted(OUT_DTYPES)}, got {spec.out!r}")
    if spec.weight_bits not in WEIGHT_BITS:
        raise ValueError(f"weight_bits must be one of {WEIGHT_BITS}, got {spec.weight_bits!r}")
    if spec.residual is not None:
        if spec.residual not in ("u8", "s8", "u4", "s4"):
            raise ValueError(f"residual must be None or u8/s8/u4/s4, got {spec.residual!r}")
        if not spec.requantize:
            raise ValueError("a residual is only fused into a requantizing epilogue (out u8/s8/u4/s4)")
    if spec.float_bias and spec.out != "f32":
        raise ValueError("float_bias needs out='f32' (dequantize)")
    for name, kind in (("x_zero_point", spec.act), ("out_zero_point", spec.out),
                       ("residual_zero_point", spec.residual)):
        zp = getattr(spec, name)
        if zp and (kind not in RANGES or not RANGES[kind][0] <= zp <= RANGES[kind][1]):
            raise ValueError(f"{name}={zp} does not fit the {kind} format")


@dataclass(frozen=True)
class ConvSpec:
    """An NHWC quantized conv2d.  ``group_size`` (N of FGQ) defaults to ``in_channels // groups``."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple = (3, 3)
    stride: tuple = (1, 1)
    padding: tuple = (0, 0, 0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    weight_bits: int = 2
    group_size: int | None = None
    act: str = "u8"
    out: str = "i32"
    bias: bool = False
    relu: bool = False
    residual: str | None = None
    float_bias: bool = False
    # Zero points of imported (QDQ) models: x ~ s * (q - z). The padded border holds z_x, the
    # bias carries -z_x * sum(w), the requantizer adds z_out and subtracts z_residual.
    x_zero_point: int = 0
    out_zero_point: int = 0
    residual_zero_point: int = 0
    # How the codes are shared: "cluster" lets the vpmaddubsw kernels (avx2/avx512) accumulate a
    # group's R x S steps in int16 before applying its code (see maddubs_form).
    grouping: str = "fgq"
    dense: bool = field(default=False, repr=False)  # set by DenseSpec.as_conv only

    def __post_init__(self):
        set_ = object.__setattr__  # normalising fields of a frozen dataclass
        set_(self, "kernel", _pair(self.kernel, "kernel"))
        set_(self, "stride", _pair(self.stride, "stride"))
        set_(self, "dilation", _pair(self.dilation, "dilation"))
        set_(self, "padding", _padding4(self.padding))
        for name in ("batch", "in_channels", "height", "width", "out_channels", "groups"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if min(self.kernel + self.stride + self.dilation) < 1:
            raise ValueError("kernel, stride and dilation must be >= 1")
        if min(self.padding) < 0:
            raise ValueError(f"padding must be >= 0, got {self.padding}")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"groups={self.groups} must divide in_channels={self.in_channels} "
                             f"and out_channels={self.out_channels}")
        if self.group_size is None:
            set_(self, "group_size", self.in_channels // self.groups)
        if int(self.group_size) < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, got {self.grouping!r}")
        if self.out_height < 1 or self.out_width < 1:
            raise ValueError(f"empty output {self.out_shape} for {self}")
        _check_epilogue(self)

    # ---- derived shapes
    @property
    def cin_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def cout_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.cin_per_group == 1 and self.cout_per_group == 1

    @property
    def n_groups_q(self) -> int:
        return -(-self.cin_per_group // self.group_size)

    @property
    def out_height(self) -> int:
        (r, _), (sh, _), (dh, _) = self.kernel, self.stride, self.dilation
        return (self.height + self.padding[0] + self.padding[2] - dh * (r - 1) - 1) // sh + 1

    @property
    def out_width(self) -> int:
        (_, s), (_, sw), (_, dw) = self.kernel, self.stride, self.dilation
        return (self.width + self.padding[1] + self.padding[3] - dw * (s - 1) - 1) // sw + 1

    @property
    def requantize(self) -> bool:
        return self.out in RANGES

    @property
    def macs(self) -> int:
        r, s = self.kernel
        return (self.batch * self.out_height * self.out_width * self.out_channels
                * self.cin_per_group * r * s)

    @property
    def x_shape(self) -> tuple:
        if self.dense:
            return (self.width, self.in_channels)
        return (self.batch, self.height, self.width, self.in_channels)

    @property
    def out_shape(self) -> tuple:
        if self.dense:
            return (self.width, self.out_channels)
        return (self.batch, self.out_height, self.out_width, self.out_channels)

    @property
    def weight_shape(self) -> tuple:
        """Shape of the ``weights`` argument (packed for ternary, int8 values otherwise)."""
        r, s = self.kernel
        k, cg = self.out_channels, self.cin_per_group
        if self.weight_bits == 2:
            return (-(-k // 16), -(-cg // 4), r, s, 16)
        return (-(-k // 16), r, s, -(-cg // 4), 16)

    def weight_index(self, kb, cb, r, s, ki) -> tuple:
        """Where the ``weights`` argument holds output lane ``ki`` of block ``kb`` for the input
        word ``cb`` at tap (r, s). 4/8-bit words come in the kernels' reduction order (r, s, cb),
        so a kernel that reads them without a decode (``compute.codes_in_epilogue``) streams
        them: a 3x3 conv of a 7x7 map on a Zen 4 read 2.4 MB of them 0.62 -> 0.54 ms that way,
        against 9 strided streams in [kb, cb, r, s] order. Ternary bytes are decoded per call
        into that order (the order of the packed bytes does not matter there)."""
        return (kb, cb, r, s, ki) if self.weight_bits == 2 else (kb, r, s, cb, ki)

    @property
    def codes_shape(self) -> tuple:
        r, s = self.kernel
        return (self.out_channels, self.n_groups_q, r, s)


@dataclass(frozen=True)
class DenseSpec:
    """A quantized dense layer ``y[N, K] = x[N, C] . w[K, C]^T`` (weights with R = S = 1).

    Example::

        DenseSpec(batch=1, in_features=2048, out_features=1000, group_size=64, out="f32")
    """

    batch: int
    in_features: int
    out_features: int
    weight_bits: int = 2
    group_size: int | None = None
    act: str = "u8"
    out: str = "i32"
    bias: bool = False
    relu: bool = False
    residual: str | None = None
    float_bias: bool = False
    x_zero_point: int = 0
    out_zero_point: int = 0

    def __post_init__(self):
        self.as_conv()  # validates

    def as_conv(self) -> ConvSpec:
        """The same layer as a 1x1 conv over a 1 x N image (batch rows become pixels)."""
        return ConvSpec(batch=1, in_channels=self.in_features, height=1, width=self.batch,
                        out_channels=self.out_features, kernel=1, group_size=self.group_size,
                        weight_bits=self.weight_bits, act=self.act, out=self.out, bias=self.bias,
                        relu=self.relu, residual=self.residual, float_bias=self.float_bias,
                        x_zero_point=self.x_zero_point, out_zero_point=self.out_zero_point,
                        dense=True)


# Output lanes of the vpmaddubsw forms' blocks (intrin.BLOCKS["avx2t"/"avx512t"]).
_MADDUBS_LANES = {"avx2": 8, "avx512": 16}
INT16_MAX = 32767


def pair_bound(spec: ConvSpec) -> int:
    """Largest ``|x0*v0 + x1*v1|`` of one ``vpmaddubsw`` pair: ``2 * amax * vmax``, with
    ``amax`` = 15 for u4 and 255 otherwise (s8/s4 are shifted by +128 into u8)."""
    amax = 15 if spec.act == "u4" else 255
    return 2 * amax * value_max(spec.weight_bits)


def maddubs_form(spec: ConvSpec, isa: str) -> str | None:
    """``"avx2t"`` / ``"avx512t"`` when ``spec`` runs the ``vpmaddubsw`` kernel (values in the
    inner loop, group codes applied after an int16 accumulation, compute_ternary) on ``isa``,
    else None (the layer keeps ``isa``'s int16 ``vpmaddwd`` block).

    Where the pair sums provably fit int16 (:func:`pair_bound`): ternary weights (510 with u8),
    4-bit weights (3570 with u8, 210 with u4), 7-bit weights (32130 with u8), 8-bit weights with
    u4 activations (3810) -- not 8-bit weights with 8-bit activations (64770 saturates).  Not depthwise, groups aligned to
    the block's output lanes, and every pair of input channels inside one group (N even, or a
    single group: N >= C).
    """
    if isa not in _MADDUBS_LANES or spec.depthwise or pair_bound(spec) > INT16_MAX:
        return None
    if spec.groups > 1 and spec.cout_per_group % _MADDUBS_LANES[isa]:
        return None
    if spec.n_groups_q > 1 and spec.group_size % 2:
        return None
    return isa + "t"


def needs_compensation(spec: ConvSpec, isa: str) -> bool:
    """Signed activations on a u8 x s8 kernel (VNNI, or the vpmaddubsw forms) are
    shifted by +128; the bias pays it back."""
    if spec.act not in ("s8", "s4") or spec.depthwise:
        return False
    return isa in ("vnni512", "avxvnni") or maddubs_form(spec, isa) is not None


def kernel_arg_names(spec: ConvSpec, isa: str) -> list[str]:
    """Names of the kernel's parameters in order (see the module docstring)."""
    names = ["x", "weights", "codes"]
    if spec.bias or needs_compensation(spec, isa) or spec.x_zero_point:
        names.append("bias")
    if spec.requantize:
        names.append("requant_scale")
        if spec.residual is not None:
            names += ["residual", "residual_scale"]
    if spec.out == "f32":
        names.append("scale")
        if spec.float_bias:
            names.append("float_bias")
    return names + ["y"]
