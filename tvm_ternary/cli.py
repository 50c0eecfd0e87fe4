"""The ``tvm-ternary`` command line: a thin argparse frame around ``tvm_ternary.commands``.

Errors never show a traceback: a :class:`~tvm_ternary.errors.UserError` or a bad option prints
one line ``tvm-ternary: error: ...`` on stderr and exits 2; a
:class:`~tvm_ternary.errors.RuntimeFailure` or an unexpected exception prints one line and exits 1
(set ``TVM_TERNARY_TRACEBACK=1`` to see the traceback of an unexpected one). Results and
progress go to stdout.

Example::

    >>> main(["quantize-report", "model.onnx", "--group-size", "4"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from tvm_ternary import __version__
from tvm_ternary.commands import discover_commands
from tvm_ternary.errors import OptionError, RuntimeFailure, UserError

PROG = "tvm-ternary"
EXIT_OK = 0
EXIT_RUNTIME_FAILURE = 1
EXIT_USAGE = 2  # bad input or options, as argparse uses
EXIT_INTERRUPTED = 130
TRACEBACK_ENV = "TVM_TERNARY_TRACEBACK"


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage block before an error; we want exactly one line."""

    def error(self, message: str):  # type: ignore[override]
        raise OptionError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(
        prog=PROG,
        description="Ternary-weight, integer-activation CNN compiler for x86 CPUs, on Apache TVM.",
        epilog=f"Run '{PROG} COMMAND --help' for a command's options. Bad input exits with "
        "code 2, a failure at run time with code 1.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command_name")
    subparsers.required = True
    for command in discover_commands():
        subparser = subparsers.add_parser(
            command.name,
            help=command.summary,
            description=command.description or command.summary,
            epilog=command.epilog or None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(subparser)
        subparser.set_defaults(command=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    try:
        args = build_parser().parse_args(argv)
        return int(args.command.run(args) or EXIT_OK)
    except SystemExit as exit_request:  # --help and --version end through argparse's exit()
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_OK
    except UserError as error:
        _print_error(str(error))
        return EXIT_USAGE
    except RuntimeFailure as error:
        _print_error(str(error))
        return EXIT_RUNTIME_FAILURE
    except KeyboardInterrupt:
        _print_error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `tvm-ternary ... | head`: the reader left, nothing to report
        sys.stdout = open(os.devnull, "w")  # keep the interpreter's final flush quiet
        return EXIT_RUNTIME_FAILURE
    except Exception as error:  # a bug, not the user's fault: still one line unless asked
        if os.environ.get(TRACEBACK_ENV):
            raise
        _print_error(
            f"internal error: {type(error).__name__}: {error} "
            f"(set {TRACEBACK_ENV}=1 to see the traceback)"
        )
        return EXIT_RUNTIME_FAILURE


def _print_error(message: str) -> None:
    one_line = " ".join(message.split())
    print(f"{PROG}: error: {one_line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
