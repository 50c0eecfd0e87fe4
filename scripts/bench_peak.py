"""Inner-loop MAC peaks of this CPU: the ceiling each kernel's "% of peak" is measured against.

Every loop is register-resident and back-to-back (``ACCS`` independent accumulator chains, more
than latency x issue width), so it measures the instruction throughput a kernel's inner loop
can reach at best. One C program per loop, compiled with exactly the ISA flags it needs: a loop
whose flags the host lacks is listed as skipped, never run (no SIGILL).

=====================  =========================================================  =========
loop                   instructions per step (MACs per step)                      needs
=====================  =========================================================  =========
``fp32_fma_ymm``       ``vfmadd231ps ymm`` (8)                                    avx2 fma
``fp32_fma_zmm``       ``vfmadd231ps zmm`` (16)                                   avx512f
``i16_pmaddwd_ymm``    ``vpmaddwd`` + ``vpaddd`` ymm (16): our avx2 block today   avx2
``i16_pmaddwd_zmm``    the same, zmm (32): our avx512 block today                 avx512bw
``i8_maddubs_ymm``     ``vpmaddubsw`` + ``vpmaddwd(ones)`` + ``vpaddd`` (32):      avx2
                       the int8 runtimes' u8 x s8 loop without VNNI
``i8_maddubs_zmm``     the same, zmm (64)                                         avx512bw
``tern_maddubs_ymm``   ``vpmaddubsw(u8, t in {-1,0,1})`` + ``vpaddw`` (int16       avx2
                       accumulation), one ``vpmaddwd(codes)`` + ``vpaddd`` per
                       16 steps (32)
``tern_maddubs_zmm``   the same, zmm (64)                                         avx512bw
``vnni_ymm``           ``{vex} vpdpbusd ymm`` (32)                                avxvnni
``vnni_zmm``           ``vpdpbusd zmm`` (64)                                      avx512vnni
``amx_tdpbusd``        ``tdpbusd`` on 16 x 64 u8 x 64 x 16 s8 tiles, four          amx_int8
                       accumulator tiles (16384): what OpenVINO's int8 convs
                       use on such a host; we have no AMX kernel
=====================  =========================================================  =========

The AMX loop is a program of its own (``amx_source``): tiles are not vector registers, Linux
grants the tile data state only on request (``arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)``,
else the first tile instruction is a SIGILL), and the tile configuration is per thread, so each
thread loads it.

Writes JSON stamped with CPU, ISA flags, threads and versions (``_bench_common.machine_stamp``).
Example::

    python scripts/bench_peak.py --threads 1 --json reports/bench/peak_t1.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import machine_stamp  # noqa: E402

ACCS = 12
ITERS = 20_000_000
TERNARY_GROUP_STEPS = 16  # int16 steps between two code applications (|sum| <= 16*510 < 2^15)


@dataclass(frozen=True)
class Loop:
    name: str
    macs_per_step: int  # per accumulator chain and iteration
    flags: tuple  # gcc -m flags
    cpuinfo: tuple  # /proc/cpuinfo flags the host must have
    vtype: str  # C vector type of the chains
    init: str  # C statement(s) run once: operands a (activations) and w (weights)
    step: str  # one step on chain ``acc`` (``{acc}`` is substituted)
    every: str = ""  # extra statement on chain ``acc`` after every TERNARY_GROUP_STEPS steps
    extra_chain: str = ""  # declaration of a second per-chain vector (the int32 accumulator)
    operands: tuple = ("a", "w")  # vectors the steps read (made opaque every iteration)
    chains: int = ACCS  # AVX2 has 16 ymm registers: loops with two vectors per chain use fewer
    program: str = ""  # a whole C program instead of c_source's chains (the AMX loop)


_Y, _Z = "__m256i", "__m512i"
LOOPS = [
    Loop("fp32_fma_ymm", 8, ("-mavx2", "-mfma"), ("avx2", "fma"), "__m256",
         "__m256 a = _mm256_set1_ps(1.0001f), w = _mm256_set1_ps(0.9999f);",
         "{acc} = _mm256_fmadd_ps(a, w, {acc});"),
    Loop("fp32_fma_zmm", 16, ("-mavx512f",), ("avx512f",), "__m512",
         "__m512 a = _mm512_set1_ps(1.0001f), w = _mm512_set1_ps(0.9999f);",
         "{acc} = _mm512_fmadd_ps(a, w, {acc});"),
    Loop("i16_pmaddwd_ymm", 16, ("-mavx2",), ("avx2",), _Y,
         f"{_Y} a = _mm256_set1_epi16(3), w = _mm256_set1_epi16(-2);",
         "{acc} = _mm256_add_epi32({acc}, _mm256_madd_epi16(a, w));"),
    Loop("i16_pmaddwd_zmm", 32, ("-mavx512f", "-mavx512bw"), ("avx512bw",), _Z,
         f"{_Z} a = _mm512_set1_epi16(3), w = _mm512_set1_epi16(-2);",
         "{acc} = _mm512_add_epi32({acc}, _mm512_madd_epi16(a, w));"),
    Loop("i8_maddubs_ymm", 32, ("-mavx2",), ("avx2",), _Y,
         f"{_Y} a = _mm256_set1_epi8(3), w = _mm256_set1_epi8(-2), ones = _mm256_set1_epi16(1);",
         "{acc} = _mm256_add_epi32({acc}, _mm256_madd_epi16(_mm256_maddubs_epi16(a, w), ones));"),
    Loop("i8_maddubs_zmm", 64, ("-mavx512f", "-mavx512bw"), ("avx512bw",), _Z,
         f"{_Z} a = _mm512_set1_epi8(3), w = _mm512_set1_epi8(-2), ones = _mm512_set1_epi16(1);",
         "{acc} = _mm512_add_epi32({acc}, _mm512_madd_epi16(_mm512_maddubs_epi16(a, w), ones));"),
    Loop("tern_maddubs_ymm", 32, ("-mavx2",), ("avx2",), _Y,
         f"{_Y} a = _mm256_set1_epi8(3), w = _mm256_set1_epi8(-1), codes = _mm256_set1_epi16(5);",
         "{acc} = _mm256_add_epi16({acc}, _mm256_maddubs_epi16(a, w));",
         every="{acc}_32 = _mm256_add_epi32({acc}_32, _mm256_madd_epi16({acc}, codes)); "
               "{acc} = _mm256_setzero_si256();",
         extra_chain=f"{_Y} {{acc}}_32 = _mm256_setzero_si256();", chains=6),
    Loop("tern_maddubs_zmm", 64, ("-mavx512f", "-mavx512bw"), ("avx512bw",), _Z,
         f"{_Z} a = _mm512_set1_epi8(3), w = _mm512_set1_epi8(-1), codes = _mm512_set1_epi16(5);",
         "{acc} = _mm512_add_epi16({acc}, _mm512_maddubs_epi16(a, w));",
         every="{acc}_32 = _mm512_add_epi32({acc}_32, _mm512_madd_epi16({acc}, codes)); "
               "{acc} = _mm512_setzero_si512();",
         extra_chain=f"{_Z} {{acc}}_32 = _mm512_setzero_si512();"),
    Loop("vnni_ymm", 32, ("-mavx2", "-mavxvnni"), ("avx_vnni",), _Y,
         f"{_Y} a = _mm256_set1_epi8(3), w = _mm256_set1_epi8(-2);",
         "{acc} = _mm256_dpbusd_avx_epi32({acc}, a, w);"),
    Loop("vnni_zmm", 64, ("-mavx512f", "-mavx512bw", "-mavx512vnni"), ("avx512_vnni",), _Z,
         f"{_Z} a = _mm512_set1_epi8(3), w = _mm512_set1_epi8(-2);",
         "{acc} = _mm512_dpbusd_epi32({acc}, a, w);"),
]

AMX_ACC_TILES = 4  # tmm0-3 accumulate, tmm4-5 hold A (u8), tmm6-7 hold B (s8, VNNI layout)


def amx_source() -> str:
    """``argv[1]`` threads each run back-to-back ``tdpbusd`` into four accumulator tiles (a 2 x 2
    block of 16 x 16 int32 outputs, the A and B tiles loaded once); prints the total G MAC/s."""
    dots = " ".join(f"_tile_dpbusd({i}, {4 + i // 2}, {6 + i % 2});"
                    for i in range(AMX_ACC_TILES))
    return f"""#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
