"""Every MetaSchedule / RPC call of the tuner (sibling of :mod:`tvm_ternary.tvm_adapter`).

The tuner's ``tvm.*`` calls churn like the rest (``tvm.s_tir.meta_schedule`` was
``tvm.meta_schedule`` one release ago), so they live here, as small flat functions;
``tvm_adapter`` holds the compiler's.  Written against apache-tvm 0.27.

Example::

    from tvm_ternary import tvm_tuning_adapter as tta
    mod = tta.workload_module(func)                       # what records are keyed on
    db = tta.open_database("db/znver4-1a2b3c", create=True)
    ctx = tta.tune_context(mod, target=target, space=tta.schedule_fn_space(fn), name="conv0")
    tta.tune(ctx, database=db, builder=tta.local_builder(), runner=tta.local_runner(),
             max_trials=16, trials_per_iter=8, on_batch=print)
"""

from __future__ import annotations

import socket

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule import _ffi_api
from tvm.s_tir.meta_schedule.logging import get_logger, get_logging_func

# Seconds a failed candidate is recorded with (MetaSchedule's own marker: 1e10).
FAILED_SECONDS = 1e9


# ---------------------------------------------------------------- workloads and schedules


def workload_module(func) -> tvm.IRModule:
    """The IRModule a tuning record is keyed on (its structural hash).

    The builder needs ``global_symbol`` (MakePackedAPI skips functions without one); the
    kernels in a Relax module have none, so tuner and compile flow both call this.
    """
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def func_of_schedule(sch):
    """The scheduled PrimFunc, without the global symbol (ready for a Relax module)."""
    return sch.mod["main"].without_attr("global_symbol")


def schedule_fn_space(fn):
    """A design-space generator running ``fn(sch) -> [Schedule, ...]`` and nothing else:
    no MetaSchedule rules (AutoInline would inline the weight decode and lose tensorization),
    no postprocessors (our schedule parallelises, vectorises and tensorizes itself), no
    mutators (none applies to ``sample_categorical``; the initial population covers our
    small spaces)."""
    return ms.space_generator.ScheduleFn(fn, sch_rules=[], postprocs=[], mutator_probs={})


def new_schedule(mod, *, seed: int = 1):
    return tvm.s_tir.Schedule(mod, seed=seed)


def sampling_decisions(trace) -> list[tuple[list[int], int]]:
    """``(candidates, decision index)`` of every ``sample_categorical`` in ``trace``, in order."""
    out = []
    for inst in trace.insts:
        if str(inst.kind.name) == "SampleCategorical":
            candidates = [int(c) for c in inst.attrs[0]]
            out.append((candidates, int(trace.decisions[inst])))
    return out


def trace_computes_at(trace, block: str) -> bool:
    """True when ``trace`` moves the block named ``block`` under a loop (``compute_at``)."""
    names = {}
    for inst in trace.insts:
        kind = str(inst.kind.name)
        if kind == "GetSBlock":
            names[inst.outputs[0]] = str(inst.attrs[0])
        elif kind == "ComputeAt" and names.get(inst.inputs[0]) == block:
            return True
    return False


def tune_context(mod, *, target, space, name: str, num_threads: int, seed: int = -1):
    """A TuneContext with an evolutionary search over ``space``.

    The initial population takes no records from the database (``init_measured_ratio=0``):
    the search would measure them again (it only remembers what it measured in this run); our
    space generator leaves measured configurations out instead.  Built through the FFI
    constructor: ``TuneContext.__init__`` imports ``tvm.s_tir.tensor_intrin`` (every
    CUDA/ROCm/Hexagon intrinsic), 20-45 s on 2 cores, and our spaces use none of them.
    """
    search = ms.search_strategy.EvolutionarySearch(init_measured_ratio=0.0)
    ctx = ms.TuneContext.__new__(ms.TuneContext)
    ctx.__init_handle_by_constructor__(
        _ffi_api.TuneContext, mod, target, space, search,
        name, int(num_threads), int(seed), get_logging_func(get_logger("tvm_ternary.tune")))
    _ffi_api.TuneContextInitialize(ctx)
    return ctx


