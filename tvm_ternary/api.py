"""The public Python API: ``tvm_ternary.compile``, ``tvm_ternary.load``, ``tvm_ternary.QuantConfig``.

``import tvm_ternary`` stays light: these names are imported on first use (the package's
``__getattr__``), so only ``compile`` pulls in the compiler and only ``load`` the TVM runtime.
The ``tvm-ternary compile`` and ``run`` commands are built on these two functions.

Example (``model.onnx`` a float ONNX CNN with a 16x16 input and 10 classes, ``calib.npy`` stacked
calibration images, ``x`` float32 images)::

    >>> import tvm_ternary as tt
    >>> m = tt.compile("model.onnx", calib="calib.npy", config=tt.QuantConfig(method="exact"))
    >>> meta = m.export("exported.so")          # exported.so + exported.so.json
    >>> tt.load("exported.so").run(x).shape
    (2, 10)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import OptionError, UserError

__all__ = ["compile", "load"]


def compile(model, *, calib, config=None, target: str | None = "host", preprocess=None,
            calib_limit: int | None = None, input_shapes: dict | None = None, tuning_db=None,
            progress: bool = True):
    """Quantize an ONNX CNN and compile it; returns a ``CompiledModel`` (``.run(x)``,
    ``.export(path)``, ``.coverage``).

    ``model``: path of a float ONNX model or an ``onnx.ModelProto``. ``calib``: calibration
    images, a stacked float array ``[N, C, H, W]``, a ``.npy`` of one, or an image folder (then
    ``preprocess`` is needed: ``"caffe"``, ``"torchvision"``, ``"unit"`` or a
    ``PreprocessConfig``; it is also recorded in the exported sidecar). ``config``: a
    :class:`QuantConfig` (default ternary weights, N = 4, 8-bit activations). ``target``:
    ``"host"`` or an LLVM mcpu (``"icelake-server"``, ``"znver4"``, ``"haswell"``).
    ``calib_limit``: use the first N images. ``input_shapes``: ``{"input": (1, 3, 224, 224)}``
    for a model with a dynamic batch. ``tuning_db``: a ``tvm-ternary tune`` database folder.
    Every argument is checked before any work starts; bad ones raise :class:`UserError`.

    Example::

        >>> import tvm_ternary as tt
        >>> m = tt.compile("model.onnx", calib="calib.npy", config=tt.QuantConfig(method="exact"))
        >>> m.coverage[0]["layer"], m.coverage[0]["weights"], m.coverage[1]["weights"]
        ('conv1', 'int8', 'ternary')
        >>> m.run(x).shape
        (2, 10)
        >>> tt.compile("model.onnx", calib="calib.npy", config={"group_size": 4})
        Traceback (most recent call last):
        ...
        tvm_ternary.errors.OptionError: config must be a tvm_ternary.QuantConfig, got dict
    """
    import onnx

    from .plan import QuantConfig

    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise OptionError(f"config must be a tvm_ternary.QuantConfig, got {type(config).__name__}")
    if not isinstance(model, (str, Path, onnx.ModelProto)):
        raise OptionError(f"model must be an ONNX file path or onnx.ModelProto, got {type(model).__name__}")
    if target is not None and not isinstance(target, str):
        raise OptionError(f"target must be 'host' or an LLVM mcpu name, got {type(target).__name__}")
    if calib_limit is not None and (not isinstance(calib_limit, int) or calib_limit < 1):
        raise OptionError(f"calib_limit must be a positive integer, got {calib_limit!r}")
    if not isinstance(calib, (np.ndarray, str, Path)):
        raise OptionError(f"calib must be an image array, a .npy file or an image folder, got {type(calib).__name__}")
    if isinstance(calib, (str, Path)) and not Path(calib).exists():
        raise UserError(f"{calib}: cannot read calibration array or folder (no such path)")
    preprocess = _preprocess(preprocess)
    if isinstance(calib, (str, Path)) and Path(calib).is_dir() and preprocess is None:
        raise OptionError("calibration images from a folder need preprocess= ('caffe', 'torchvision', "
                          "'unit' or a PreprocessConfig)")
    target_obj = _target(None if target in (None, "host") else target)
    kernels = None
    if tuning_db is not None:  # opened now: a missing or foreign database is reported before any work
        from .tuning import TunedKernels, open_database

        kernels = TunedKernels(open_database(Path(tuning_db), target=target_obj, create=False))

    from . import onnx_io
    from .compiler import compile_model
    from .passes.onnx_normalize import normalize_onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx_io.load_model(model)
    prep = normalize_onnx(model, input_shapes=input_shapes)
    images = calibration_images(calib, preprocess=preprocess, input_shape=prep.input_shape, limit=calib_limit)
    return compile_model(model, config=config, calib_images=images, target=target_obj, input_shapes=input_shapes,
                         kernels=kernels, progress=progress, preprocess=preprocess)


def load(path):
    """Load a library written by ``compile(...).export`` or ``tvm-ternary compile`` (runtime only:
    works with ``TVM_USE_RUNTIME_LIB=1``). The sidecar ``path.json`` is checked first: it must
    describe this very file and name only CPU features this host has. Returns a
    ``LoadedModel``: ``.run(x)`` (samples stacked along axis 0), ``.metadata`` (the sidecar).

    Example::

        >>> import tvm_ternary as tt
        >>> model = tt.load("model.so")
        >>> model.metadata["input"]["shape"], model.metadata["quant_config"]["weight_bits"]
        ([1, 3, 16, 16], 2)
        >>> model.run(x).shape
        (2, 10)
        >>> tt.load("missing.so")
        Traceback (most recent call last):
        ...
        tvm_ternary.errors.UserError: missing.so: no such library
    """
    from .runtime import load as load_library

    if not isinstance(path, (str, Path)):
        raise OptionError(f"path must be a library file path, got {type(path).__name__}")
    return load_library(path)


def calibration_images(source, *, preprocess, input_shape, limit: int | None) -> np.ndarray:
    """float32 ``[N, ...]`` images from an array, a stacked ``.npy`` or an image folder."""
    from .preprocess import load_image_folder, preprocess_images

    if isinstance(source, np.ndarray):
        arr, where = source, "calibration array"
    elif Path(source).is_dir():
        paths, _ = load_image_folder(Path(source), limit=limit)
        if not paths:
            raise UserError(f"{source}: no images found")
        return preprocess_images(paths, config=preprocess, input_shape=input_shape).astype(np.float32)
    else:
        try:
            arr = np.load(source, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise UserError(f"{source}: cannot read calibration array ({error})") from None
        where = str(source)
    if arr.ndim != len(input_shape) or tuple(arr.shape[1:]) != tuple(input_shape[1:]):
        raise UserError(f"{where}: calibration shape {arr.shape} does not fit the model input {tuple(input_shape)}")
    if not np.issubdtype(arr.dtype, np.number):
        raise UserError(f"{where}: calibration images must be numbers, got dtype {arr.dtype}")
    return arr[:limit].astype(np.float32)


def _preprocess(preprocess):
    from .preprocess import PRESETS, PreprocessConfig

    if preprocess is None or isinstance(preprocess, PreprocessConfig):
        return preprocess
    if isinstance(preprocess, str) and preprocess in PRESETS:
        return PreprocessConfig.preset(preprocess)
    raise OptionError(f"preprocess must be one of {sorted(PRESETS)} or a PreprocessConfig, got {preprocess!r}")


def _target(name):
    from . import tvm_adapter as ta

    if name is not None and not ta.is_known_cpu(name):  # LLVM would build for "generic" instead
        raise OptionError(f"target {name!r}: not a CPU LLVM knows (e.g. icelake-server, znver4, haswell; "
                          f"this host is {ta.host_cpu()})")
    try:
        return ta.as_target(name)
    except Exception as error:  # TVM raises its own error types for an unknown mcpu
        raise OptionError(f"target {name!r}: not a CPU LLVM knows ({error})") from None
