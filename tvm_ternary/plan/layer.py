"""One quantized fused layer: its integer weights and epilogue, and its numpy semantics.

``LayerPlan.run`` is the reference the compiled kernel must match bit for bit::

    x_int = quantize(x)                                  (round half to even, saturate)
    acc   = conv2d_int(x_int - z_x, q_g * v) + bias_int  (int32; z_x = 0 unless imported)
    y_int = clip(rint(f32(acc) * f32(M * 2^-shift)) + z_y)          (requantize; ReLU: floor z_y)
          = clip(rhe(acc * M + (res_int - z_r) * R, shift) + z_y)   (with a residual, int64)
       or y = acc * (s_x * s_k)  [ReLU]                  (dequantize: the float exit)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..quant import ActivationQuant, IntegerWeights, dequantize_activation, quantize_activation
from ..quant import reference as ref
from .config import LayerDecision
from .graph import FusedLayer

RESIDUAL_MULTIPLIER_BITS = 30  # R in [2^29, 2^30]: leaves int32 headroom for any scale ratio


@dataclass(frozen=True, eq=False)
class LayerPlan:
    fused: FusedLayer
    decision: LayerDecision
    weights: IntegerWeights
    bias_int: np.ndarray  # int32 [K]
    geometry: dict  # stride, padding (t, l, b, r), dilation, groups; {} for dense
    input_quant: ActivationQuant
    output_quant: ActivationQuant | None  # None: dequantize to float32 in the epilogue
    residual_quant: ActivationQuant | None
    multiplier: np.ndarray | None  # int32 [K]
    shift: np.ndarray | None  # int32 [K]
    residual_multiplier: np.ndarray | None  # int32 [K]
    dequant_scale: np.ndarray  # float32 [K] = s_x * s_k
    weight_error: float  # ||W - W_hat|| / ||W||
    output_error: float | None  # data-aware fit's relative output error on calibration data

    @property
    def name(self) -> str:
        return self.fused.name

    @property
    def is_dense(self) -> bool:
        return self.fused.weight.op_type == "dense"

    def accumulate(self, x_int: np.ndarray) -> np.ndarray:
        w = self.weights.decode_int8()
        if self.input_quant.zero_point:  # the padded border is the real zero: z_x
            x_int = x_int.astype(np.int32) - np.int32(self.input_quant.zero_point)
        if self.is_dense:
            acc = ref.dense_int(x_int.reshape(x_int.shape[0], -1), w)
            return acc + self.bias_int[None, :]
        acc = ref.conv2d_int(x_int, w, **self.geometry)
        return acc + self.bias_int[None, :, None, None]

    def run(self, x: np.ndarray, residual: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(float output, integer output or accumulator) for float input ``x`` (NCHW / [N, C])."""
        acc = self.accumulate(quantize_activation(x, self.input_quant))
        if self.output_quant is None:
            y = ref.dequantize(acc, scale=self.dequant_scale, relu=self.fused.relu)
            return y, acc
        res_int = None if residual is None else quantize_activation(residual, self.residual_quant)
        y_int = ref.requantize(
            acc, multiplier=self.multiplier, shift=self.shift, residual=res_int,
            residual_multiplier=self.residual_multiplier, relu=self.fused.relu,
            bits=self.output_quant.bits, signed=self.output_quant.signed,
            zero_point=self.output_quant.zero_point,
            residual_zero_point=0 if self.residual_quant is None else self.residual_quant.zero_point)
        return dequantize_activation(y_int, self.output_quant), y_int


def integer_params(weights: IntegerWeights, bias: np.ndarray, *, input_quant: ActivationQuant,
                   output_quant: ActivationQuant | None, residual_quant: ActivationQuant | None):
    """The integer side of one layer in the number-format contract: ``(bias_int, dequant_scale,
    multiplier, shift, residual_multiplier)``; the last three are None when the output leaves
    the quantized region as float (``output_quant`` None)."""
    bias_int = ref.integer_bias(bias, input_scale=input_quant.scale, channel_scales=weights.channel_scales)
    dequant = (np.float64(input_quant.scale) * weights.channel_scales.astype(np.float64)).astype(np.float32)
    if output_quant is None:
        return bias_int, dequant, None, None, None
    mult, shift, res_mult = requantize_params(
        dequant_scale=dequant, out_scale=output_quant.scale,
        residual_scale=None if residual_quant is None else residual_quant.scale)
    return bias_int, dequant, mult, shift, res_mult


def requantize_params(*, dequant_scale: np.ndarray, out_scale: float, residual_scale: float | None):
    """(multiplier, shift, residual multiplier) for ``acc * dequant_scale / out_scale`` (+ the
    residual at ``residual_scale / out_scale``) sharing one shift per channel."""
    real = np.asarray(dequant_scale, np.float64) / out_scale
    if residual_scale is None:
        mult, shift = ref.quantize_multiplier(real)
        return mult, shift, None
    ratio = residual_scale / out_scale
    # One shift serves both terms: put R in [2^29, 2^30] and give M what precision is left.
    shift_value = RESIDUAL_MULTIPLIER_BITS - int(np.ceil(np.log2(ratio)))
    if not 1 <= shift_value <= 62:
        raise ValueError(f"residual scale ratio {ratio:g} is out of the requantizer's range")
    shift = np.full(real.shape, shift_value, np.int32)
    mult = np.rint(real * 2.0**shift_value)
    if np.any(mult >= 2**31):
        raise ValueError("requantize multiplier overflows int32 with a fused residual")
    res_mult = np.full(real.shape, np.rint(ratio * 2.0**shift_value), np.int32)
    return mult.astype(np.int32), shift, res_mult
