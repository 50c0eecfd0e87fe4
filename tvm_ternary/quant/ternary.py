"""Ternarization of pre-trained weights without retraining (FGQ).

Each group g is approximated by ``alpha_g * t_g`` with ``t_g`` in {-1, 0, +1}.

* ``exact``: for a fixed support of size k the best alpha is the mean of |w| on it and the
  error is ``||w||^2 - (sum_S |w|)^2 / k``, so the optimal support is the k largest |w| with k
  maximising ``(sum of the k largest |w|)^2 / k``. Sorting gives every k at once.
* ``twn`` (Li & Liu, Ternary Weight Networks): threshold ``0.7 * mean|w_g|``, alpha the mean
  of |w| above it. Cheaper, never better than ``exact``.

Example::

    >>> import numpy as np
    >>> from tvm_ternary.quant import ternarize
    >>> w = np.random.default_rng(0).normal(size=(8, 16, 3, 3)).astype(np.float32)
    >>> tw = ternarize(w, group_size=4)
    >>> tw.codes.shape, tw.scales.shape, np.unique(tw.codes).tolist()
    ((8, 16, 3, 3), (8, 4, 3, 3), [-1, 0, 1])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats import per_channel, value_max
from .groups import GroupLayout

METHODS = ("exact", "twn")
TWN_FACTOR = 0.7  # the TWN paper's approximation of the optimal threshold for Gaussian weights
# A group counts as already ternary when its nonzero magnitudes agree to this relative
# tolerance: tight enough to reject real-valued weights, loose enough for fp16 storage.
ALREADY_TERNARY_RTOL = 1e-3


def check_finite_weight(weight: np.ndarray) -> np.ndarray:
    w = np.asarray(weight, dtype=np.float32)
    if not np.all(np.isfinite(w)):
        bad = int(np.size(w) - np.count_nonzero(np.isfinite(w)))
        raise ValueError(f"weight holds {bad} NaN/Inf value(s)")
    return w


@dataclass(frozen=True)
class QuantizedWeights:
    """Weights as integer values times a float scale per group.

    ``codes``: int8, same shape as the weight (ternary: {-1, 0, +1}; b-bit: [-(2^(b-1)-1), 2^(b-1)-1]).
    ``scales``: float32 per group, shape ``layout.scale_shape``.
    """

    codes: np.ndarray
    scales: np.ndarray
    layout: GroupLayout
    bits: int
    method: str
    already_ternary: bool = False

    @property
    def max_value(self) -> int:
        """Largest |code| this bit width allows (1 for ternary)."""
        return 1 if self.bits == 2 else 2 ** (self.bits - 1) - 1

    def dequantize(self) -> np.ndarray:
        return (self.codes.astype(np.float32) * self.layout.broadcast_to_weights(self.scales)).astype(
            np.float32
        )

    def zero_fraction(self) -> float:
        return float(np.mean(self.codes == 0))


# A ternary result is a QuantizedWeights with bits == 2.
TernaryWeights = QuantizedWeights


def _exact(members: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mag = np.where(mask, np.abs(members), 0.0).astype(np.float64)
    order = np.argsort(-mag, axis=1, kind="stable")
    sorted_mag = np.take_along_axis(mag, order, axis=1)
    cumsum = np.cumsum(sorted_mag, axis=1)
    k = np.arange(1, mag.shape[1] + 1, dtype=np.float64)
    best_k = np.argmax(cumsum**2 / k, axis=1) + 1  # ties pick the smallest support
    alpha = cumsum[np.arange(len(mag)), best_k - 1] / best_k
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(mag.shape[1])[None, :].repeat(len(mag), 0), axis=1)
    keep = (rank < best_k[:, None]) & (mag > 0)
    return keep, alpha


def _twn(members: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mag = np.where(mask, np.abs(members), 0.0).astype(np.float64)
    count = mask.sum(axis=1)
    delta = TWN_FACTOR * mag.sum(axis=1) / count
    keep = (mag > delta[:, None]) & mask
    kept = keep.sum(axis=1)
    alpha = np.where(kept > 0, (mag * keep).sum(axis=1) / np.maximum(kept, 1), 0.0)
    return keep, alpha


def is_already_ternary(members: np.ndarray, mask: np.ndarray) -> bool:
    """True when every group holds at most one nonzero magnitude ({-a, 0, +a} per group).

    Groups of one weight are trivially ternary and tell nothing about the model: False then.
    """
    if members.shape[1] < 2:
        return False
    mag = np.where(mask, np.abs(members), 0.0)
    nonzero = mag > 0
    top = mag.max(axis=1, keepdims=True)
    low = np.where(nonzero, mag, np.inf).min(axis=1, keepdims=True)
    ok = ~nonzero.any(axis=1, keepdims=True) | (top - low <= ALREADY_TERNARY_RTOL * top)
    return bool(ok.all())


def ternarize(
    weight: np.ndarray, *, group_size: int, method: str = "exact", grouping: str = "fgq"
) -> QuantizedWeights:
    """Ternarize ``weight`` ([K, C, R, S] or [K, C]) in groups of ``group_size`` channels.

    A group of all zeros gets scale 0. Weights that are already ternary per group (a model
    trained ternary) are recognised: ``exact`` then reproduces them without loss and the
    result has ``already_ternary=True``. See the module docstring for an example.
    """
    if method not in METHODS:
        raise ValueError(f"ternarization method must be one of {METHODS}, got {method!r}")
    w = check_finite_weight(weight)
    layout = GroupLayout(weight_shape=tuple(w.shape), group_size=group_size, grouping=grouping)
    members, mask = layout.to_groups(w)
    already = is_already_ternary(members, mask)
    keep, alpha = (_exact if method == "exact" or already else _twn)(members, mask)
    codes = np.where(keep, np.sign(members), 0).astype(np.int8)
    if already:
        # Use the stored magnitude itself rather than a mean, so fp16-rounded values survive.
        alpha = np.where(keep, np.abs(members), 0).max(axis=1)
    return QuantizedWeights(
        codes=layout.from_groups(codes),
        scales=alpha.astype(np.float32).reshape(layout.scale_shape),
        layout=layout,
        bits=2,
        method="exact" if already else method,
        already_ternary=already,
    )


def quantize_weights(
    weight: np.ndarray, *, bits: int, group_size: int, grouping: str = "fgq"
) -> QuantizedWeights:
    """Symmetric b-bit quantization (b in {2, 4, 8}) with one scale per group.

    ``bits=2`` is :func:`ternarize` with the ``exact`` threshold. 8-bit weights use one group
    per output channel (``group_size`` is ignored): an int8 value leaves no room for a group
    code in the shared int8 kernel format (see docs/ARCHITECTURE.md).

    >>> import numpy as np
    >>> w = np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16)
    >>> q = quantize_weights(w, bits=4, group_size=8)
    >>> int(np.abs(q.codes).max()) <= 7
    True
    """
    if bits == 2:
        return ternarize(weight, group_size=group_size, method="exact", grouping=grouping)
    vmax = value_max(bits)
    w = check_finite_weight(weight)
    if per_channel(bits):
        group_size, grouping = w.shape[1], "cluster"
    layout = GroupLayout(weight_shape=tuple(w.shape), group_size=group_size, grouping=grouping)
    members, mask = layout.to_groups(w)
    scale = np.where(mask, np.abs(members), 0).max(axis=1) / vmax
    safe = np.where(scale > 0, scale, 1.0)
    codes = np.clip(np.rint(members / safe[:, None]), -vmax, vmax).astype(np.int8)
    return QuantizedWeights(
        codes=layout.from_groups(codes),
        scales=scale.astype(np.float32).reshape(layout.scale_shape),
        layout=layout,
        bits=bits,
        method="minmax",
    )


def relative_error(weight: np.ndarray, approx: np.ndarray) -> float:
    """``||W - W_hat|| / ||W||`` (0 for an all-zero weight that is reproduced exactly)."""
    w = np.asarray(weight, dtype=np.float64)
    norm = np.linalg.norm(w)
    diff = np.linalg.norm(w - np.asarray(approx, dtype=np.float64))
    return float(diff / norm) if norm > 0 else float(diff)
