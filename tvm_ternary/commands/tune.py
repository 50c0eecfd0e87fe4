"""``tvm-ternary tune``: auto-tune a model's kernels for one CPU (here or over TVM RPC)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
import time
from pathlib import Path

from . import Command
from ._options import (
    add_preprocess_arguments,
    add_quant_arguments,
    add_calibration_arguments,
    check_config,
    load_calibration,
    parse_input_shapes,
    positive_int,
    preprocess_config,
    quant_config,
)

DESCRIPTION = """\
Tune the kernels of a model for one CPU with MetaSchedule: every distinct ternary/int8 kernel
the compile flow builds (same quantization and calibration options as compile) is a task; its
search space is the hand schedule with the register-tile knobs (ow_block, oc_tiles, decode_at)
sampled, so the VNNI/AVX2 tensorization is kept. Records go to a JSON database in
DIR/<mcpu>-<feature hash>/ (one DIR serves several CPUs); compile --tuning-db DIR applies them.
Ctrl-C stops after the running batch and keeps every measured record; running the same command
again continues (tasks with enough records are skipped, the others topped up).
Remote: start `python -m tvm.exec.rpc_tracker` somewhere and `python -m tvm.exec.rpc_server
--tracker HOST:PORT --key KEY` on the device; candidates are built here for --target and
measured there."""

EPILOG = """\
examples:
  tvm-ternary tune model.onnx --db tuning-db --calib calib.npy --trials-per-task 16
  tvm-ternary tune model.onnx --db tuning-db --calib calib.npy --target icelake-server \\
      --rpc-tracker 10.0.0.5:9190 --rpc-key icelake --time-budget 60"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx", type=Path, help="float ONNX model")
    parser.add_argument("--db", required=True, type=Path, metavar="DIR", help="tuning database directory")
    parser.add_argument("--target", default="host", metavar="host|MCPU",
                        help="CPU to tune for: host (detected) or an LLVM mcpu such as znver4, icelake-server")
    parser.add_argument("--trials-per-task", type=positive_int, default=32, metavar="N",
                        help="measured configurations per kernel, default included (default 32; "
                             "capped at the kernel's search space)")
    parser.add_argument("--trials", type=positive_int, metavar="N", help="at most N trials in this run, all kernels together")
    parser.add_argument("--time-budget", type=float, metavar="MIN",
                        help="stop starting new batches after MIN minutes (records so far are kept)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars on stderr")
    parser.add_argument("--layers", metavar="NAME[,NAME...]",
                        help="tune only the kernels of these layers (default: every kernel)")
    rpc = parser.add_argument_group("remote measurement (TVM RPC tracker)")
    rpc.add_argument("--rpc-tracker", metavar="HOST:PORT", help="tracker address")
    rpc.add_argument("--rpc-key", metavar="KEY", help="device key the RPC server registered with")
    rpc.add_argument("--rpc-timeout", type=positive_int, default=60, metavar="S",
                     help="seconds to wait for a device session / one measurement (default 60)")
    parser.add_argument("--calib", type=Path, metavar="DIR|FILE.npy",
                        help="calibration images: a folder (with --preprocess) or a stacked .npy "
                             "(required for a float model)")
    add_calibration_arguments(parser)
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME:1,3,224,224",
                        help="static input shape (needed when the model's batch is dynamic)")
    add_quant_arguments(parser)
    add_preprocess_arguments(parser)


def _device(args):
    from ..errors import OptionError
    from ..tuning import RpcDevice

    if (args.rpc_tracker is None) != (args.rpc_key is None):
        raise OptionError("--rpc-tracker and --rpc-key go together")
    if args.rpc_tracker is None:
        return None
    if args.target == "host":
        raise OptionError("--rpc-tracker needs --target MCPU: the CPU of the remote device, which "
                          "candidates are cross-compiled for")
    return RpcDevice.parse(args.rpc_tracker, key=args.rpc_key, timeout_s=args.rpc_timeout)


def _check_extra() -> None:
    import importlib.util

    from ..errors import UserError

    missing = [m for m in ("xgboost", "tornado", "psutil", "cloudpickle") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"tune needs {', '.join(missing)}: pip install 'tvm_ternary[tune]'")


def run(args: argparse.Namespace) -> int:
    _check_extra()  # psutil among them, which the cleanup needs
    from ..tuning.processes import child_pids, end_children

    keep = child_pids()  # an in-process caller's own processes are not ours to end
    try:
        return _run(args)
    finally:  # every exit path: MetaSchedule's popen workers would outlive us otherwise
        with _ctrl_c_stops_now(keep):
            end_children(keep=keep)


