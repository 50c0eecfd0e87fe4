"""Group layouts: which weights share one scale.

Weights are ``[K, C, R, S]`` (conv) or ``[K, C]`` (dense; handled as ``R = S = 1``).

* ``fgq`` (Mellempudi et al., *Ternary Neural Networks with Fine-Grained Quantization*):
  a group is N consecutive input channels of one output channel at one kernel position.
* ``cluster`` (Mellempudi et al., *Mixed Low-precision Inference using Dynamic Fixed Point*):
  a group is N whole kernels (N input channels x R x S) of one output filter.

When N does not divide C the last group along C is shorter (``C - (G-1)·N`` members); it is
padded with masked-out zeros internally so all groups can be processed as one 2-D array.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUPINGS = ("fgq", "cluster")


@dataclass(frozen=True)
class GroupLayout:
    """How a weight tensor of ``weight_shape`` is cut into groups of ``group_size`` channels.

    ``scale_shape`` is the shape of the per-group scale arrays: ``[K, G, R, S]`` for ``fgq``
    and ``[K, G]`` for ``cluster`` (dense weights drop the R, S axes).
    """

    weight_shape: tuple[int, ...]
    group_size: int
    grouping: str

    def __post_init__(self):
        if len(self.weight_shape) not in (2, 4):
            raise ValueError(f"weight must be [K, C] or [K, C, R, S], got shape {self.weight_shape}")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, got {self.grouping!r}")
        if not isinstance(self.group_size, (int, np.integer)) or isinstance(self.group_size, bool):
            raise ValueError(f"group size must be an integer, got {self.group_size!r}")
        channels = self.weight_shape[1]
        if self.group_size <= 0:
            raise ValueError(f"group size N must be >= 1, got {self.group_size}")
        if self.group_size > channels:
            raise ValueError(
                f"group size N={self.group_size} exceeds the {channels} input channels of this weight"
            )

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight_shape[1]

    @property
    def kernel_size(self) -> tuple[int, int]:
        return tuple(self.weight_shape[2:]) if len(self.weight_shape) == 4 else (1, 1)

    @property
    def num_groups(self) -> int:
        """Groups along C per (output channel[, kernel position])."""
        return -(-self.in_channels // self.group_size)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        k, g = self.out_channels, self.num_groups
        if self.grouping == "cluster" or len(self.weight_shape) == 2:
            return (k, g)
        return (k, g, *self.kernel_size)

    @property
    def total_groups(self) -> int:
        return int(np.prod(self.scale_shape))

    @property
    def num_weights(self) -> int:
        return int(np.prod(self.weight_shape))

    def members_per_group(self) -> np.ndarray:
        """Number of real (unpadded) weights in each group, shaped like ``scale_shape``."""
        n, c = self.group_size, self.in_channels
        per_c = np.full(self.num_groups, n, dtype=np.int64)
        per_c[-1] = c - (self.num_groups - 1) * n
        if self.grouping == "cluster":
            per_c = per_c * int(np.prod(self.kernel_size))
        shape = [1] * len(self.scale_shape)
        shape[1] = self.num_groups
        return np.broadcast_to(per_c.reshape(shape), self.scale_shape).copy()

    # --- gather / scatter between the weight tensor and a [groups, members] matrix ---

    def _kcrs(self, weight: np.ndarray) -> np.ndarray:
        w = np.asarray(weight)
        if w.shape != self.weight_shape:
            raise ValueError(f"weight shape {w.shape} does not match layout {self.weight_shape}")
        return w.reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def to_groups(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(members, mask)``, both ``[total_groups, max_members]``.

        Row order matches ``scale_shape`` flattened in C order, so per-group results reshape
        straight into ``scale_shape``. Padded slots hold 0 and ``mask`` False.
        """
        k, c = self.out_channels, self.in_channels
        r, s = self.kernel_size
        n, g = self.group_size, self.num_groups
        w = self._kcrs(weight)
        padded = np.zeros((k, g * n, r, s), dtype=w.dtype)
        padded[:, :c] = w
        valid = np.zeros((k, g * n, r, s), dtype=bool)
        valid[:, :c] = True
        out = []
        for arr in (padded, valid):
            arr = arr.reshape(k, g, n, r, s)
            if self.grouping == "fgq":
                arr = arr.transpose(0, 1, 3, 4, 2).reshape(-1, n)  # [K, G, R, S] x N
            else:
                arr = arr.reshape(k * g, n * r * s)  # [K, G] x (N*R*S)
            out.append(np.ascontiguousarray(arr))
        return out[0], out[1]

    def from_groups(self, members: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_groups` (padded slots are dropped)."""
        k, c = self.out_channels, self.in_channels
        r, s = self.kernel_size
        n, g = self.group_size, self.num_groups
        if self.grouping == "fgq":
            arr = members.reshape(k, g, r, s, n).transpose(0, 1, 4, 2, 3)
        else:
            arr = members.reshape(k, g, n, r, s)
        arr = arr.reshape(k, g * n, r, s)[:, :c]
        return np.ascontiguousarray(arr).reshape(self.weight_shape)

    def expand_to_kernel_codes(self, per_group: np.ndarray) -> np.ndarray:
        """Per-group array as the kernels take it: ``[K, G, R, S]`` (dense: ``[K, G, 1, 1]``)."""
        arr = np.asarray(per_group).reshape(self.scale_shape)
        r, s = self.kernel_size
        if arr.ndim == 2:
            arr = np.broadcast_to(arr[:, :, None, None], (*arr.shape, r, s))
        return np.ascontiguousarray(arr)

    def broadcast_to_weights(self, per_group: np.ndarray) -> np.ndarray:
        """Repeat a per-group value onto every weight of its group (shape ``weight_shape``)."""
        members, _ = self.to_groups(np.zeros(self.weight_shape, dtype=np.float32))
        filled = np.broadcast_to(np.asarray(per_group).reshape(-1, 1), members.shape)
        return self.from_groups(np.ascontiguousarray(filled))


def multiplications_removed(layout: GroupLayout) -> float:
    """Share of multiplications a ternary layer no longer needs.

    A ternary MAC is an add or a subtract; what remains is one scale multiply per group and
    output pixel, so the share removed is ``1 - groups / weights`` (``1 - 1/N`` for ``fgq``
    when N divides C; ``1 - 1/(N·R·S)`` for ``cluster``).
    """
    return 1.0 - layout.total_groups / layout.num_weights
