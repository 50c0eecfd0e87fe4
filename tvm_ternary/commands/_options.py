"""CLI options shared by compile, tune and eval: quantization, preprocessing, calibration input.

Example::

    >>> import argparse
    >>> p = argparse.ArgumentParser(); add_quant_arguments(p)
    >>> quant_config(p.parse_args(["--group-size", "8"])).group_size
    8
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import OptionError
from ..inputs import check_config, check_samples, load_array, load_calibration, load_images  # noqa: F401 (the commands' names)
from ..plan.config import DEFAULT_METHOD, METHODS
from ..quant.formats import WEIGHT_BITS

METHOD_HELP = ("reconstruct (default): data-aware, then coordinate descent over the codes themselves on "
               "each layer's output objective, on the integer scale grid the kernels run; "
               "data-aware: fit codes and group scales to each layer's output on the calibration "
               "images (GPTQ-style error feedback + least-squares scale refit + bias correction); "
               "exact: FGQ's per-group least-squares threshold; twn: 0.7*mean|w|")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# dest names of the quantization flags (eval refuses them for an already compiled .so)
QUANT_FLAGS = ("weight_bits", "group_size", "pointwise_group_size", "grouping", "method", "act_bits",
               "act_calibration", "code_bits", "distill_epochs")


def rgb_triple(text: str) -> tuple[float, float, float]:
    """argparse type for ``R,G,B``."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers R,G,B, got {text!r}")
    return values


