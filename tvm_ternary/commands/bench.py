"""``tvm-ternary bench``: time a compiled library as a user loads it (runtime only)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from . import Command
from ._options import positive_int

DESCRIPTION = """\
Load MODEL.so as `run` does (sidecar and CPU features checked, runtime only) and time it on
random input of the library's shape: latency median / p90 / p99 / min in ms and throughput,
stamped with the CPU model, ISA flags, thread count and versions. --threads sizes TVM's
thread pool for the timing (the count is read back from the runtime and reported); without
it the runtime's default pool is used (TVM_NUM_THREADS, else half the logical CPUs).
--profile adds the per-call table: each kernel's median time, share and G MAC/s (with --peak,
also as a share of the host's measured vpdpbusd peak)."""

EPILOG = """\
examples:
  tvm-ternary bench squeezenet.so --threads 1 --json b1.json
  tvm-ternary bench squeezenet.so --threads 2 --seconds 5 --profile"""


def non_negative_int(text: str) -> int:
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("library", metavar="MODEL.so", type=Path, help="library written by compile")
    parser.add_argument("--threads", type=positive_int, metavar="N", help="TVM thread-pool size for the timing")
    parser.add_argument("--batch", type=positive_int, metavar="B",
                        help="samples per timed call (default the library's batch; a batch-1 library "
                             "runs B calls back to back)")
    parser.add_argument("--warmup", type=non_negative_int, default=10, metavar="W",
                        help="untimed calls first (default 10)")
    how_long = parser.add_mutually_exclusive_group()
    how_long.add_argument("--runs", type=positive_int, metavar="R", help="timed calls")
    how_long.add_argument("--seconds", type=positive_float, metavar="S",
                          help="time calls for S seconds, at least 10 (default 1)")
    parser.add_argument("--profile", action="store_true", help="also the per-call profile table")
    parser.add_argument("--profile-runs", type=positive_int, default=20, metavar="R",
                        help="runs the per-call medians are taken over (default 20)")
    parser.add_argument("--peak", action="store_true",
                        help="with --profile: each layer as %% of the host's vpdpbusd peak (AVX512-VNNI "
                             "libraries; measured with gcc-built code at the same thread count)")
    parser.add_argument("--json", type=Path, metavar="OUT.json", help="write the result here")


def run(args: argparse.Namespace) -> int:
    from ..benchmark import bench_library, format_profile
    from ..errors import UserError

    if args.json is not None:  # checked first: do not time for nothing
        if not args.json.parent.is_dir():
            raise UserError(f"{args.json.parent}: output directory does not exist")
        if args.json.is_dir():
            raise UserError(f"{args.json}: is a directory, expected a JSON file name")
    seconds = args.seconds if args.seconds is not None else (None if args.runs else 1.0)
    result = bench_library(args.library, threads=args.threads, batch=args.batch, warmup=args.warmup,
                           runs=args.runs, seconds=seconds, profile_runs=args.profile_runs if args.profile else 0,
                           peak=args.peak)
    print(format_result(result))
    if "profile" in result:
        print(f"\nper-call profile ({args.profile_runs} runs, batch {result['input_shape'][0]}, "
              f"{result['threads']} thread(s)):")
        print(format_profile(result["profile"]))
    if args.peak:
        print(f"host vpdpbusd peak at {result['threads']} thread(s): {result['peak_gmacs_per_s']:.0f} G MAC/s"
              if result.get("peak_gmacs_per_s") else result["peak_note"])
    if args.json is not None:
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        try:
            tmp.write_text(json.dumps(result, indent=1, default=str))
            os.replace(tmp, args.json)
        finally:
            tmp.unlink(missing_ok=True)
        print(f"wrote {args.json}")
    return 0


def format_result(r: dict) -> str:
    s = r["stamp"]
    target = r.get("target") or {}
    return "\n".join([
        f"{Path(r['library']).name}: input {r['input_shape']}, batch {r['batch']}, {r['threads']} thread(s), "
        f"{r['runs']} timed runs after {r['warmup']} warm-up; built for {target.get('mcpu', '?')} "
        f"({target.get('isa', '?')})",
        f"latency ms: median {r['median_ms']:.3f}  p90 {r['p90_ms']:.3f}  p99 {r['p99_ms']:.3f}  "
        f"min {r['min_ms']:.3f}  mean {r['mean_ms']:.3f}",
        f"throughput: {r['throughput_per_s']:.1f} samples/s",
        f"host: {s['cpu']}, {s['cores']} logical CPUs, {' '.join(s['isa_flags']) or 'no AVX2'}; load average "
        f"{s['loadavg']}; TVM {s['versions'].get('tvm', '?')}, tvm_ternary {s['versions']['tvm_ternary']}",
    ])


COMMAND = Command(name="bench", summary="time a compiled library: latency percentiles, throughput, profile",
                  add_arguments=add_arguments, run=run, description=DESCRIPTION, epilog=EPILOG)
