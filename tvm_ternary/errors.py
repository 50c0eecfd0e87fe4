"""Errors the user can fix, as opposed to bugs.

The CLI turns every :class:`UserError` into one line ``tvm-ternary: error: <message>`` and exit
code 2; a :class:`RuntimeFailure` (the input was fine but the work failed: a compile, a
measurement) becomes one line and exit code 1. Library callers can catch the specific subclasses.

Example::

    >>> try:
    ...     raise ModelFileError("model.onnx: no such file")
    ... except UserError as error:
    ...     print(error)
    model.onnx: no such file
"""

from __future__ import annotations

# Long enough for a path plus a reason; checker messages can run to pages of proto text.
_MAX_MESSAGE_CHARS = 400


def _one_line(message: str) -> str:
    """Collapse whitespace so the message prints as one line, and cap its length."""
    text = " ".join(str(message).split())
    if len(text) > _MAX_MESSAGE_CHARS:
        text = text[: _MAX_MESSAGE_CHARS - 3] + "..."
    return text


class UserError(Exception):
    """Bad input the user can fix; its message is one line and names the problem."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


class ModelFileError(UserError):
    """The model file is missing, unreadable, not ONNX, or truncated."""


class InvalidModelError(UserError):
    """The file is ONNX but the model is malformed (``onnx.checker`` rejects it)."""


class NoWeightedLayersError(UserError):
    """The model has no conv/dense layer with constant weights to work on."""


class BadWeightError(UserError):
    """A layer's weight cannot be used (NaN/Inf values, unsupported encoding)."""


class OptionError(UserError, ValueError):
    """A command-line option does not fit the model (e.g. group size larger than a layer).

    Also a ``ValueError``: the configuration checks in the core raise it where a bad value
    used to be a plain ``ValueError``, so older ``except ValueError`` callers still catch it."""


class TargetError(OptionError):
    """The target CPU is not one LLVM knows, or the host cannot run what it needs."""


class OutputPathError(UserError):
    """An output path would overwrite an input or a file that is not ours, or is not writable."""


class InputDataError(UserError):
    """An input or calibration array/image is unusable (wrong type, empty, NaN/Inf, bad label)."""


class LibraryError(UserError):
    """A compiled library or its sidecar is missing, damaged, edited, or built for another CPU."""


class RuntimeFailure(Exception):
    """The input was valid but the work failed (exit code 1 in the CLI)."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))
