"""Is a 4-bit-activation kernel worth it on this CPU? Measure the inner-loop MAC rates.

Compares, in one run, the sustained multiply-accumulate rate of the three inner loops a
ternary-weight kernel could use (register-resident, back-to-back, 1 thread):

* ``vnni_u8``: ``vpdpbusd`` on u8 activations x s8 weights (what our kernels use for 8- and
  4-bit activations alike: 4-bit values sit in 8-bit containers);
* ``bitserial_u4``: ternary weights as two bit-planes (+1 mask, -1 mask) and 4-bit activations
  as four bit-planes; 512 MACs = 8 x (vpandq + vpopcntq + vpaddq) (VPOPCNTDQ, as in
  bit-serial / BitNet-style kernels);
* ``lut_u4``: T-MAC-style table look-up: ``vpshufb`` maps 4 weight bits to a precomputed signed
  partial sum of 4 activations (2 ternary MACs per byte, 2 bit-planes), with the int8 -> int16
  widening that the 8-bit table entries force every second look-up. Building the tables (once
  per pixel and group of 4 input channels, reused by every output channel) is not counted.

Writes JSON with the rates and the CPU stamp. Needs gcc. Example::

    python scripts/bench_int4_paths.py --json reports/int4_paths.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
from pathlib import Path

C_SOURCE = r"""
#include <immintrin.h>
#include <stdio.h>
#include <stdint.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
#define ITERS 20000000L
int main(void) {
  volatile int sink = 0;
  /* vnni: 8 independent accumulators, 64 MACs per vpdpbusd */
  __m512i a = _mm512_set1_epi8(3), w = _mm512_set1_epi8(-1);
  __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
  double t = now();
  for (long i = 0; i < ITERS; i++) {
    c0 = _mm512_dpbusd_epi32(c0, a, w); c1 = _mm512_dpbusd_epi32(c1, a, w);
    c2 = _mm512_dpbusd_epi32(c2, a, w); c3 = _mm512_dpbusd_epi32(c3, a, w);
    c4 = _mm512_dpbusd_epi32(c4, a, w); c5 = _mm512_dpbusd_epi32(c5, a, w);
    c6 = _mm512_dpbusd_epi32(c6, a, w); c7 = _mm512_dpbusd_epi32(c7, a, w);
    __asm__ volatile("" : "+v"(a), "+v"(w));
  }
  double vnni = 8.0 * 64 * ITERS / (now() - t);
  sink += _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(_mm512_add_epi32(c2, c3),
          _mm512_add_epi32(_mm512_add_epi32(c4, c5), _mm512_add_epi32(c6, c7)))));
  /* bit-serial: 512 ternary x u4 MACs = 2 weight planes x 4 activation planes of 512 bits */
  __m512i wp = _mm512_set1_epi64(0x5555), wn = _mm512_set1_epi64(0x2222);
  __m512i x0 = _mm512_set1_epi64(1), x1 = _mm512_set1_epi64(2), x2 = _mm512_set1_epi64(4), x3 = _mm512_set1_epi64(8);
  __m512i p0 = _mm512_setzero_si512(), p1 = p0, p2 = p0, p3 = p0, n0 = p0, n1 = p0, n2 = p0, n3 = p0;
  t = now();
  for (long i = 0; i < ITERS; i++) {
    p0 = _mm512_add_epi64(p0, _mm512_popcnt_epi64(_mm512_and_si512(wp, x0)));
    p1 = _mm512_add_epi64(p1, _mm512_popcnt_epi64(_mm512_and_si512(wp, x1)));
    p2 = _mm512_add_epi64(p2, _mm512_popcnt_epi64(_mm512_and_si512(wp, x2)));
    p3 = _mm512_add_epi64(p3, _mm512_popcnt_epi64(_mm512_and_si512(wp, x3)));
    n0 = _mm512_add_epi64(n0, _mm512_popcnt_epi64(_mm512_and_si512(wn, x0)));
    n1 = _mm512_add_epi64(n1, _mm512_popcnt_epi64(_mm512_and_si512(wn, x1)));
    n2 = _mm512_add_epi64(n2, _mm512_popcnt_epi64(_mm512_and_si512(wn, x2)));
    n3 = _mm512_add_epi64(n3, _mm512_popcnt_epi64(_mm512_and_si512(wn, x3)));
    __asm__ volatile("" : "+v"(wp), "+v"(wn), "+v"(x0), "+v"(x1));
  }
  double bitserial = 512.0 * ITERS / (now() - t);  /* one iteration = 512 weights x 1 activation vector */
  sink += (int)_mm512_reduce_add_epi64(_mm512_sub_epi64(_mm512_add_epi64(_mm512_add_epi64(p0, p1), _mm512_add_epi64(p2, p3)),
          _mm512_add_epi64(_mm512_add_epi64(n0, n1), _mm512_add_epi64(n2, n3))));
  /* LUT (T-MAC style): a 16-entry table of signed partial sums of 4 u4 activations, indexed by
     4 weight bits; ternary = 2 bit-planes, so one byte looked up = 2 ternary MACs. Sums stay in
     int8 for 2 look-ups (|sum| <= 120), then widen pairwise to int16 with vpmaddubsw. */
  __m512i lut = _mm512_set_epi8(15,14,13,12,11,10,9,8,7,6,5,4,3,2,1,0,15,14,13,12,11,10,9,8,7,6,5,4,3,2,1,0,
                                15,14,13,12,11,10,9,8,7,6,5,4,3,2,1,0,15,14,13,12,11,10,9,8,7,6,5,4,3,2,1,0);
  __m512i ones = _mm512_set1_epi8(1), ia = _mm512_set1_epi8(5), ib = _mm512_set1_epi8(9);
  __m512i l0 = _mm512_setzero_si512(), l1 = l0, l2 = l0, l3 = l0;
  t = now();
  for (long i = 0; i < ITERS; i++) {
    __m512i s0 = _mm512_add_epi8(_mm512_shuffle_epi8(lut, ia), _mm512_shuffle_epi8(lut, ib));
    __m512i s1 = _mm512_add_epi8(_mm512_shuffle_epi8(lut, ib), _mm512_shuffle_epi8(lut, ia));
    l0 = _mm512_add_epi16(l0, _mm512_maddubs_epi16(ones, s0));
    l1 = _mm512_add_epi16(l1, _mm512_maddubs_epi16(ones, s1));
    __asm__ volatile("" : "+v"(lut), "+v"(ia), "+v"(ib));
  }
  double lut_rate = 4.0 * 64 * 2 * ITERS / (now() - t);  /* 4 look-ups of 64 bytes, 2 MACs each */
  sink += _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(l0, l1), _mm512_add_epi32(l2, l3)));
  printf("{\"vnni_u8\": %.4e, \"bitserial_u4\": %.4e, \"lut_u4\": %.4e, \"sink\": %d}\n", vnni, bitserial, lut_rate, sink);
  return 0;
}
"""


def cpu_stamp() -> dict:
    model, flags = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "vpop", "gfni"))]
                break
    except OSError:
        pass
    return {"cpu": model, "isa_flags": flags, "threads": 1}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the median is reported")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "int4.c", Path(tmp) / "int4"
        src.write_text(C_SOURCE)
        subprocess.run(["gcc", "-O2", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-mavx512vpopcntdq",
                        str(src), "-o", str(exe)], check=True)
        runs = [json.loads(subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout)
                for _ in range(args.repeat)]
    result = {k: sorted(r[k] for r in runs)[len(runs) // 2] / 1e9 for k in ("vnni_u8", "bitserial_u4", "lut_u4")}
    print("inner-loop rate, G MAC/s (1 thread, median of %d):" % args.repeat)
    for name, rate in result.items():
        print(f"  {name:14s} {rate:8.1f}   ({rate / result['vnni_u8']:.2f}x of vnni_u8)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**cpu_stamp(), "gmacs": result, "repeat": args.repeat}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
