"""Weight number formats: the one table of their value ranges (docs/ARCHITECTURE.md, "Number
formats"). Every quantizer, the kernels' specs and the policy read it from here.

- 2: ternary values ``t in {-1, 0, +1}``, a group code per N weights;
- 4: ``v in [-7, 7]``, a group code per N weights;
- 7: ``v in [-63, 63]``, per output channel. The 8-bit kernels' format with half the range, as
  ONNX Runtime's ``reduce_range``: a ``vpmaddubsw`` pair of u8 activations stays within int16
  (2 * 255 * 63 = 32130), so AVX2 / AVX-512BW without VNNI run it on the u8 x s8 instruction
  where full 8-bit values must take the int16 path (2 * 255 * 127 saturates);
- 8: ``v in [-127, 127]``, per output channel.

>>> [value_max(b) for b in WEIGHT_BITS]
[1, 7, 63, 127]
>>> per_channel(7), per_channel(4)
(True, False)
"""

from __future__ import annotations

WEIGHT_BITS = (2, 4, 7, 8)
# what reports call a layer of each format (0: kept float)
FORMAT_NAMES = {0: "float", 2: "ternary", 4: "int4", 7: "int7", 8: "int8"}


def value_max(bits: int) -> int:
    """Largest ``|v|`` of a ``bits``-bit weight value."""
    if bits not in WEIGHT_BITS:
        raise ValueError(f"weight bits must be one of {WEIGHT_BITS}, got {bits!r}")
    return 1 if bits == 2 else 2 ** (bits - 1) - 1


def per_channel(bits: int) -> bool:
    """7- and 8-bit weights have one scale per output channel (no room for a group code in
    the int8 kernel format: ``q_g * v`` must stay within int8); 2/4-bit have groups of N."""
    return value_max(bits) > 7
