#!/usr/bin/env python3
"""Tune ResNet-50's ternary kernels with MetaSchedule and compare with the untuned defaults.

    python scripts/tune_resnet50.py --db tuning-db --trials-per-task 8 --json tune_resnet50.json
    python scripts/tune_resnet50.py --model resnet50.onnx --db tuning-db ...   # the model's own kernels

Tasks: by default the distinct conv shapes of ResNet-50 and its fc, built as
``scripts/bench_kernels.py`` builds them (each in its role in the model: 2-bit weights, u8 in,
bias + [residual] + [ReLU] + requantize to u8 or s8; the stem and fc with 8-bit weights, the fc
dequantizing to f32) — no ONNX, torch or calibration needed. With ``--model`` (e.g. from
``scripts/export_resnet.py``) the tasks are the kernels the compile flow builds for that model
(calibrated on ``--calib-random`` random images, ``--method exact``).

Report per kernel: default and tuned latency (MetaSchedule's measurements: all cores, median of
3 repeats), speedup, % of the measured vpdpbusd peak (``_bench_common.measure_vnni_peak`` on as
many threads), and the kernel-time sum over the network (each shape times its count) for
default vs tuned. Also the tuning time and seconds per measured trial. Runs are resumable: the
same ``--db`` continues.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import machine_stamp, measure_vnni_peak  # noqa: E402
from bench_kernels import model_layers, our_spec  # noqa: E402

from tvm_ternary import tvm_adapter as ta  # noqa: E402
from tvm_ternary.tuning import TuneOptions, kernel_task, model_tasks, open_database, tune_tasks  # noqa: E402


def arch_tasks(target, isa: str, group_size: int):
    """(tasks, counts): ResNet-50's distinct conv shapes + fc as tuning tasks."""
    tasks, counts = [], {}
    for name, kw, count, role in model_layers("resnet50", 1):
        spec = our_spec(kw, bits=8 if role in ("stem", "fc") else 2, group_size=group_size, role=role)
        task = kernel_task(spec, isa=isa, target=target, name=name)
        tasks.append(task)
        counts[name] = count
    return tasks, counts


def onnx_tasks(path: Path, target, n_images: int):
    from tvm_ternary.onnx_io import load_model
    from tvm_ternary.plan import QuantConfig

    model = load_model(path)
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    images = np.random.default_rng(0).normal(size=(n_images, *shape[1:])).astype(np.float32)
    tasks, _ = model_tasks(model, config=QuantConfig(method="exact"), calib_images=images, target=target,
                           progress=True)
    return tasks, {t.name: len(t.layers) for t in tasks}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--db", type=Path, required=True, help="tuning database DIR (resumable)")
    p.add_argument("--model", type=Path, help="ResNet-50 ONNX (default: shapes from the architecture)")
    p.add_argument("--calib-random", type=int, default=4, help="random calibration images with --model")
    p.add_argument("--trials-per-task", type=int, default=8)
    p.add_argument("--time-budget", type=float, help="minutes")
    p.add_argument("--only", help="comma-separated task names (default: all)")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    target = ta.host_target()
    isa = ta.choose_isa(target)
    threads = os.cpu_count() or 1
    tasks, counts = (onnx_tasks(args.model, target, args.calib_random) if args.model
                     else arch_tasks(target, isa, args.group_size))
    if args.only:
        wanted = set(args.only.split(","))
        tasks = [t for t in tasks if t.name in wanted]
    peak = measure_vnni_peak(threads) if isa == "vnni512" else None
    print(f"{len(tasks)} tasks on {ta.host_cpu()} ({isa}); vpdpbusd peak "
          f"{'n/a' if peak is None else f'{peak:.0f} GMAC/s'} on {threads} threads", flush=True)

    tdb = open_database(args.db, target=target, create=True)
    before = len(tdb.db)
    start = time.perf_counter()
    results = tune_tasks(tasks, tdb=tdb, target=target,
                         options=TuneOptions(trials_per_task=args.trials_per_task,
                                             time_budget_s=None if args.time_budget is None else args.time_budget * 60))
    seconds = time.perf_counter() - start
    measured = len(tdb.db) - before

    rows, sum_default, sum_best = [], 0.0, 0.0
    print(f"\n{'kernel':18} {'n':>2} {'default ms':>10} {'tuned ms':>9} {'speedup':>7} {'%peak def':>9} "
          f"{'%peak tuned':>11}  trials  best tiling")
    for task, r in zip(tasks, results):
        macs = task.spec.macs

        def pct(ms, macs=macs):
            return None if peak is None or not ms else 100 * macs / (ms * 1e-3) / (peak * 1e9)
        row = {"kernel": r.name, "shape": r.kernel, "count": counts.get(r.name, 1), "macs": macs,
               "default_ms": r.default_ms, "tuned_ms": r.best_ms, "speedup": r.speedup,
               "pct_peak_default": pct(r.default_ms), "pct_peak_tuned": pct(r.best_ms),
               "trials": r.trials, "space": r.space, "status": r.status,
               "best_tiling": None if r.best is None else vars(r.best).copy(),
               "default_tiling": vars(task.default).copy()}
        rows.append(row)
        if r.default_ms and r.best_ms:
            sum_default += row["count"] * r.default_ms
            sum_best += row["count"] * r.best_ms
        f = (lambda v, w, d: f"{v:{w}.{d}f}" if v is not None else " " * (w - 1) + "-")
        print(f"{r.name:18} {row['count']:>2} {f(r.default_ms, 10, 4)} {f(r.best_ms, 9, 4)} "
              f"{f(r.speedup, 7, 2)} {f(row['pct_peak_default'], 9, 1)} {f(row['pct_peak_tuned'], 11, 1)}  "
              f"{r.trials:>2}/{r.space:<3} {row['best_tiling']}")
    print(f"\nkernel-time sum over the network (count x latency): default {sum_default:.3f} ms, "
          f"tuned {sum_best:.3f} ms ({sum_default / sum_best if sum_best else float('nan'):.3f}x)")
    per_trial = seconds / measured if measured else None
    print(f"tuning: {measured} measurements in {seconds:.0f} s"
          + (f" = {per_trial:.1f} s per trial" if per_trial else ""))
    if args.json:
        out = {"machine": machine_stamp(threads), "isa": isa, "peak_gmacs": peak, "threads": threads,
               "budget": {"trials_per_task": args.trials_per_task, "time_budget_min": args.time_budget},
               "tune_seconds": seconds, "measurements": measured, "seconds_per_trial": per_trial,
               "sum_default_ms": sum_default, "sum_tuned_ms": sum_best, "kernels": rows,
               "source": str(args.model) if args.model else "resnet50 architecture (bench_kernels shapes)"}
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
