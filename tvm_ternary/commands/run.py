"""``tvm-ternary run``: run a compiled library on a stacked .npy input."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from . import Command

DESCRIPTION = """\
Load OUT.so (checking its sidecar and the host's CPU features first) and run it on X.npy.
A batch-1 model runs every sample stacked along axis 0 and stacks the outputs. Works with
TVM_USE_RUNTIME_LIB=1 (no compiler loaded)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("library", metavar="OUT.so", type=Path, help="library written by compile")
    parser.add_argument("--input", required=True, type=Path, metavar="X.npy", help="input array")
    parser.add_argument("--output", required=True, type=Path, metavar="Y.npy", help="where to write the output")


def run(args: argparse.Namespace) -> int:
    import tempfile

    from ..api import load  # the public tvm_ternary.load
    from ..runtime import check_input, read_sidecar, sidecar_path
    from ._options import check_output, load_array

    # checked first: do not load and run for nothing
    check_output(args.output, inputs=(args.input, args.library, sidecar_path(args.library)), what="output array")
    x = load_array(args.input, what="input")
    check_input(x, read_sidecar(args.library))  # before TVM and the library are loaded
    model = load(args.library)
    y = model.run(x)
    fd, name = tempfile.mkstemp(dir=args.output.parent, prefix=f".{args.output.name}.", suffix=".tmp.npy")
    os.close(fd)
    tmp = Path(name)  # unique: two runs to one output never share it
    try:
        np.save(tmp, y)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; an output is an ordinary file
        os.replace(tmp, args.output)  # never leave a partial output behind
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {args.output}: {y.dtype} {list(y.shape)}")
    return 0


COMMAND = Command(name="run", summary="run a compiled library on an input .npy",
                  add_arguments=add_arguments, run=run, description=DESCRIPTION)
