"""Integer group scales: the form the kernels execute.

Each group's float scale ``alpha_g`` becomes an integer code ``q_g`` times one float scale
``s_k`` per output channel (``alpha_g ~ s_k * q_g``). A weight then decodes to the int8 value
``q_g * v`` and a whole layer is an int8 dot product with a single float scale per output
channel: no per-group float multiply in the inner loop, at any group size.

``qmax = min(2**code_bits - 1, 127 // vmax)``: 127 for ternary 7-bit codes, 15 for 4-bit codes,
18 for 4-bit weights (|v| <= 7), 1 for 7- and 8-bit weights (per channel already: a 7-bit
weight decodes to ``|v| <= 63``, the range that keeps ``vpmaddubsw`` exact, see ``formats``).

Example::

    >>> import numpy as np
    >>> from tvm_ternary.quant import ternarize, to_integer_scales
    >>> w = np.random.default_rng(0).normal(size=(4, 8, 3, 3)).astype(np.float32)
    >>> iw = to_integer_scales(ternarize(w, group_size=4))
    >>> int(np.abs(iw.decode_int8()).max()) <= 127
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats import per_channel, value_max
from .groups import GroupLayout
from .ternary import QuantizedWeights

CODE_BITS = (7, 4)
REFIT_ITERATIONS = 3  # alternating (q | s) least-squares steps; converges in 2-3 on real layers


@dataclass(frozen=True)
class IntegerWeights:
    """Quantized weights with integer group codes and one float scale per output channel.

    ``values``: int8 like the weight (ternary {-1,0,1}, or b-bit values);
    ``group_codes``: uint8, ``layout.scale_shape``; ``channel_scales``: float32 ``[K]``;
    ``lossless``: the integer codes reproduce the float group scales exactly.
    """

    values: np.ndarray
    group_codes: np.ndarray
    channel_scales: np.ndarray
    layout: GroupLayout
    bits: int
    code_bits: int
    lossless: bool

    @property
    def group_size(self) -> int:
        return self.layout.group_size

    def kernel_group_codes(self) -> np.ndarray:
        """Group codes as the kernels take them, ``[K, G, R, S]``."""
        return self.layout.expand_to_kernel_codes(self.group_codes)

    def decode_int8(self) -> np.ndarray:
        """The int8 weight the kernels multiply: ``q_g * v`` (within [-127, 127])."""
        q = self.layout.broadcast_to_weights(self.group_codes.astype(np.int32))
        return (q * self.values.astype(np.int32)).astype(np.int8)

    def dequantize(self) -> np.ndarray:
        shape = (-1,) + (1,) * (self.values.ndim - 1)
        return (self.decode_int8().astype(np.float32) * self.channel_scales.reshape(shape)).astype(
            np.float32
        )


def code_max(*, bits: int, code_bits: int) -> int:
    if per_channel(bits):
        return 1
    return min(2**code_bits - 1, 127 // value_max(bits))


def _exact_codes(alpha: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Scales s_k with alpha = s_k * q exactly (small integer ratios), as a trained-ternary
    model with a per-layer or per-channel alpha has; None if some channel has none."""
    top = alpha.max(axis=1)
    q = np.zeros(alpha.shape, dtype=np.int64)
    for k in range(alpha.shape[0]):
        if top[k] == 0:
            continue
        ratio = alpha[k] / top[k]
        for m in range(1, qmax + 1):
            cand = np.rint(ratio * m)
            if np.all(np.abs(cand - ratio * m) <= 1e-4 * m):
                q[k] = cand
                break
        else:
            return None
    scale = np.where(top > 0, top / np.maximum(q.max(axis=1), 1), 0.0)
    return q, scale


def to_integer_scales(qw: QuantizedWeights, *, code_bits: int = 7) -> IntegerWeights:
    """Turn per-group float scales into integer codes and a per-output-channel float scale.

    ``s_k`` and ``q_g`` are fitted by alternating least squares on the weight error
    ``sum_g || w_g - s_k q_g v_g ||^2`` starting from ``s_k = max_g alpha_g / qmax``.
    """
    if code_bits not in CODE_BITS:
        raise ValueError(f"group-code bits must be one of {CODE_BITS}, got {code_bits}")
    layout = qw.layout
    qmax = code_max(bits=qw.bits, code_bits=code_bits)
    k = layout.out_channels
    alpha = qw.scales.reshape(k, -1).astype(np.float64)
    # Per group: sum_j |w_j| v_j-weighted target and sum v_j^2, so the LS fit is closed-form.
    members, _ = layout.to_groups(qw.codes.astype(np.float64))
    v2 = (members**2).sum(axis=1).reshape(k, -1)  # sum of v^2 per group
    target = alpha * v2  # <w_g, v_g> = alpha_g * sum v^2 (alpha is the LS scale on codes v)

    exact = _exact_codes(alpha, qmax)
    if exact is not None:
        q, scale = exact
        lossless = True
    else:
        lossless = False
        top = alpha.max(axis=1)
        scale = top / qmax
        for _ in range(REFIT_ITERATIONS):
            safe = np.where(scale > 0, scale, 1.0)[:, None]
            q = np.clip(np.rint(alpha / safe), 0, qmax)
            den = (q**2 * v2).sum(axis=1)
            scale = np.where(den > 0, (q * target).sum(axis=1) / np.maximum(den, 1e-30), 0.0)
        safe = np.where(scale > 0, scale, 1.0)[:, None]
        q = np.clip(np.rint(alpha / safe), 0, qmax)
    return IntegerWeights(
        values=qw.codes.astype(np.int8),
        group_codes=q.astype(np.uint8).reshape(layout.scale_shape),
        channel_scales=np.asarray(scale, dtype=np.float32),
        layout=layout,
        bits=qw.bits,
        code_bits=code_bits,
        lossless=lossless,
    )
