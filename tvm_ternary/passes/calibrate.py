"""Pass 2: run the float model on calibration images and collect per-tensor activation ranges.

The float Relax module is compiled once by TVM (untuned, zero pipeline) with the watched tensors
added as extra outputs (:func:`tvm_adapter.with_extra_outputs`), then run image by image.

Why TVM and not a numpy interpreter or ONNX Runtime: ONNX Runtime may not be a dependency of
the compiler, and a numpy interpreter would re-implement every op the frontend can emit. Untuned
TVM is slow per conv, though (~2-4 GFLOP/s: 64->64 3x3 at 56x56 takes 116-150 ms, numpy's
im2col + BLAS 12 ms), so by default each conv2d runs in numpy through a packed function
(:mod:`.calib_offload`) and TVM runs everything else. Measured on 2 cores shared with other
jobs (load 3-4, so ±50 %), 32 images including the build: SqueezeNet 2.7-4.6 img/s (all-TVM
2.0-2.5), MobileNetV2 1.7-2.6 img/s (all-TVM 2.9-3.3: its depthwise and small 1x1 convs gain
nothing; ``conv_backend="tvm"`` there). Dense 3x3 convs (ResNet) gain ~10x per conv.

Per tensor we keep exact min / max / max|x| and a histogram of |x| with a fixed number of bins
whose width doubles (merging bin pairs) whenever a larger value arrives, as TensorRT's
calibrator does: percentiles and KL/MSE searches need the tail, which a random sample misses.

Example::

    >>> imported = import_onnx("model.onnx")                                  # doctest: +SKIP
    >>> images = calibration_inputs("val200", preprocess=PreprocessConfig.preset("caffe"),
    ...                             input_shape=imported.input_shape, limit=32)  # doctest: +SKIP
    >>> result = calibrate(imported, images=images)                           # doctest: +SKIP
    >>> result.layers[0].input.percentile(99.99)                              # doctest: +SKIP
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tvm_ternary import tvm_adapter as ta
from tvm_ternary.errors import UserError
from tvm_ternary.passes.calib_offload import NumpyConvOffload
from tvm_ternary.passes.import_onnx import ImportedModel
from tvm_ternary.preprocess import PreprocessConfig, load_image, load_image_folder

__all__ = ["TensorStats", "LayerStats", "CalibrationResult", "calibrate", "calibration_inputs"]

HISTOGRAM_BINS = 2048


@dataclass(frozen=True, eq=False)  # eq=False: numpy field
class TensorStats:
    """Range of one tensor over all calibration images.

    ``histogram[i]`` counts values with ``|x|`` in ``[i·bin_width, (i+1)·bin_width)`` (the last
    bin is closed); ``bin_width · len(histogram) ≥ absmax``.
    """

    name: str
    min: float
    max: float
    count: int
    histogram: np.ndarray  # int64 [HISTOGRAM_BINS], read-only
    bin_width: float

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max))

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile of ``|x|`` (upper edge of its bin; exact ``absmax`` at 100)."""
        if not 0 < q <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {q}")
        if q == 100 or self.count == 0:
            return self.absmax
        cumulative = np.cumsum(self.histogram)
        index = int(np.searchsorted(cumulative, q / 100 * self.count))
        return min(self.absmax, (index + 1) * self.bin_width)

    def to_dict(self) -> dict:
        """A JSON-able summary (no histogram)."""
        return dict(min=self.min, max=self.max, absmax=self.absmax,
                    p99_99=self.percentile(99.99), count=self.count)


@dataclass(frozen=True)
class LayerStats:
    """Input and output ranges of one conv/dense layer (``ImportedModel.layers`` order)."""

    name: str
    var_name: str
    input: TensorStats
    output: TensorStats  # the conv2d/matmul result itself, before bias and activation


