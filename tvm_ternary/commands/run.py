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
    from ..errors import UserError
    from ..api import load  # the public tvm_ternary.load

    if not args.output.parent.is_dir():  # checked first: do not load and run for nothing
        raise UserError(f"{args.output.parent}: output directory does not exist")
    if args.output.is_dir():
        raise UserError(f"{args.output}: is a directory, expected a .npy file name")
    try:
        x = np.load(args.input, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise UserError(f"{args.input}: cannot read input array ({error})") from None
    model = load(args.library)
    y = model.run(x)
    tmp = args.output.with_name(f".{args.output.name}.tmp.npy")
    try:
        np.save(tmp, y)
        os.replace(tmp, args.output)  # never leave a partial output behind
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {args.output}: {y.dtype} {list(y.shape)}")
    return 0


COMMAND = Command(name="run", summary="run a compiled library on an input .npy",
                  add_arguments=add_arguments, run=run, description=DESCRIPTION)
