"""The host's inner-loop peak: G MAC/s of back-to-back ``vpdpbusd`` zmm (AVX512-VNNI), the
instruction the VNNI kernels' inner loop is made of; ``bench --peak`` and the kernel benchmarks
report each layer as a share of it. Needs gcc; None where it cannot be built or run.

Example::

    >>> peak = measure_vnni_peak(1)
    >>> peak is None or peak > 1.0
    True
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

_ACCS = 12  # independent accumulator chains: more than latency x issue width
_PEAK_C = "\n".join([
    "#include <immintrin.h>", "#include <pthread.h>", "#include <stdio.h>",
    "#include <stdlib.h>", "#include <time.h>", "#define ITERS 20000000L",
    "static void *work(void *arg) {",
    "  __m512i b = _mm512_set1_epi8(1), c = _mm512_set1_epi8(2);",
    *[f"  __m512i a{i} = _mm512_set1_epi32({i});" for i in range(_ACCS)],
    "  for (long it = 0; it < ITERS; it++) {",
    *[f"    a{i} = _mm512_dpbusd_epi32(a{i}, b, c);" for i in range(_ACCS)],
    # every chain opaque to the compiler (no merging of identical chains), still in registers
    "    __asm__ volatile(\"\" : " + ", ".join(f"\"+v\"(a{i})" for i in range(_ACCS)) + ");",
    "  }",
    "  __m512i s = a0;",
    *[f"  s = _mm512_add_epi32(s, a{i});" for i in range(1, _ACCS)],
    "  *(long *)arg = _mm512_reduce_add_epi32(s);",
    "  return 0;",
    "}",
    "int main(int argc, char **argv) {",
    "  int t = atoi(argv[1]); pthread_t th[64]; long sink[64]; struct timespec t0, t1;",
    "  clock_gettime(CLOCK_MONOTONIC, &t0);",
    "  for (int i = 0; i < t; i++) pthread_create(&th[i], 0, work, &sink[i]);",
    "  for (int i = 0; i < t; i++) pthread_join(th[i], 0);",
    "  clock_gettime(CLOCK_MONOTONIC, &t1);",
    "  double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);",
    f"  printf(\"%f\\n\", {_ACCS}.0 * 64.0 * ITERS * t / s / 1e9);",
    "  return sink[0] == 42;",
    "}",
])


def measure_vnni_peak(threads: int) -> float | None:
    """G MAC/s of back-to-back vpdpbusd zmm on ``threads`` threads (None if it cannot run)."""
    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d) / "peak.c", Path(d) / "peak"
        src.write_text(_PEAK_C)
        try:
            subprocess.run(["gcc", "-O2", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-pthread",
                            str(src), "-o", str(exe)], check=True, capture_output=True)
            runs = [float(subprocess.run([str(exe), str(threads)], check=True,
                                         capture_output=True, text=True).stdout)
                    for _ in range(3)]
        except (OSError, subprocess.CalledProcessError, ValueError):
            return None
    return max(runs)