# ---------------------------------------------------------------- database


def open_database(path: str, *, create: bool):
    """MetaSchedule's JSON database in ``path`` (``database_workload.json`` +
    ``database_tuning_record.json``); both files are appended to, one line per record.
    ``create=False`` fails when they are missing instead of creating them."""
    return ms.database.JSONDatabase(work_dir=str(path), allow_missing=create)


def workload_records(db, mod) -> list:
    """Every record of ``mod`` (valid or failed), without writing to ``db``."""
    if not db.has_workload(mod):
        return []
    workload = db.commit_workload(mod)  # present already: returns it, writes nothing
    return [r for r in db.get_all_tuning_records() if r.workload.same_as(workload)]


def record_seconds(record) -> float:
    """Mean measured seconds of ``record`` (``FAILED_SECONDS`` or more when it failed)."""
    secs = [float(s) for s in (record.run_secs or [])]
    return sum(secs) / len(secs) if secs else float("inf")


def best_record(db, mod, *, target):
    """The fastest valid record of ``mod``, or None."""
    if not db.has_workload(mod):
        return None
    return db.query_tuning_record(mod, target, "main")


def schedule_of_record(record, mod):
    """Replay ``record``'s trace on ``mod`` (the workload) and return the schedule."""
    sch = tvm.s_tir.Schedule(mod)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    return sch


def commit_record(db, *, mod, sch, seconds: list[float], target) -> None:
    """Append a measured schedule of ``mod`` to ``db``."""
    workload = db.commit_workload(mod)
    args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    db.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, workload, [float(s) for s in seconds], target, args))


# ---------------------------------------------------------------- builders and runners


def _build(mod, target, _params):
    # Runs in the builder's worker process. MetaSchedule's default build imports
    # tvm.s_tir.tensor_intrin (20-45 s per worker, and LocalBuilder starts new workers for
    # every batch); plain TIR build is all our kernels need. Returns a runtime Module
    # (tvm.compile's Executable cannot cross the FFI into the exporter).
    return tvm.tirx.build(mod, target=target)


def local_builder(*, workers: int, timeout_s: float = 120.0):
    """Compiles candidates locally (cross-compiling when the target is another CPU)."""
    from .tuning.processes import watch_parent

    return ms.builder.LocalBuilder(max_workers=workers, timeout_sec=timeout_s, f_build=_build,
                                   initializer=watch_parent)


def _evaluator(number: int, repeat: int, min_repeat_ms: int):
    return ms.runner.EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=min_repeat_ms,
                                     enable_cpu_cache_flush=False)


def local_runner(*, number: int = 3, repeat: int = 3, min_repeat_ms: int = 50, timeout_s: float = 60.0):
    """Measures on this machine (one worker: concurrent runs would disturb each other)."""
    from .tuning.processes import watch_parent

    return ms.runner.LocalRunner(evaluator_config=_evaluator(number, repeat, min_repeat_ms),
                                 timeout_sec=timeout_s, initializer=watch_parent)


def rpc_runner(*, host: str, port: int, key: str, session_timeout_s: int = 60, number: int = 3,
               repeat: int = 3, min_repeat_ms: int = 50):
    """Measures on a device registered at a TVM RPC tracker under ``key``."""
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=key,
                                 session_priority=1, session_timeout_sec=int(session_timeout_s))
    from .tuning.processes import watch_parent

    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=_evaluator(number, repeat, min_repeat_ms),
                               max_workers=1, initializer=watch_parent)


def close_runner(runner) -> None:
    """End a runner's worker pool now (LocalRunner keeps one for its lifetime)."""
    pool = getattr(runner, "pool", None)
    if pool is not None and not getattr(pool, "_shutdown", True):
        pool.shutdown(wait=False)