@contextlib.contextmanager
def _ctrl_c_stops_now(keep):
    """While cleaning up after a Ctrl-C, another one ends the cleanup at once (exit 130)
    rather than a traceback from the middle of it."""
    from ..tuning.processes import stop_now

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: stop_now(
        "tvm-ternary: error: interrupted twice: stopped now", keep=keep))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _run(args: argparse.Namespace) -> int:
    from .. import cpu_features, onnx_io
    from ..errors import OptionError
    from .compile import _target

    start = time.perf_counter()
    _check_extra()
    config = quant_config(args)
    preprocess = preprocess_config(args)
    if args.time_budget is not None and args.time_budget <= 0:
        raise OptionError(f"--time-budget wants a positive number of minutes, got {args.time_budget}")
    rpc = _device(args)
    target = _target(args.target)
    model = onnx_io.load_model(args.model)
    shapes = parse_input_shapes(args.input_shape)
    from ..passes.onnx_normalize import normalize_onnx

    prep = normalize_onnx(model, input_shapes=shapes)
    if not prep.is_quantized and args.calib is None:  # a QDQ model carries its activation formats
        raise OptionError("--calib DIR|FILE.npy is required for a float model: kernel specs depend "
                          "on calibrated activation formats (a QDQ-quantized model needs none)")

    from ..tuning import (
        TuneOptions,
        check_device,
        model_tasks,
        open_database,
        tune_tasks,
    )

    # cheap checks first: the model and options, the device and the database, before calibration
    if not prep.is_quantized:  # a QDQ model's formats are its own, not the policy's
        check_config(prep.model, config)
    check_device(target=target, rpc=rpc, host_features=cpu_features.host_features())
    tdb = open_database(args.db, target=target, create=True)
    try:
        for note in tdb.notes:
            print(f"note: {note}", flush=True)
        images = None
        if not prep.is_quantized:
            images, _ = load_calibration(args.calib, preprocess=preprocess, input_shape=prep.input_shape,
                                         limit=args.calib_limit, seed=args.calib_seed)
        tasks, untuned = model_tasks(model, config=config, calib_images=images, target=target, input_shapes=shapes,
                                     progress=not args.quiet, prepared=prep)
        if args.layers:
            wanted = {name.strip() for name in args.layers.split(",") if name.strip()}
            known = {layer for task in tasks for layer in task.layers}
            unknown = sorted(wanted - known)
            if unknown:
                raise OptionError(f"--layers: no tunable kernel for {', '.join(unknown)} "
                                  f"(tunable layers: {', '.join(sorted(known))})")
            tasks = [task for task in tasks if wanted & set(task.layers)]
        where = f"on {rpc.key} via {rpc.host}:{rpc.port}" if rpc else "on this host"
        print(f"tuning {len(tasks)} kernels for {tdb.mcpu} {where} into {tdb.path}"
              + (f"; not tunable: {', '.join(f'{k} ({v})' for k, v in untuned.items())}" if untuned else ""),
              flush=True)
        options = TuneOptions(trials_per_task=args.trials_per_task, max_trials=args.trials,
                              time_budget_s=None if args.time_budget is None else args.time_budget * 60, rpc=rpc)
        try:
            results = tune_tasks(tasks, tdb=tdb, target=target, options=options, progress=not args.quiet)
        except KeyboardInterrupt:
            print(f"interrupted: every measured record is kept in {tdb.path}; run the same command to continue",
                  flush=True)
            raise
    finally:
        tdb.close()  # releases the database lock (an in-process caller may compile with it next)
    print(format_results(results))
    print(f"database {tdb.path}: {len(tdb.db)} records; tune time {time.perf_counter() - start:.1f} s")
    return 0


def format_results(results) -> str:
    from ..tuning.driver import format_time

    head = ("kernel", "shape", "status", "trials", "default", "best", "speedup", "best tiling")
    rows = [head] + [(r.name, r.kernel, r.status, f"{r.trials}/{r.space}",
                      format_time(None if r.default_ms is None else r.default_ms / 1e3),
                      format_time(None if r.best_ms is None else r.best_ms / 1e3),
                      "-" if r.speedup is None else f"{r.speedup:.2f}x",
                      "-" if r.best is None else f"ow_block={r.best.ow_block} oc_tiles={r.best.oc_tiles} "
                                                 f"decode_at={r.best.decode_at}") for r in results]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


COMMAND = Command(name="tune", summary="auto-tune a model's kernels for a CPU (MetaSchedule, local or RPC)",
                  add_arguments=add_arguments, run=run, description=DESCRIPTION, epilog=EPILOG)
