"""Sub-commands of the ``tvm-ternary`` CLI: one module per command, found automatically.

To add a command, create ``tvm_ternary/commands/<name>.py`` that defines a module-level
``COMMAND``; nothing else needs editing::

    from tvm_ternary.commands import Command

    def add_arguments(parser):          # an argparse.ArgumentParser of its own
        parser.add_argument("model", help="ONNX model")

    def run(args) -> int:               # the exit code; raise UserError for bad input
        import tvm                      # heavy imports here, never at module level
        ...
        return 0

    COMMAND = Command(name="compile", summary="compile an ONNX model to a .so",
                      add_arguments=add_arguments, run=run)

Every command module is imported to build ``--help``, so module level must stay cheap (no TVM).
Modules whose name starts with ``_`` are helpers, not commands.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Command:
    """One ``tvm-ternary <name>`` sub-command.

    Example::

        >>> Command(name="hello", summary="say hello", add_arguments=lambda parser: None,
        ...         run=lambda args: 0).name
        'hello'
    """

    name: str  # as typed on the command line, e.g. "quantize-report"
    summary: str  # one line for the top-level --help
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""  # longer text for `tvm-ternary <name> --help`; defaults to summary
    epilog: str = ""  # shown after the options, e.g. examples


def discover_commands() -> list[Command]:
    """Every ``COMMAND`` defined by a module of this package, sorted by name."""
    commands: dict[str, Command] = {}
    for module_info in pkgutil.iter_modules(__path__):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        command = getattr(module, "COMMAND", None)
        if not isinstance(command, Command):
            continue
        if command.name in commands:
            raise RuntimeError(f"two command modules define the command {command.name!r}")
        commands[command.name] = command
    return [commands[name] for name in sorted(commands)]
