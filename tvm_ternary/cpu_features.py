"""CPU feature names: what a compiled library needs and what the host has (no TVM import).

Feature names are LLVM's (what the target reports); the host's come from ``/proc/cpuinfo``,
whose names differ for some features, hence the table.

Example::

    >>> "sse2" in host_features() or not Path("/proc/cpuinfo").exists()
    True
"""

from __future__ import annotations

import functools
from pathlib import Path

# LLVM feature name -> Linux /proc/cpuinfo flag. The set a library records is the subset of
# these its target enables: LLVM may emit any of them anywhere in the code it generates.
LLVM_TO_CPUINFO = {
    "sse2": "sse2", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "avx": "avx", "avx2": "avx2",
    "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2", "popcnt": "popcnt",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
    "avx512cd": "avx512cd", "avx512vnni": "avx512_vnni", "avx512vbmi": "avx512vbmi",
    "avx512vbmi2": "avx512_vbmi2", "avx512bitalg": "avx512_bitalg",
    "avx512vpopcntdq": "avx512_vpopcntdq", "avx512bf16": "avx512_bf16", "avx512ifma": "avx512ifma",
    "avxvnni": "avx_vnni", "gfni": "gfni", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq",
    # newer ones: LLVM may use them for a target that has them (e.g. vp2intersect on znver5)
    "avx512fp16": "avx512_fp16", "avx512vp2intersect": "avx512_vp2intersect",
    "avxifma": "avx_ifma", "avxvnniint8": "avx_vnni_int8", "avxvnniint16": "avx_vnni_int16",
    "avxneconvert": "avx_ne_convert", "amx-tile": "amx_tile", "amx-int8": "amx_int8",
    "amx-bf16": "amx_bf16", "amx-fp16": "amx_fp16",
    # scalar/SSE extensions LLVM's instruction selection uses on its own: a znver4 library
    # really contains SSE4A's extrq (AMD only) and dies with SIGILL on an Intel CPU
    "sse3": "pni", "ssse3": "ssse3", "sse4a": "sse4a", "lzcnt": "abm", "movbe": "movbe",
    "prfchw": "3dnowprefetch", "cx16": "cx16", "fma4": "fma4", "xop": "xop", "tbm": "tbm",
}

# The features a tuning database folder name hashes (tuning/database.py): the table as it was
# when databases were first written, so that extending the table above does not rename them.
TUNING_KEY_FEATURES = tuple(list(LLVM_TO_CPUINFO)[:26])


@functools.lru_cache(maxsize=1)
def host_features() -> frozenset[str]:
    """LLVM names of the features this host's CPU reports (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return frozenset(llvm for llvm, linux in LLVM_TO_CPUINFO.items() if linux in flags)


def missing_features(required) -> list[str]:
    """The features of ``required`` (LLVM names) this host's CPU lacks, sorted."""
    return sorted(set(required) - host_features())


# Linux: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) (x86-64 syscall 158)
_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18


@functools.lru_cache(maxsize=1)
def request_amx() -> bool:
    """Ask Linux for the AMX tile data state for this process; True when granted.

    Linux (5.16+) hands the tile state out only on request: without it the first AMX
    instruction of a kernel is a SIGILL.  The grant is process wide (every thread, also the
    ones TVM's pool makes later), so once is enough; a host without AMX gets False.
    """
    if "amx-tile" not in host_features():
        return False
    import ctypes
    import platform

    if platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False
