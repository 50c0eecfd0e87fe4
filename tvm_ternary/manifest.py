"""The manifest a library carries inside itself: what it needs and what it takes (no TVM import).

The sidecar JSON beside a library is plain text anyone can edit; what the runtime must not get
wrong comes from the library file itself: the CPU features its code uses (a wrong list is a
SIGILL), the input and output names, shapes and dtypes (a wrong one is a TVM shape error or a
silent cast). ``compile`` links a small C++ object with one constant byte array into the
library (an ``addons`` object of ``export_library``); the runtime reads it from the file's bytes
*before* the library is loaded, so no code of it runs first, and checks the sidecar agrees.

Example::

    >>> fields = {"input": {"name": "x", "shape": [1, 3, 8, 8], "dtype": "float32"}}
    >>> blob = MAGIC + json.dumps(fields).encode() + b"\\0"
    >>> parse(b"ELF...." + blob + b"....") == fields
    True
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path

from .errors import LibraryError

MAGIC = b"TVM_TERNARY_MANIFEST/1:"
SYMBOL = "tvm_ternary_manifest"
# The sidecar fields the library vouches for (the rest of the sidecar is a report).
FIELDS = ("input", "output", "required_cpu_features", "target")


def manifest_of(sidecar: dict) -> dict:
    """The part of ``sidecar`` embedded in (and checked against) the library."""
    return {key: sidecar[key] for key in FIELDS}


def c_source(fields: dict) -> str:
    """C++ source of the object ``export_library`` links in: one ``used`` constant array.

    Bytes, not a string literal: JSON needs no escaping that way."""
    blob = MAGIC + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode() + b"\0"
    rows = [", ".join(str(b) for b in blob[i : i + 32]) for i in range(0, len(blob), 32)]
    body = ",\n    ".join(rows)
    return ('// written by tvm_ternary.manifest: what this library needs and takes\n'
            f'extern "C" __attribute__((used, visibility("hidden")))  // never interposed between libraries\n'
            f'const unsigned char {SYMBOL}[{len(blob)}] = {{\n    {body}\n}};\n')


def write_source(fields: dict, folder: str | Path) -> Path:
    path = Path(folder) / f"{SYMBOL}.cc"
    path.write_text(c_source(fields))
    return path


def parse(data) -> dict | None:
    """The manifest in ``data`` (bytes or mmap), None when there is none."""
    start = data.find(MAGIC)
    if start < 0:
        return None
    if data.find(MAGIC, start + 1) >= 0:
        raise LibraryError("the library holds two manifests (not written by tvm-ternary compile)")
    end = data.find(b"\0", start)
    try:
        return json.loads(bytes(data[start + len(MAGIC) : end]).decode())
    except (ValueError, UnicodeDecodeError):
        raise LibraryError("the library's embedded manifest is damaged") from None


def read(library: str | Path) -> dict | None:
    """The manifest embedded in the file ``library`` (read, never loaded), or None."""
    with open(library, "rb") as f:
        if Path(library).stat().st_size == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return parse(data)


def check(sidecar: dict, library: str | Path, *, side_name: str) -> dict:
    """The library's manifest; a :class:`LibraryError` when it is missing or the sidecar
    ``side_name`` says otherwise on any of :data:`FIELDS`."""
    name = Path(library).name
    embedded = read(library)
    if embedded is None:
        raise LibraryError(f"{name}: no embedded manifest (built by an older tvm-ternary, or not by "
                           "tvm-ternary compile); recompile it")
    for key in FIELDS:
        if sidecar.get(key) != embedded.get(key):
            raise LibraryError(f"{side_name}: {_difference(key, sidecar.get(key), embedded.get(key))} "
                               "(edited sidecar?); use the sidecar compile wrote")
    return embedded


def _difference(key: str, side, lib) -> str:
    """``output.dtype: the sidecar says "int8", the library "float32"`` (short, one line)."""
    if isinstance(side, dict) and isinstance(lib, dict):
        sub = next(k for k in sorted(set(side) | set(lib)) if side.get(k) != lib.get(k))
        return _difference(f"{key}.{sub}", side.get(sub), lib.get(sub))
    if isinstance(side, list) and isinstance(lib, list) and all(isinstance(v, str) for v in side + lib):
        added, dropped = sorted(set(side) - set(lib)), sorted(set(lib) - set(side))
        parts = ([f"the sidecar adds {', '.join(added)}"] if added else []) + \
                ([f"drops {', '.join(dropped)}"] if dropped else [])
        return f"{key}: {'; '.join(parts) or 'order differs'} against the library's own record"
    return f"{key}: the sidecar says {json.dumps(side)}, the library's own record {json.dumps(lib)}"
