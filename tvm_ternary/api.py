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

import dataclasses
import sys
from pathlib import Path

import numpy as np

from .errors import OptionError, UserError

__all__ = ["compile", "load"]


def compile(model, *, calib=None, config=None, target: str | None = "host", preprocess=None,
            calib_limit: int | None = None, calib_seed: int | None = None,
            input_shapes: dict | None = None, tuning_db=None, max_drop: float | None = None,
            progress: bool = True):
    """Quantize an ONNX CNN and compile it; returns a ``CompiledModel`` (``.run(x)``,
    ``.export(path)``, ``.coverage``).

    ``model``: path of an ONNX model or an ``onnx.ModelProto``: float, or already quantized (QDQ:
    its own activation scales and weights are used, ``calib`` is not needed). ``calib``: calibration
    images, a stacked float array ``[N, C, H, W]``, a ``.npy`` of one, or an image folder (then
    ``preprocess`` is needed: ``"caffe"``, ``"torchvision"``, ``"unit"`` or a
    ``PreprocessConfig``; it is also recorded in the exported sidecar). ``config``: a
    :class:`QuantConfig` (default ternary weights, N = 4, 8-bit activations). ``target``:
    ``"host"`` or an LLVM mcpu (``"icelake-server"``, ``"znver4"``, ``"haswell"``).
    ``calib_limit``: use the first N images. ``input_shapes``: ``{"input": (1, 3, 224, 224)}``
    for a model with a dynamic batch. ``tuning_db``: a ``tvm-ternary tune`` database folder.
    ``max_drop``: the per-layer sensitivity policy (:func:`plan.sensitivity.choose_precision`)
    picks ternary / 4 / 8-bit per layer, as many MACs ternary as keep the top-1 points lost
    within ``max_drop``, checked on images of ``calib`` that calibration did not take (accuracy
    when the folder has a ``labels.txt``, else agreement with the float model); ``config.weight_bits``
    must then be 2 (the default).
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
    if max_drop is not None and (isinstance(max_drop, bool) or not isinstance(max_drop, (int, float))
                                 or not 0 <= max_drop <= 100):
        raise OptionError(f"max_drop must be a number of points in [0, 100], got {max_drop!r}")
    if max_drop is not None and config.weight_bits != 2:
        raise OptionError("max_drop chooses each layer's weight bits itself: leave weight_bits at 2")
    if calib_limit is not None and (not isinstance(calib_limit, int) or calib_limit < 1):
        raise OptionError(f"calib_limit must be a positive integer, got {calib_limit!r}")
    if calib is not None and not isinstance(calib, (np.ndarray, str, Path)):
        raise OptionError(f"calib must be an image array, a .npy file or an image folder, got {type(calib).__name__}")
    if isinstance(calib, (str, Path)) and not Path(calib).exists():
        raise UserError(f"{calib}: cannot read calibration array or folder (no such path)")
    preprocess = _preprocess(preprocess)
    if isinstance(calib, (str, Path)) and Path(calib).is_dir() and preprocess is None:
        raise OptionError("calibration images from a folder need preprocess= ('caffe', 'torchvision', "
                          "'unit' or a PreprocessConfig)")
    from . import onnx_io
    from .inputs import check_config
    from .passes.onnx_normalize import normalize_onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx_io.load_model(model)
    # every check that needs neither TVM nor calibration first: a mistake in the model or the
    # policy is reported before the 5-8 s of importing TVM that checking the target costs
    prep = normalize_onnx(model, input_shapes=input_shapes)
    if not prep.is_quantized:  # a QDQ model's formats are its own, not the policy's
        check_config(prep.model, config)
    target_obj = _target(target)
    kernels = None
    if tuning_db is not None:  # opened now: a missing or foreign database is reported before any work
        from .tuning import TunedKernels, open_database

        tdb = open_database(Path(tuning_db), target=target_obj, create=False)
        for note in tdb.notes:
            print(f"note: {note}", file=sys.stderr)
        kernels = TunedKernels(tdb)

    from . import tvm_adapter as ta
    from .compiler import compile_model
    if ta.choose_isa(target_obj) == "plain":
        print(f"warning: target {ta.target_mcpu(target_obj)}: no AVX2 or better, every kernel runs the "
              "plain (slow, unvectorized) reference schedule", file=sys.stderr)
    images, calibration = None, {"source": "the model's own Q/DQ scales"}
    if prep.is_quantized:
        if calib is not None:
            print("note: the model is already quantized (QDQ): its own activation scales are used, "
                  "the calibration images are not", file=sys.stderr)
    elif calib is None:
        raise OptionError("--calib DIR|FILE.npy is required for a float model (calib= in the Python "
                          "API): activation scales come from calibration images (a QDQ-quantized "
                          "model needs none)")
    else:
        images, calibration = calibration_images(calib, preprocess=preprocess, input_shape=prep.input_shape,
                                                 limit=calib_limit, seed=calib_seed)
    plan = None
    if max_drop is not None and not prep.is_quantized:
        from .plan.sensitivity import choose_precision

        from .inputs import policy_check_set
        from .plan.sensitivity import CHECK_IMAGES

        # the budget is checked on images calibration did not take (labelled when they are)
        check = policy_check_set(calib, calibration=calibration, preprocess=preprocess,
                                 input_shape=prep.input_shape, limit=CHECK_IMAGES,
                                 seed=calibration.get("seed", 0))
        result = choose_precision(prep.model, images, config=config, max_drops=(float(max_drop),),
                                  check=check, progress=progress)
        plan = result.choices[0].plan
        if progress:
            print(result.table(), file=sys.stderr)
    compiled = compile_model(model, config=config if plan is None else plan.config, calib_images=images,
                             target=target_obj, input_shapes=input_shapes, kernels=kernels,
                             progress=progress, preprocess=preprocess, prepared=prep,  # normalised once, above
                             plan=plan)
    return dataclasses.replace(compiled, calibration=calibration)  # frozen: a copy that records it


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


def calibration_images(source, *, preprocess, input_shape, limit: int | None,
                       seed: int | None = None) -> tuple[np.ndarray, dict]:
    """float32 ``[N, ...]`` images sampled across an array, a stacked ``.npy`` or an image folder
    (seeded: a folder sorted by class would give a few classes as its first N), with the
    record of what was chosen (for the sidecar); the same checks as the CLI's."""
    from .inputs import check_array, check_samples, load_calibration
    from .plan.config import CALIB_LIMIT
    from .preprocess import CALIB_SEED, sample_calibration

    limit = CALIB_LIMIT if limit is None else limit
    seed = CALIB_SEED if seed is None else seed
    if isinstance(source, np.ndarray):
        check_array(source, source="calibration array", what="calibration", input_shape=input_shape)
        keep = sample_calibration(source, limit, seed=seed)
        info = {"source": "array", "limit": limit, "seed": seed, "available": len(source),
                "images": len(keep), "indices": keep}
        images = check_samples(source[keep].astype(np.float32), source="calibration array",
                               what="calibration")
        return images, info
    return load_calibration(Path(source), preprocess=preprocess, input_shape=input_shape,
                            limit=limit, seed=seed)


def _preprocess(preprocess):
    from .preprocess import PRESETS, PreprocessConfig

    if preprocess is None or isinstance(preprocess, PreprocessConfig):
        return preprocess
    if isinstance(preprocess, str) and preprocess in PRESETS:
        return PreprocessConfig.preset(preprocess)
    raise OptionError(f"preprocess must be one of {sorted(PRESETS)} or a PreprocessConfig, got {preprocess!r}")


def _target(name):
    """``None``/``"host"``: this CPU; else an LLVM mcpu, checked against LLVM's CPU list (an
    unknown one would silently build for ``generic``): a :class:`TargetError` naming close
    matches."""
    from . import tvm_adapter as ta
    from .errors import TargetError, UserError

    try:
        return ta.as_target(None if name in (None, "host") else name)
    except UserError:
        raise
    except Exception as error:  # TVM raises its own error types for a target it rejects
        raise TargetError(f"--target {name!r}: not a target TVM accepts ({error})") from None
