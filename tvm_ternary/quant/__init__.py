"""Quantization core: numpy only, no TVM import.

Weight quantizers (FGQ ternary with exact / TWN thresholds, 4/8-bit), integer group scales,
activation quantizers, the 2-bit packed format and numpy reference semantics of every op the
compiler emits. See docs/ARCHITECTURE.md for the number formats.
"""

from .activations import (
    CALIBRATION_METHODS,
    ActivationQuant,
    calibrate_activation,
    dequantize_activation,
    quantize_activation,
)
from .formats import FORMAT_NAMES, WEIGHT_BITS, per_channel, value_max
from .groups import GROUPINGS, GroupLayout, multiplications_removed
from .intscales import IntegerWeights, code_max, to_integer_scales
from .packing import pack_ternary, packed_bytes, packed_shape, unpack_ternary
from .ternary import (
    METHODS,
    QuantizedWeights,
    TernaryWeights,
    quantize_weights,
    relative_error,
    ternarize,
)
from . import reference

__all__ = [
    "CALIBRATION_METHODS",
    "FORMAT_NAMES",
    "GROUPINGS",
    "METHODS",
    "ActivationQuant",
    "GroupLayout",
    "IntegerWeights",
    "QuantizedWeights",
    "TernaryWeights",
    "WEIGHT_BITS",
    "calibrate_activation",
    "code_max",
    "dequantize_activation",
    "multiplications_removed",
    "pack_ternary",
    "packed_bytes",
    "packed_shape",
    "per_channel",
    "quantize_activation",
    "quantize_weights",
    "reference",
    "relative_error",
    "ternarize",
    "to_integer_scales",
    "unpack_ternary",
    "value_max",
]
