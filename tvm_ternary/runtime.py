"""Load and run a compiled library without the compiler (works with ``TVM_USE_RUNTIME_LIB=1``).

Only ``tvm.runtime`` is used here: with ``TVM_USE_RUNTIME_LIB=1`` TVM loads just
``libtvm_runtime`` and the compiler packages cannot be imported. Before anything is loaded the
sidecar JSON beside the library is checked: it must exist, describe this very file (SHA-256),
and name only CPU features the host has — a VNNI library on an AVX2 host is a clear error,
not a SIGILL.

Example::

    >>> model = load("squeezenet.so")  # doctest: +SKIP
    >>> probs = model.run(images)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import manifest
from .cpu_features import host_features, request_amx
from .errors import InputDataError, LibraryError, UserError

SIDECAR_FORMAT = "tvm_ternary.sidecar/1"


def sidecar_path(library: str | Path) -> Path:
    return Path(str(library) + ".json")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_sidecar(library: str | Path) -> dict:
    """The sidecar of ``library``, checked against the file and the host CPU."""
    library = Path(library)
    if not library.is_file():
        raise UserError(f"{library}: no such library")
    side = sidecar_path(library)
    if not side.is_file():
        raise UserError(f"{side}: sidecar missing (compile writes it beside the .so; copy both)")
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{side}: not a readable sidecar JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise UserError(f"{side}: not a tvm_ternary sidecar (format {SIDECAR_FORMAT} expected)")
    if meta.get("library_sha256") != file_sha256(library):
        raise LibraryError(f"{side}: sidecar does not match {library.name} (rebuilt or replaced library?)")
    # the features and the input/output signature come from the library itself, not the
    # editable sidecar (which must agree with it)
    embedded = manifest.check(meta, library, side_name=side.name)
    missing = sorted(set(embedded["required_cpu_features"]) - host_features())
    if missing:
        raise LibraryError(f"{library.name} was built for {meta.get('target', {}).get('mcpu', '?')} and needs "
                        f"CPU features this host lacks: {', '.join(missing)}; recompile with --target host")
    if "amx-tile" in embedded["required_cpu_features"] and not request_amx():
        raise LibraryError(f"{library.name} uses AMX tiles and Linux refused this process the tile "
                           f"state (arch_prctl ARCH_REQ_XCOMP_PERM); recompile with --target "
                           f"icelake-server (AVX-512 VNNI, no AMX)")
    return meta


def check_input(x: np.ndarray, sidecar: dict) -> np.ndarray:
    """``x`` if it fits the library of ``sidecar`` (from :func:`read_sidecar`); else a one-line
    error. Needs no TVM: ``run`` checks its input before the library is loaded."""
    shape, dtype = tuple(sidecar["input"]["shape"]), sidecar["input"]["dtype"]
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise InputDataError(f"input is an array of {x.dtype.name}, not numbers")
    if x.dtype.name != dtype:
        raise UserError(f"input dtype {x.dtype.name} does not match the model's {dtype} "
                        f"(convert with x.astype('{dtype}'))")
    if x.ndim != len(shape) or tuple(x.shape[1:]) != shape[1:] or x.shape[0] % shape[0]:
        raise UserError(f"input shape {tuple(x.shape)} does not match the model's {shape} "
                        f"(samples may be stacked along axis 0)")
    if x.shape[0] == 0:
        raise InputDataError(f"input has 0 samples (shape {tuple(x.shape)})")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise InputDataError(f"input has {int((~np.isfinite(x)).sum())} NaN/Inf value(s), first at "
                             f"index {tuple(int(i) for i in bad)}; the integer kernels would turn "
                             "them into plausible numbers")
    return x


@dataclass(frozen=True, eq=False)
class LoadedModel:
    sidecar: dict
    vm: object

    @property
    def metadata(self) -> dict:
        """The sidecar: input/output, preprocessing, quantization config, target, coverage."""
        return self.sidecar

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.sidecar["input"]["shape"])

    @property
    def input_dtype(self) -> str:
        return self.sidecar["input"]["dtype"]

    def check_input(self, x: np.ndarray) -> np.ndarray:
        return check_input(x, self.sidecar)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Outputs for ``x``; a batch-1 model runs each sample of a stack and stacks the results."""
        import tvm.runtime  # runtime-only import: no compiler needed

        x = self.check_input(x).astype(np.float32)  # the module computes in float32
        batch = self.input_shape[0]
        dev = tvm.runtime.cpu(0)
        outs = [self.vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x[i : i + batch]), dev)).numpy()
                for i in range(0, len(x), batch)]
        return np.concatenate(outs).astype(self.sidecar["output"]["dtype"])


def load(path: str | Path) -> LoadedModel:
    """Load a library written by ``tvm-ternary compile`` (see the module docstring)."""
    meta = read_sidecar(path)
    import tvm.runtime
    from tvm.runtime import vm as runtime_vm

    try:
        lib = tvm.runtime.load_module(str(path))
        vm = runtime_vm.VirtualMachine(lib, tvm.runtime.cpu(0))
    except Exception as error:  # TVM's errors: bad ELF, missing symbols, not a VM executable
        raise UserError(f"{path}: cannot load the library ({type(error).__name__}: "
                        f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''})") from None
    return LoadedModel(sidecar=meta, vm=vm)
