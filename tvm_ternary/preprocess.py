"""Image preprocessing for ImageNet-style classifiers (numpy + pillow only).

Decode as RGB, resize the short side to ``resize`` (256) bilinearly, centre-crop to the model's
input size (224), then scale, reorder channels and normalise per a preset or a custom
mean/std, and lay out as NCHW in the model input's dtype.

Presets (``mean``/``std`` apply to values already multiplied by ``scale``):

* ``torchvision``: RGB, /255, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)
* ``caffe``: BGR, 0-255, mean (104, 117, 123) in B, G, R order, std 1
* ``unit``: RGB, /255

Example::

    >>> config = PreprocessConfig.preset("caffe")
    >>> config.bgr, config.scale, config.mean
    (True, 1.0, (104.0, 117.0, 123.0))
    >>> batch = preprocess_images(["cat.jpg"], config=config, input_shape=(1, 3, 224, 224),
    ...                           dtype="float16")  # doctest: +SKIP
    >>> batch.shape, batch.dtype  # doctest: +SKIP
    ((1, 3, 224, 224), dtype('float16'))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tvm_ternary.errors import UserError

__all__ = ["PRESETS", "PreprocessConfig", "load_image", "preprocess_images", "load_image_folder",
           "sample_calibration"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CALIB_SEED = 0  # default seed of the calibration sample (recorded in the sidecar)

PRESETS = {
    "torchvision": dict(bgr=False, scale=1 / 255, mean=(0.485, 0.456, 0.406),
                        std=(0.229, 0.224, 0.225)),
    "caffe": dict(bgr=True, scale=1.0, mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0)),
    "unit": dict(bgr=False, scale=1 / 255, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
}


@dataclass(frozen=True)
class PreprocessConfig:
    """How to turn an image file into a model input; validated when made.

    ``mean``/``std`` are in the channel order the model sees (B, G, R when ``bgr``), applied
    after ``scale``: ``x = (pixel · scale − mean) / std``.
    """

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    scale: float = 1.0
    bgr: bool = False
    resize: int = 256  # short side before the centre crop; scaled for other input sizes
    name: str = "custom"

    def __post_init__(self):
        object.__setattr__(self, "mean", _three(self.mean, "mean"))
        object.__setattr__(self, "std", _three(self.std, "std"))
        if any(s <= 0 for s in self.std):
            raise UserError(f"preprocess std must be positive, got {self.std}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise UserError(f"preprocess scale must be a positive number, got {self.scale}")
        if int(self.resize) != self.resize or self.resize <= 0:
            raise UserError(f"preprocess resize must be a positive integer, got {self.resize}")

    @classmethod
    def preset(cls, name: str) -> PreprocessConfig:
        """One of :data:`PRESETS` by name."""
        if name not in PRESETS:
            raise UserError(f"unknown preprocess preset {name!r}; choose one of "
                            f"{', '.join(PRESETS)}")
        return cls(name=name, **PRESETS[name])

    @classmethod
    def from_options(
        cls, *, preset: str | None = None, mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None, bgr: bool | None = None,
    ) -> PreprocessConfig:
        """The CLI's ``--preprocess P --mean R,G,B --std R,G,B --bgr``: options override a preset.

        Custom mean/std without a preset are on the 0-1 scale when they are all ≤ 1 (torchvision
        style), else on the 0-255 scale (caffe style).

        Example::

            >>> PreprocessConfig.from_options(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).scale
            0.00392156862745098
        """
        if preset is not None:
            base = PRESETS.get(preset)
            if base is None:
                raise UserError(f"unknown preprocess preset {preset!r}; choose one of "
                                f"{', '.join(PRESETS)}")
            base = dict(base)
        else:
            values = list(mean or ()) + list(std or ())
            unit_scale = bool(values) and all(abs(v) <= 1.0 for v in values)
            base = dict(bgr=False, scale=1 / 255 if unit_scale else 1.0,
                        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        if mean is not None:
            base["mean"] = mean
        if std is not None:
            base["std"] = std
        if bgr is not None:
            base["bgr"] = bgr
        custom = preset is None or mean is not None or std is not None or bgr is not None
        return cls(name="custom" if custom else preset, **base)

    def to_dict(self) -> dict:
        """For the sidecar JSON."""
        return dict(name=self.name, mean=list(self.mean), std=list(self.std), scale=self.scale,
                    bgr=self.bgr, resize=self.resize)


def _three(values, what: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise UserError(f"preprocess {what} must be three numbers, got {values!r}") from None
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise UserError(f"preprocess {what} must be three finite numbers, got {values!r}")
    return out


def _to_rgb(image):
    """8-bit RGB by the image's real bit depth. Pillow's ``convert("RGB")`` clips a 16-bit
    grayscale image (mode ``I;16``/``I``) at 255 instead of scaling it: all white."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else values.max()
        gray = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")


