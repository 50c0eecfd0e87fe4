"""Reading what the user gives a compile, tune or eval: calibration / input arrays and image
folders (sampled across the folder, checked: numbers, samples, finite values, the model's input
shape) and the per-layer policy checked against the model before any long work.

Shared by the Python API (:mod:`tvm_ternary.api`) and the CLI (:mod:`tvm_ternary.commands`);
every problem is a one-line :class:`~tvm_ternary.errors.UserError`.

Example::

    >>> import numpy as np
    >>> check_samples(np.ones((2, 3), np.float32), source="x.npy", what="input").shape
    (2, 3)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import OptionError, UserError


def check_config(model, config) -> None:
    """The per-layer policy on ``model`` (a normalized ONNX model) without calibrating: an
    unknown ``--layer-bits`` name, N larger than a layer's channels, a model with nothing to
    quantize are one-line errors before any image is read or TVM is loaded."""
    from .errors import NoWeightedLayersError
    from .plan import analyse, decide
    from .plan.config import check_override_names

    layers = analyse(model).layers
    if not layers:
        raise NoWeightedLayersError("the model has no Conv/Gemm/MatMul layer with constant weights: "
                                    "nothing to quantize")
    check_override_names([(f.name, f.weight.op_type) for f in layers], config)
    if config.distill_epochs:
        _check_distillable(model)
    for i, fused in enumerate(layers):
        w = fused.weight
        decide(name=fused.name, op_type=w.op_type, depthwise=w.is_depthwise, is_first=w.reads_model_input,
               is_last=i == len(layers) - 1, in_channels=w.in_channels_per_group, config=config,
               pointwise=w.is_pointwise)


def _check_distillable(model) -> None:
    try:
        import torch  # noqa: F401  (the distillation's autograd)
    except ImportError:
        raise OptionError("--distill-epochs needs torch: pip install torch==2.13.0") from None
    from .plan.torch_graph import unsupported_ops

    missing = unsupported_ops(model)
    if missing:
        raise OptionError(f"--distill-epochs: no torch semantics for op(s) {', '.join(missing)} of this model")


def load_images(source: Path, *, preprocess, input_shape, limit: int | None, what: str) -> np.ndarray:
    """Images from a folder (needs a preprocessing preset) or a stacked ``.npy`` (used as is)."""
    from .preprocess import load_image_folder, preprocess_images

    source = Path(source)
    if source.suffix == ".npy" or source.is_file():
        arr = check_array(load_array(source, what=what), source=source, what=what, input_shape=input_shape)
        return check_samples(arr[:limit].astype(np.float32), source=source, what=what)
    if preprocess is None:
        raise OptionError(f"{what} images from a folder need --preprocess (or --mean/--std)")
    paths, _ = load_image_folder(source, limit=limit)
    if not paths:
        raise UserError(f"{source}: no images found")
    images = preprocess_images(paths, config=preprocess, input_shape=input_shape).astype(np.float32)
    return check_samples(images, source=source, what=what)


def load_array(source: Path, *, what: str) -> np.ndarray:
    """A numeric array from a ``.npy`` file; a one-line :class:`InputDataError` for anything
    else (a text file, an ``.npz`` archive, strings, pickled objects, no samples)."""
    from .errors import InputDataError

    source = Path(source)
    try:
        arr = np.load(source, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise InputDataError(f"{source}: cannot read {what} array ({error}); expected a .npy file "
                             "written by numpy.save") from None
    if not isinstance(arr, np.ndarray):  # np.load opens an .npz archive as a dict of arrays
        close = getattr(arr, "close", None)
        names = list(getattr(arr, "files", []))
        if close:
            close()
        raise InputDataError(f"{source}: an .npz archive ({', '.join(names[:4]) or 'empty'}), not one array; "
                             "save the array with numpy.save to a .npy")
    return check_array(arr, source=source, what=what)


def check_array(arr: np.ndarray, *, source, what: str, input_shape=None) -> np.ndarray:
    """``arr`` holds numbers and at least one sample (and, given ``input_shape``, samples of the
    model's input shape); a one-line :class:`InputDataError` / :class:`UserError` otherwise."""
    from .errors import InputDataError

    if arr.dtype.kind not in "biuf":
        raise InputDataError(f"{source}: {what} array holds {arr.dtype.name} values, not numbers")
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise InputDataError(f"{source}: {what} array has no samples (shape {arr.shape})")
    if input_shape is not None and (arr.ndim != len(input_shape)
                                    or tuple(arr.shape[1:]) != tuple(input_shape[1:])):
        raise UserError(f"{source}: {what} shape {arr.shape} does not fit the model input {tuple(input_shape)}")
    return arr


def check_samples(images: np.ndarray, *, source, what: str) -> np.ndarray:
    """Calibration/evaluation images must be finite; all zeros gets a warning (scales from
    nothing: every activation range collapses)."""
    import sys

    from .errors import InputDataError

    if len(images) == 0:
        raise InputDataError(f"{source}: no {what} samples")
    finite = np.isfinite(images)
    if not finite.all():
        raise InputDataError(f"{source}: {what} data has {int((~finite).sum())} NaN/Inf value(s); "
                             "activation scales cannot be calibrated on them")
    if not images.any():
        print(f"warning: {source}: every {what} sample is all zeros; activation scales calibrated on it "
              "are meaningless (wrong file or preprocessing?)", file=sys.stderr)
    return images


def load_calibration(source: Path, *, preprocess, input_shape, limit: int | None,
                     seed: int) -> tuple[np.ndarray, dict]:
    """Calibration images sampled across a folder or a stacked ``.npy``
    (:func:`~tvm_ternary.preprocess.sample_calibration`), and what was chosen (for the sidecar)."""
    from .preprocess import load_image_folder, preprocess_images, sample_calibration

    source = Path(source)
    info = {"source": str(source), "limit": limit, "seed": seed}
    if source.suffix == ".npy":
        arr = load_images(source, preprocess=preprocess, input_shape=input_shape, limit=None,
                          what="calibration")
        keep = sample_calibration(arr, limit, seed=seed)
        info.update(available=len(arr), images=len(keep), indices=keep)
        return arr[keep], info
    if preprocess is None:
        raise OptionError("calibration images from a folder need --preprocess (or --mean/--std)")
    paths, _ = load_image_folder(source, limit=limit, sample_seed=seed)
    if not paths:
        raise UserError(f"{source}: no images found")
    info.update(images=len(paths), files=[p.name for p in paths])
    images = preprocess_images(paths, config=preprocess, input_shape=input_shape).astype(np.float32)
    return check_samples(images, source=source, what="calibration"), info


def policy_check_set(source, *, calibration: dict, preprocess, input_shape, limit: int, seed: int):
    """The images the sensitivity policy checks its budget on: up to ``limit`` of ``source``'s
    images that calibration did not take (``calibration``: the record ``load_calibration`` /
    ``api.calibration_images`` returned), sampled (seeded), with their labels when the folder
    has a ``labels.txt``. None when nothing is left (the policy then holds out part of the
    calibration images instead). Returns a :class:`~tvm_ternary.plan.sensitivity.CheckSet`."""
    from .plan.sensitivity import CheckSet
    from .preprocess import load_image_folder, preprocess_images, sample_calibration

    if isinstance(source, np.ndarray) or Path(source).suffix == ".npy":
        arr = source if isinstance(source, np.ndarray) else np.load(source, mmap_mode="r")
        used = set(calibration.get("indices", range(len(arr))))
        rest = [i for i in range(len(arr)) if i not in used]
        if not rest:
            return None
        pick = [rest[i] for i in sample_calibration(rest, limit, seed=seed + 1)]
        return CheckSet(images=np.asarray(arr[pick], dtype=np.float32), labels=None,
                        source=f"{len(pick)} samples of {'the array' if isinstance(source, np.ndarray) else source} "
                               "not used for calibration")
    paths, labels = load_image_folder(Path(source))
    used = set(calibration.get("files", ()))
    rest = [i for i, p in enumerate(paths) if p.name not in used]
    if not rest:
        return None
    pick = [rest[i] for i in sample_calibration(rest, limit, seed=seed + 1)]
    images = preprocess_images([paths[i] for i in pick], config=preprocess, input_shape=input_shape)
    return CheckSet(images=check_samples(images.astype(np.float32), source=source, what="calibration"),
                    labels=None if labels is None else np.asarray([labels[i] for i in pick]),
                    source=f"{len(pick)} images of {source} not used for calibration"
                           + (", labelled" if labels is not None else ""))
