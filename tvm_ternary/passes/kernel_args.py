"""Turn one planned layer (numpy) into a kernel spec and its constant arguments.

This is the *pack* step: ternary values go to the 2-bit packed layout (or, for a kernel the
compiler runs unpacked, ``compute.unpacked_spec``, their int8 words ``q_g * t``), 4/8-bit values
to the 16x4 int32-word blocks, group codes to ``[K, G, R, S]`` (the ternary avx2/avx512 kernels: their own layout,
``params.kernel_codes``), and the int32 bias gets the +128 compensation a u8 x s8 kernel
needs for signed activations.

Example::

    spec, args = layer_kernel(plan.layers["fire2/expand3x3_1"], x_shape=(1, 16, 55, 55), isa="vnni512")  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np

from ..plan import LayerPlan
from ..quant import ActivationQuant, pack_ternary
from ..quant import reference as ref
from ..schedules import ConvSpec, DenseSpec, kernel_arg_names
from ..schedules.layout import block_weights
from ..schedules.params import kernel_bias, kernel_codes


def act_kind(quant: ActivationQuant | None) -> str:
    """The kernels' name for an activation format (``f32`` for a dequantized output)."""
    if quant is None:
        return "f32"
    return ("s" if quant.signed else "u") + str(quant.bits)


def layer_spec(layer: LayerPlan, *, x_shape: tuple[int, ...]) -> ConvSpec | DenseSpec:
    """The kernel spec of ``layer`` for an input of NCHW (or [N, C]) ``x_shape``."""
    iw = layer.weights
    common = dict(weight_bits=iw.bits, group_size=iw.group_size, act=act_kind(layer.input_quant),
                  out=act_kind(layer.output_quant), bias=True, relu=layer.fused.relu,
                  x_zero_point=layer.input_quant.zero_point,
                  out_zero_point=0 if layer.output_quant is None else layer.output_quant.zero_point)
    if layer.is_dense:
        return DenseSpec(batch=x_shape[0], in_features=int(np.prod(x_shape[1:])),
                         out_features=iw.values.shape[0], **common)
    g = layer.geometry
    k, _, r, s = iw.values.shape
    return ConvSpec(batch=x_shape[0], in_channels=x_shape[1], height=x_shape[2], width=x_shape[3],
                    out_channels=k, kernel=(r, s), stride=g["stride"], padding=g["padding"],
                    dilation=g["dilation"], groups=g["groups"],
                    residual=act_kind(layer.residual_quant) if layer.residual_quant else None,
                    residual_zero_point=layer.residual_quant.zero_point if layer.residual_quant else 0,
                    grouping=iw.layout.grouping, **common)


def layer_kernel_args(layer: LayerPlan, spec: ConvSpec | DenseSpec, *, isa: str) -> dict[str, np.ndarray]:
    """The constant arguments of the kernel, by name (``x``, ``residual`` and ``y`` excluded)."""
    conv = spec.as_conv() if isinstance(spec, DenseSpec) else spec
    iw = layer.weights
    if conv.weight_bits == iw.bits:
        values = iw.values if iw.values.ndim == 4 else iw.values[:, :, None, None]
        weights = pack_ternary(values) if iw.bits == 2 else block_weights(values)
        codes = iw.kernel_group_codes().reshape(values.shape[0], -1, *values.shape[2:])
    elif iw.bits == 2 and conv.weight_bits == 8 and conv.n_groups_q == 1:
        # unpacked ternary (compute.unpacked_spec): the words q_g * t, one code of 1 per channel
        values = iw.decode_int8()
        weights = block_weights(values)
        codes = np.ones((values.shape[0], 1, *values.shape[2:]), np.uint8)
    else:
        raise ValueError(f"layer {layer.name}: {iw.bits}-bit weights cannot feed a "
                         f"{conv.weight_bits}-bit kernel")
    available = {
        "weights": weights,
        "codes": kernel_codes(conv, isa=isa, codes=codes),
        "bias": kernel_bias(conv, isa=isa, weights=weights, codes=codes, bias=layer.bias_int),
        "requant_scale": None if layer.multiplier is None else ref.requantize_scale(layer.multiplier, layer.shift),
        "residual_scale": (None if layer.residual_multiplier is None
                           else ref.requantize_scale(layer.residual_multiplier, layer.shift)),
        "scale": layer.dequant_scale,
    }
    names = [n for n in kernel_arg_names(conv, isa) if n not in ("x", "residual", "y")]
    missing = [n for n in names if available.get(n) is None]
    if missing:
        raise ValueError(f"layer {layer.name}: no value for kernel argument(s) {missing}")
    return {n: available[n] for n in names}