static unsigned char ops[1024] __attribute__((aligned(64)));
static void *work(void *out) {{
  unsigned char cfg[64] __attribute__((aligned(64)));
  memset(cfg, 0, sizeof cfg);
  cfg[0] = 1;  /* palette 1; every tile 16 rows x 64 bytes */
  for (int t = 0; t < 8; t++) {{ cfg[16 + 2 * t] = 64; cfg[48 + t] = 16; }}
  _tile_loadconfig(cfg);  /* per thread */
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  _tile_loadd(4, ops, 64); _tile_loadd(5, ops, 64); _tile_loadd(6, ops, 64); _tile_loadd(7, ops, 64);
  for (long it = 0; it < {ITERS // 16}L; it++) {{
    {dots}
  }}
  int res[256] __attribute__((aligned(64)));
  _tile_stored(0, res, 64);
  _tile_release();
  *(long *)out = res[0];
  return 0;
}}
int main(int argc, char **argv) {{
  int n = atoi(argv[1]); pthread_t th[256]; long sink[256]; struct timespec t0, t1;
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */)) return 3;
  for (int i = 0; i < 1024; i++) ops[i] = (unsigned char)(i % 3);
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int i = 0; i < n; i++) pthread_create(&th[i], 0, work, &sink[i]);
  for (int i = 0; i < n; i++) pthread_join(th[i], 0);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
  printf("%f\\n", {AMX_ACC_TILES}.0 * 16384.0 * {ITERS // 16}.0 * n / s / 1e9);
  return sink[0] == 42;
}}
"""


LOOPS.append(Loop("amx_tdpbusd", 16384, ("-mamx-tile", "-mamx-int8"), ("amx_tile", "amx_int8"),
                  "", "", "", chains=AMX_ACC_TILES, program=amx_source()))


def c_source(loop: Loop) -> str:
    """One program: ``argv[1]`` threads each run the loop; prints the total G MAC/s."""
    chains = [f"c{i}" for i in range(loop.chains)]
    zero = f"{loop.vtype} " + ", ".join(f"{c} = ({loop.vtype}){{0}}" for c in chains) + ";"
    extra = "\n".join(loop.extra_chain.format(acc=c) for c in chains) if loop.extra_chain else ""
    # `a` made opaque between the chains' steps: otherwise the compiler computes a product
    # that does not involve the accumulator (maddubs(a, w)) once for all chains; the chain
    # too, so that the steps keep their order (else gcc hoists all products of an unrolled
    # group first and spills them)
    steps = "\n".join(f"    {loop.step.format(acc=c)} __asm__ volatile(\"\" : \"+v\"(a), \"+v\"({c}));"
                      for c in chains)
    # a loop with a per-group statement runs TERNARY_GROUP_STEPS steps per iteration, written
    # out, then the statement: no branch in the loop (a branch every step cost Zen 3 ~40%), and
    # the second per-chain vectors are live (opaque and summed into the sink below), so the
    # compiler cannot drop the code multiply as dead
    unroll = TERNARY_GROUP_STEPS if loop.every else 1
    steps = "\n".join([steps] * unroll)
    every = "    " + " ".join(loop.every.format(acc=c) for c in chains) if loop.every else ""
    live = chains + ([f"{c}_32" for c in chains] if loop.extra_chain else [])
    # chains and operands opaque to the compiler: no merging of identical chains and no
    # hoisting of a loop-invariant product out of the loop; everything stays in registers.
    # gcc allows 30 asm operands and an in-out one counts twice: one statement per 14 vectors
    names = live + list(loop.operands)
    opaque = " ".join('__asm__ volatile("" : ' + ", ".join(f'"+v"({c})' for c in names[i:i + 14])
                      + ");" for i in range(0, len(names), 14))
    sink = " ^ ".join(f"((volatile long *)&{c})[0]" for c in live)
    iters = ITERS // unroll
    return f"""#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static void *work(void *out) {{
  {loop.init}
  {zero}
  {extra}
  for (long it = 0; it < {iters}L; it++) {{
{steps}
{every}
    {opaque}
  }}
  *(long *)out = {sink};
  return 0;
}}
int main(int argc, char **argv) {{
  int n = atoi(argv[1]); pthread_t th[256]; long sink[256]; struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int i = 0; i < n; i++) pthread_create(&th[i], 0, work, &sink[i]);
  for (int i = 0; i < n; i++) pthread_join(th[i], 0);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
  printf("%f\\n", {loop.chains}.0 * {loop.macs_per_step}.0 * {iters * unroll}.0 * n / s / 1e9);
  return sink[0] == 42;
}}
"""


def host_cpuinfo_flags() -> set:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def measure(loop: Loop, *, threads: int, repeat: int, workdir: Path) -> list:
    """G MAC/s of ``repeat`` runs of ``loop`` on ``threads`` threads."""
    src, exe = workdir / f"{loop.name}.c", workdir / loop.name
    src.write_text(loop.program or c_source(loop))
    subprocess.run(["gcc", "-O2", *loop.flags, "-pthread", str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    return [float(subprocess.run([str(exe), str(threads)], check=True, capture_output=True,
                                 text=True).stdout) for _ in range(repeat)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="threads running each loop")
    parser.add_argument("--repeat", type=int, default=5, help="runs per loop (median and max)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    host = host_cpuinfo_flags()
    results, skipped = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for loop in LOOPS:
            missing = [f for f in loop.cpuinfo if f not in host]
            if missing:
                skipped[loop.name] = "host lacks " + ", ".join(missing)
                continue
            runs = measure(loop, threads=args.threads, repeat=args.repeat, workdir=Path(tmp))
            results[loop.name] = {"median_gmacs": round(statistics.median(runs), 1),
                                  "max_gmacs": round(max(runs), 1), "runs": len(runs)}
    best_int8 = max((results[n]["median_gmacs"] for n in ("i8_maddubs_ymm", "i8_maddubs_zmm",
                                                         "vnni_ymm", "vnni_zmm") if n in results),
                    default=None)
    print(f"inner-loop peaks, G MAC/s ({args.threads} thread(s), median of {args.repeat}; ratios to "
          "the best vector int8 loop):")
    for name, r in results.items():
        ratio = f"  {r['median_gmacs'] / best_int8:.2f}x" if best_int8 else ""
        print(f"  {name:18s} {r['median_gmacs']:8.1f}  (max {r['max_gmacs']:.1f}){ratio}")
    for name, why in skipped.items():
        print(f"  {name:18s} skipped: {why}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**machine_stamp(args.threads), "accumulator_chains": ACCS,
                                         "ternary_group_steps": TERNARY_GROUP_STEPS,
                                         "loops": results, "skipped": skipped}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