def add_quant_arguments(parser: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """The quantization flags. ``defaults=False`` leaves every flag None when not given (the
    defaults are then QuantConfig's), so a caller can tell which flags the user passed."""
    def d(value):
        return value if defaults else None

    g = parser.add_argument_group("quantization")
    g.add_argument("--weight-bits", type=int, choices=WEIGHT_BITS, default=d(2),
                   help="weights of the quantized layers: 2 = ternary (default), 4, 7 or 8 bit")
    g.add_argument("--precise-bits", type=int, choices=(8, 7), default=None,
                   help="weights of the first and the last layer, which the policy keeps precise: 8 "
                        "(default) or 7 (|v| <= 63 per channel, as ONNX Runtime's reduce_range: exact "
                        "on vpmaddubsw, so faster on AVX2 and AVX-512 without VNNI)")
    g.add_argument("--group-size", "-N", type=positive_int, default=d(4), metavar="N",
                   help="N weights along the input channels share one scale (default 4)")
    g.add_argument("--pointwise-group-size", type=positive_int, default=None, metavar="N",
                   help="N of the 1x1 (pointwise) convs instead of --group-size; 2 removes half of "
                        "their multiplications instead of 3/4 at far less error, which compact CNNs "
                        "(SqueezeNet, MobileNetV2) need (default: --group-size)")
    g.add_argument("--grouping", choices=("fgq", "cluster"), default=d("fgq"),
                   help="fgq: N channels at one kernel position (default); cluster: N whole kernels")
    g.add_argument("--method", choices=METHODS, default=d(DEFAULT_METHOD), help=METHOD_HELP)
    g.add_argument("--act-bits", type=int, choices=(8, 4), default=d(8), help="activation bits (default 8)")
    g.add_argument("--act-calibration", choices=("minmax", "dfp", "percentile", "mse"), default=None,
                   help="activation scales: minmax (8-bit default), dfp (power-of-two, dynamic fixed "
                        "point), percentile, mse (4-bit default: clips outliers)")
    g.add_argument("--code-bits", type=int, choices=(7, 4), default=d(7),
                   help="bits of the integer group-scale codes (default 7)")
    g.add_argument("--distill-epochs", type=int, default=None, metavar="E",
                   help="after the layer-wise fit, tune group codes, channel scales and biases end to "
                        "end against the float model's outputs for E epochs over the calibration "
                        "images (augmented; needs torch). Default 0: none")
    g.add_argument("--layer-bits", action="append", default=[], metavar="NAME=BITS",
                   help="override one layer (or op type conv/dense/depthwise): BITS 2, 4, 7, 8, or 0 = float; repeatable")
    g.add_argument("--layer-group-size", action="append", default=[], metavar="NAME=N",
                   help="one layer's group size instead of --group-size (what --max-drop gives a layer "
                        "it makes 'ternary N=2'); repeatable")


def quant_config(args: argparse.Namespace):
    from ..plan import QuantConfig

    overrides = []
    for item in args.layer_bits:
        name, sep, bits = item.rpartition("=")
        if not sep or not name or bits not in [str(b) for b in (0, *WEIGHT_BITS)]:
            raise OptionError(f"--layer-bits wants NAME=BITS with BITS 0, 2, 4, 7 or 8, got {item!r}")
        overrides.append((name, int(bits)))
    groups = []
    for item in getattr(args, "layer_group_size", []):
        name, sep, n = item.rpartition("=")
        if not sep or not name or not n.isdigit() or int(n) < 1:
            raise OptionError(f"--layer-group-size wants NAME=N with N a positive integer, got {item!r}")
        groups.append((name, int(n)))
    given = {k: getattr(args, k) for k in QUANT_FLAGS if getattr(args, k, None) is not None}
    if getattr(args, "precise_bits", None) is not None:
        given.update(first_layer_bits=args.precise_bits, last_layer_bits=args.precise_bits)
    try:
        return QuantConfig(**given, overrides=tuple(overrides), group_overrides=tuple(groups))
    except ValueError as error:
        raise OptionError(str(error)) from None


def add_preprocess_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("image preprocessing")
    g.add_argument("--preprocess", choices=("torchvision", "caffe", "unit"), default=None,
                   help="torchvision: RGB/255, ImageNet mean/std; caffe: BGR 0-255 minus 104,117,123; unit: RGB/255")
    g.add_argument("--mean", type=rgb_triple, metavar="R,G,B", help="override the preset's mean")
    g.add_argument("--std", type=rgb_triple, metavar="R,G,B", help="override the preset's std")
    g.add_argument("--bgr", action="store_true", help="feed channels in BGR order")


def preprocess_config(args: argparse.Namespace):
    from ..preprocess import PreprocessConfig

    if args.preprocess is None and not (args.mean or args.std or args.bgr):
        return None
    return PreprocessConfig.from_options(preset=args.preprocess, mean=args.mean, std=args.std,
                                         bgr=True if args.bgr else None)


def add_calibration_arguments(parser, *, required_note: str = "") -> None:
    """``--calib-limit`` and ``--calib-seed`` (compile, tune, eval share one default)."""
    from ..plan.config import CALIB_LIMIT
    from ..preprocess import CALIB_SEED

    parser.add_argument("--calib-limit", type=positive_int, default=CALIB_LIMIT, metavar="N",
                        help=f"calibrate on N images sampled across the folder / .npy (seeded; "
                             f"default {CALIB_LIMIT}; all when it has fewer)")
    parser.add_argument("--calib-seed", type=int, default=CALIB_SEED, metavar="S",
                        help=f"seed of the calibration sample (default {CALIB_SEED}; recorded in the sidecar)")


def parse_input_shapes(items: list[str]) -> dict:
    from ..passes.onnx_normalize import parse_input_shape

    return dict(parse_input_shape(item) for item in items)


def check_output(path: Path, *, inputs=(), what: str = "output", library: bool = False) -> None:
    """Refuse an output path before any long work: a missing or unwritable folder, a folder,
    one of the command's ``inputs`` (``-o model.onnx`` would replace the model), and for a
    ``library`` an existing file that is not a shared library or a sidecar path holding
    something that is not a tvm-ternary sidecar (another library's ``.so.json``)."""
    import os
    import tempfile

    from ..errors import OutputPathError

    path = Path(path)
    targets = [path]
    if library:
        from ..runtime import sidecar_path

        targets.append(sidecar_path(path))
    for out in targets:
        for source in inputs:
            if source is not None and out.exists() and Path(source).exists() and os.path.samefile(out, source):
                raise OutputPathError(f"{out}: is an input of this command ({source}); refusing to overwrite it")
    if not path.parent.is_dir():
        raise OutputPathError(f"{path.parent}: output directory does not exist")
    if path.is_dir():
        raise OutputPathError(f"{path}: is a directory, expected a file name for the {what}")
    if library:
        if path.exists() and not _is_shared_library(path):
            raise OutputPathError(f"{path}: exists and is not a shared library; refusing to overwrite it "
                                  "(choose another -o)")
        if targets[1].exists() and not _is_our_sidecar(targets[1]):
            raise OutputPathError(f"{targets[1]}: exists and is not a tvm-ternary sidecar; refusing to "
                                  "overwrite it (choose another -o)")
    try:  # try it rather than ask os.access (which says yes to root on a read-only mount)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise OutputPathError(f"{path.parent}: cannot write the {what} there "
                              f"({error.strerror or error})") from None


def _is_shared_library(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _is_our_sidecar(path: Path) -> bool:
    import json

    from ..runtime import SIDECAR_FORMAT

    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("format") == SIDECAR_FORMAT
