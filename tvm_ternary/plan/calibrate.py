"""Activation statistics of the float network on calibration images (numpy executor).

For every tensor the quantized network stores as integers (each fused layer's input, output
and residual operand) this keeps its min, max and a fixed-size random sample of values, enough
for min-max, dynamic fixed point, percentile and MSE scales. It streams: images go through in
batches and each batch adds its share of the sample, so memory does not grow with the number
of calibration images.

Example::

    >>> import numpy as np
    >>> stats = TensorStats.empty()
    >>> stats.update(np.array([-1.0, 3.0]), rng=np.random.default_rng(0))
    >>> stats.minimum, stats.maximum, stats.signed
    (-1.0, 3.0, True)
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from ..numpy_graph import NumpyGraph
from ..progress import progress as progress_bar
from ..quant import ActivationQuant, calibrate_activation

SAMPLE_SIZE = 200_000  # values kept per tensor for percentile / MSE scales


@dataclass
class TensorStats:
    minimum: float = np.inf
    maximum: float = -np.inf
    samples: list = field(default_factory=list)

    @classmethod
    def empty(cls) -> "TensorStats":
        return cls()

    @property
    def signed(self) -> bool:
        return self.minimum < 0

    def update(self, values: np.ndarray, *, rng: np.random.Generator, share: float = 1.0) -> None:
        """Add a batch; ``share``: its fraction of the whole calibration set (it keeps that
        fraction of the SAMPLE_SIZE values)."""
        flat = np.asarray(values, dtype=np.float32).ravel()
        self.minimum = float(min(self.minimum, flat.min()))
        self.maximum = float(max(self.maximum, flat.max()))
        take = min(flat.size, max(1, int(np.ceil(SAMPLE_SIZE * share))))
        self.samples.append(rng.choice(flat, size=take, replace=False) if take < flat.size else flat.copy())

    def merged(self, other: "TensorStats") -> "TensorStats":
        return TensorStats(min(self.minimum, other.minimum), max(self.maximum, other.maximum),
                           self.samples + other.samples)

    def quant(self, *, bits: int, method: str, signed: bool | None = None) -> ActivationQuant:
        """Scale for this tensor; ``signed`` defaults to whether it ever went negative."""
        values = np.concatenate(self.samples)
        values = np.append(values, [self.minimum, self.maximum])  # the extremes are never lost
        signed = self.signed if signed is None else signed
        return calibrate_activation(values, bits=bits, signed=signed, method=method)


def collect_stats(graph: NumpyGraph, images: np.ndarray, *, tensors: set[str],
                  batch: int = 16, progress: bool = True, seed: int = 0) -> dict[str, TensorStats]:
    """Run the float ``graph`` over ``images`` [N, ...] in batches; stats for ``tensors``.

    Each tensor samples from its own random stream (seeded by ``seed`` and the tensor's name),
    so its sample, and so a percentile or MSE scale, is the same whichever other tensors are
    collected and in whatever order a set of names iterates (which changes from one Python
    process to the next)."""
    rngs = {t: np.random.default_rng([seed, zlib.crc32(t.encode())]) for t in tensors}
    stats = {t: TensorStats.empty() for t in tensors}
    total = len(images)
    bar = progress_bar(total, desc="calibrating", unit="images", enabled=progress)
    for start in range(0, total, batch):
        part = images[start : start + batch]
        kept = graph.run(part, keep=set(tensors))
        share = len(part) / total
        for name in tensors:
            if name in kept:
                stats[name].update(kept[name], rng=rngs[name], share=share)
            elif name == graph.input_names[0]:
                stats[name].update(part, rng=rngs[name], share=share)
        bar.update(len(part))
    bar.close()
    return stats