def measure(mod, *, target, builder, runner) -> tuple[list[float] | None, str | None]:
    """Build and run one scheduled module: ``(seconds per repeat, None)`` or ``(None, error)``."""
    built = builder.build([ms.builder.BuilderInput(mod, target)])[0]
    if built.error_msg:
        return None, str(built.error_msg)
    args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    try:
        result = runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu", args)])[0].result()
    finally:
        ms.utils.remove_build_dir(built.artifact_path)
    if result.error_msg:
        return None, str(result.error_msg)
    return [float(s) for s in result.run_secs], None


# ---------------------------------------------------------------- tuning


@derived_object
class _BatchCallback(ms.measure_callback.PyMeasureCallback):
    def __init__(self, on_batch):
        super().__init__()
        self.on_batch = on_batch

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        secs = []
        for built, ran in zip(builder_results, runner_results):
            ok = built.error_msg is None and ran.error_msg is None and ran.run_secs
            secs.append(sum(float(s) for s in ran.run_secs) / len(ran.run_secs) if ok else None)
        errors = [str(b.error_msg or r.error_msg) for b, r in zip(builder_results, runner_results)
                  if b.error_msg or r.error_msg]
        self.on_batch(secs, errors)


def tune(ctx, *, database, builder, runner, max_trials: int, trials_per_iter: int, on_batch,
         cost_model=None) -> None:
    """Tune one task. ``on_batch(seconds_or_None_per_candidate, error_messages)`` runs after
    each batch, once its records are in ``database`` (MetaSchedule's AddToDatabase comes
    first in the callback list); an exception it raises ends the tuning there."""
    callbacks = list(ms.measure_callback.MeasureCallback.create("default")) + [_BatchCallback(on_batch)]
    ms.tune_tasks(tasks=[ctx], task_weights=[1.0], work_dir=database.path_workload.rsplit("/", 1)[0],
                  max_trials_global=int(max_trials), max_trials_per_task=int(max_trials),
                  num_trials_per_iter=int(trials_per_iter), builder=builder, runner=runner,
                  database=database, cost_model=cost_model or xgb_cost_model(ctx.num_threads),
                  measure_callbacks=callbacks, task_scheduler="round-robin")


def xgb_cost_model(threads: int):
    """MetaSchedule's XGBoost cost model (needs the ``xgboost`` package)."""
    return ms.cost_model.XGBModel(num_tuning_cores=int(threads))


# ---------------------------------------------------------------- RPC tracker


def tracker_reachable(host: str, port: int, *, timeout_s: float = 5.0) -> str | None:
    """None when a TCP connection to the tracker opens, else why not. (``connect_tracker``
    itself retries a refused connection for 60 s.)"""
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return None
    except OSError as error:
        return str(error) or type(error).__name__


def tracker_keys(host: str, port: int) -> dict[str, dict]:
    """Device keys registered at the tracker and their queue state (``free``, ``pending``)."""
    from tvm import rpc

    summary = rpc.connect_tracker(host, int(port)).summary()
    return {str(k): dict(v) for k, v in summary.get("queue_info", {}).items()}


def rpc_session_ok(host: str, port: int, key: str, *, timeout_s: float) -> str | None:
    """Open (and drop) one session on ``key``: None when it works, else the reason."""
    import concurrent.futures

    from tvm import rpc

    def _open():
        sess = rpc.connect_tracker(host, int(port)).request(key, priority=1, session_timeout=timeout_s,
                                                           max_retry=1)
        sess.cpu(0)

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(_open).result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        return f"no session within {timeout_s:g} s"
    except Exception as error:  # pylint: disable=broad-except  # TVM raises plain RuntimeErrors
        return " ".join(str(error).split())[:200]
    finally:
        pool.shutdown(wait=False)  # a request stuck in the tracker queue must not block us