def load_image(
    path: str | Path, *, config: PreprocessConfig, size: tuple[int, int] = (224, 224)
) -> np.ndarray:
    """One image as float32 ``[3, H, W]``, preprocessed per ``config``.

    The short side is resized to ``config.resize · min(size) / 224`` (256 for 224 crops, as the
    reference pipelines do), then the centre ``size`` crop is taken.
    """
    from PIL import Image, UnidentifiedImageError  # lazy: only image input needs pillow

    height, width = size
    try:
        with Image.open(path) as image:
            image = _to_rgb(image)
            short = round(config.resize * min(height, width) / 224)
            w, h = image.size
            ratio = short / min(w, h)
            new_w, new_h = max(width, round(w * ratio)), max(height, round(h * ratio))
            image = image.resize((new_w, new_h), Image.BILINEAR)
            left, top = (new_w - width) // 2, (new_h - height) // 2
            image = image.crop((left, top, left + width, top + height))
            pixels = np.asarray(image, dtype=np.float32)  # [H, W, RGB]
    except FileNotFoundError:
        raise UserError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(f"{path}: cannot decode image: {error}") from None
    if config.bgr:
        pixels = pixels[:, :, ::-1]
    mean = np.asarray(config.mean, np.float32)
    std = np.asarray(config.std, np.float32)
    pixels = (pixels * np.float32(config.scale) - mean) / std
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def preprocess_images(
    paths: Sequence[str | Path], *, config: PreprocessConfig,
    input_shape: Sequence[int] = (1, 3, 224, 224), dtype: str = "float32",
) -> np.ndarray:
    """Images stacked as ``[len(paths), 3, H, W]`` in ``dtype`` (the model input's dtype).

    ``input_shape`` is the model's NCHW input shape; its batch is ignored.
    """
    if len(input_shape) != 4 or int(input_shape[1]) != 3:
        raise UserError(f"image preprocessing needs an NCHW input with 3 channels, the model "
                        f"takes {tuple(input_shape)}")
    size = (int(input_shape[2]), int(input_shape[3]))
    batch = [load_image(p, config=config, size=size) for p in paths]
    return np.stack(batch).astype(dtype) if batch else np.zeros((0, 3, *size), dtype)


def sample_calibration(items: Sequence, limit: int | None, *, seed: int = CALIB_SEED) -> list[int]:
    """Indices of ``limit`` items spread across ``items`` (seeded, reproducible), in order.

    A user's folder is often sorted by class, so its first N images would be a few classes
    only: calibration takes a uniform random sample instead of a prefix. All items when
    ``limit`` is None or not smaller than ``len(items)``.

    Example::

        >>> sample_calibration(list("abcdefgh"), 3, seed=0)
        [4, 5, 7]
    """
    n = len(items)
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(n, size=limit, replace=False))


def load_image_folder(
    directory: str | Path, *, limit: int | None = None, sample_seed: int | None = None
) -> tuple[list[Path], list[int] | None]:
    """Image paths of a folder and their labels from ``labels.txt`` (``file,label`` lines).

    Without ``labels.txt`` the folder's images are taken in name order and labels are None.
    ``limit`` keeps the first N (in ``labels.txt`` order), or with ``sample_seed`` N sampled
    across the folder (:func:`sample_calibration`; how calibration images are chosen).

    Example::

        >>> paths, labels = load_image_folder("../shared/data/imagenet/images/val200",
        ...                                   limit=2)  # doctest: +SKIP
        >>> len(paths), labels  # doctest: +SKIP
        (2, [65, 970])
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: not a directory of images")
    if limit is not None and limit <= 0:
        raise UserError(f"--calib-limit must be positive, got {limit}")
    labels_file = directory / "labels.txt"
    if not labels_file.exists():
        paths = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise UserError(f"{directory}: no images and no labels.txt")
        if sample_seed is not None:
            return [paths[i] for i in sample_calibration(paths, limit, seed=sample_seed)], None
        return paths[:limit], None
    paths, labels = [], []
    for number, line in enumerate(labels_file.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, label = line.rpartition(",")
        try:
            label_value = int(label)
        except ValueError:
            label_value = None
        if not sep or not name.strip() or label_value is None:
            raise UserError(f"{labels_file}:{number}: expected 'file,label', got {line!r}")
        path = directory / name.strip()
        if not path.is_file():
            raise UserError(f"{labels_file}:{number}: {path.name} is not in {directory}")
        paths.append(path)
        labels.append(label_value)
        if sample_seed is None and limit is not None and len(paths) >= limit:
            break
    if not paths:
        raise UserError(f"{labels_file}: no entries")
    if sample_seed is not None:
        keep = sample_calibration(paths, limit, seed=sample_seed)
        return [paths[i] for i in keep], [labels[i] for i in keep]
    return paths, labels