@dataclass(frozen=True)
class CalibrationResult:
    """``tensors`` holds every watched tensor by Relax var name (the input by its param name)."""

    tensors: Mapping[str, TensorStats]
    layers: tuple[LayerStats, ...]
    num_images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else float("inf")


class _Accumulator:
    """Running min/max and a doubling-width histogram of |x| for one tensor."""

    def __init__(self, name: str):
        self.name, self.min, self.max, self.count = name, np.inf, -np.inf, 0
        self.counts = np.zeros(HISTOGRAM_BINS, np.int64)
        self.width = 0.0

    def add(self, values: np.ndarray) -> None:
        values = np.abs(values.reshape(-1), dtype=np.float32)  # abs of a copy; min/max below
        if not np.isfinite(values).all():
            raise UserError(f"calibration: tensor {self.name} has NaN/Inf values")
        absmax = float(values.max()) if values.size else 0.0
        if absmax > 0 and self.width == 0.0:
            self.width = absmax / HISTOGRAM_BINS
        while absmax > self.width * HISTOGRAM_BINS:  # widen: merge pairs, keep the counts exact
            self.counts = np.concatenate([self.counts.reshape(-1, 2).sum(axis=1),
                                          np.zeros(HISTOGRAM_BINS // 2, np.int64)])
            self.width *= 2
        if self.width > 0:
            index = np.minimum((values / np.float32(self.width)).astype(np.int64),
                               HISTOGRAM_BINS - 1)
            self.counts += np.bincount(index, minlength=HISTOGRAM_BINS)
        else:
            self.counts[0] += values.size
        self.count += values.size

    def add_signed(self, values: np.ndarray) -> None:
        if values.size:
            self.min = min(self.min, float(values.min()))
            self.max = max(self.max, float(values.max()))
        self.add(values)

    def result(self) -> TensorStats:
        counts = self.counts.copy()
        counts.setflags(write=False)
        return TensorStats(name=self.name, min=float(self.min), max=float(self.max),
                           count=self.count, histogram=counts, bin_width=self.width)


def calibration_inputs(
    source: str | Path, *, preprocess: PreprocessConfig | None, input_shape: Sequence[int],
    limit: int | None = None,
) -> list[Path] | np.ndarray:
    """The calibration set: image paths of a folder, or the samples of a stacked ``.npy``.

    A ``.npy`` holds already preprocessed samples ``[N, *input_shape[1:]]`` (or one sample of
    ``input_shape``); a folder needs ``preprocess``. ``limit`` keeps the first N.
    """
    source = Path(source)
    if limit is not None and limit <= 0:
        raise UserError(f"--calib-limit must be positive, got {limit}")
    if source.suffix == ".npy":
        try:
            data = np.load(source, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise UserError(f"{source}: cannot read calibration array: {error}") from None
        sample_shape = tuple(int(d) for d in input_shape[1:])
        if tuple(data.shape) == tuple(input_shape):
            data = data.reshape(1, *sample_shape)
        if data.ndim != len(input_shape) or tuple(data.shape[1:]) != sample_shape:
            raise UserError(f"{source}: calibration array has shape {tuple(data.shape)}, "
                            f"expected [N, {', '.join(map(str, sample_shape))}]")
        if data.shape[0] == 0:
            raise UserError(f"{source}: calibration array is empty")
        return np.asarray(data[:limit])
    if preprocess is None:
        raise UserError("calibrating on an image folder needs a preprocessing preset "
                        "(--preprocess torchvision|caffe|unit, or --mean/--std)")
    paths, _ = load_image_folder(source, limit=limit)
    return paths


def calibrate(
    imported: ImportedModel,
    *,
    images: Sequence[Path] | np.ndarray,
    preprocess: PreprocessConfig | None = None,
    watch: str = "layers",
    conv_backend: str = "numpy",
    target=None,
    progress: bool = True,
) -> CalibrationResult:
    """Run ``imported.module`` on every calibration sample and collect activation statistics.

    ``images`` comes from :func:`calibration_inputs`: image paths (decoded with ``preprocess``)
    or an array of preprocessed samples. ``watch="layers"`` collects the input and output of
    every conv/dense; ``watch="all"`` every float tensor binding (for epilogue/requantize
    choices on ops between layers). ``conv_backend="numpy"`` runs conv2d in numpy/BLAS
    (:mod:`.calib_offload`, several times faster than untuned TVM on big convs), ``"tvm"``
    keeps everything in TVM. Progress goes to stderr (tqdm).

    Example::

        >>> result = calibrate(imported, images=np.zeros((2, 3, 224, 224), np.float32),
        ...                    progress=False)  # doctest: +SKIP
        >>> result.num_images  # doctest: +SKIP
        2
    """
    if watch not in ("layers", "all"):
        raise ValueError(f"watch must be 'layers' or 'all', got {watch!r}")
    if conv_backend not in ("numpy", "tvm"):
        raise ValueError(f"conv_backend must be 'numpy' or 'tvm', got {conv_backend!r}")
    if len(images) == 0:
        raise UserError("calibration set is empty")
    if not isinstance(images, np.ndarray) and preprocess is None:
        raise UserError("calibrating on image files needs a preprocessing config")
    mod = imported.module
    # The frontend sanitises names ("input.1" -> "input_1"): key the input by the Relax param.
    model_input = ta.var_name(mod["main"].params[0])
    bindings = ta.conv_dense_bindings(mod)
    input_names = [_data_arg_name(call) for _, call in bindings]
    watched = _watched_names(mod, bindings, input_names, watch, model_input)
    start = time.perf_counter()
    watched_mod = ta.with_extra_outputs(mod, watched)
    offload = NumpyConvOffload(watched_mod) if conv_backend == "numpy" else None
    accumulators = {name: _Accumulator(name) for name in [model_input, *watched]}
    try:
        vm = ta.build_relax_vm(offload.module if offload else watched_mod, target=target)
        for sample in _progress(images, progress):
            if isinstance(images, np.ndarray):
                x = np.asarray(sample, np.float32)[None]
            else:
                x = load_image(sample, config=preprocess, size=tuple(imported.input_shape[2:]))
            x = x.reshape(imported.input_shape)  # model batch 1: one sample per run
            outputs = ta.run_relax_vm(vm, x)
            accumulators[model_input].add_signed(x)
            for name, value in zip(watched, outputs[1:]):
                accumulators[name].add_signed(value)
    finally:
        if offload is not None:
            offload.close()
    stats = {name: acc.result() for name, acc in accumulators.items()}
    layers = tuple(
        LayerStats(name=info.name, var_name=info.var_name, input=stats[in_name],
                   output=stats[info.var_name])
        for info, in_name in zip(imported.layers, input_names))
    return CalibrationResult(tensors=stats, layers=layers, num_images=len(images),
                             seconds=time.perf_counter() - start)


def _data_arg_name(call) -> str:
    name = ta.var_name(call.args[0]) if hasattr(call.args[0], "name") else None
    if name is None:
        raise UserError("calibration: a conv/dense input is not a named tensor")
    return name


def _watched_names(mod, bindings, input_names, watch: str, model_input: str) -> list[str]:
    """Binding names to expose, in program order, without duplicates or the model input."""
    if watch == "all":
        names = [ta.var_name(var) for var, value in ta.main_bindings(mod)
                 if ta.tensor_dtype(var) in ("float32", "float16") and ta.static_shape(var)]
    else:
        names = list(input_names) + [ta.var_name(var) for var, _ in bindings]
    seen, ordered = {model_input}, []
    for name in names:
        if name not in seen:
            seen.add(name)
            ordered.append(name)
    return ordered


def _progress(items: Iterable, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm import tqdm  # lazy: only a person watching needs it
    except ImportError:
        return items
    return tqdm(items, desc="calibrating", unit="img", file=sys.stderr, leave=False)
