"""The tuning loop: tasks one after the other, progress, budget, resume.

Per task: measure the default schedule once (it becomes a record: the search starts from it
and ``compile`` can tell a real improvement from noise), then MetaSchedule's evolutionary
search over the task's space (:mod:`.space`) until the task has ``trials_per_task`` records
(or its whole space). A second run counts the records already in the database and only tops
tasks up, so an interrupted tune continues where it stopped.

Example::

    tdb = open_database("tuning-db", target=target, create=True)
    results = tune_tasks(tasks, tdb=tdb, target=target, options=TuneOptions(trials_per_task=8))
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

from .. import tvm_tuning_adapter as tta
from ..errors import RuntimeFailure, UserError
from ..progress import progress as progress_bar
from ..schedules import Tiling
from .database import TuningDatabase
from .space import (
    KernelTask,
    configs_left,
    design_space_fn,
    schedule_with,
    tiling_of_trace,
)


@dataclass(frozen=True)
class RpcDevice:
    """A device behind a TVM RPC tracker.

    Example::

        RpcDevice.parse("127.0.0.1:9190", key="zen4")   # RpcDevice(host='127.0.0.1', port=9190, key='zen4')
    """

    host: str
    port: int
    key: str
    timeout_s: int = 60  # session and request timeout

    @staticmethod
    def parse(address: str, *, key: str, timeout_s: int = 60) -> RpcDevice:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise UserError(f"--rpc-tracker wants HOST:PORT, got {address!r}")
        return RpcDevice(host=host, port=int(port), key=key, timeout_s=timeout_s)


@dataclass(frozen=True)
class TuneOptions:
    """How much to tune. ``max_trials`` caps this run's trials over all tasks; ``time_budget_s``
    stops starting batches after that many seconds (the running batch finishes)."""

    trials_per_task: int = 32
    max_trials: int | None = None
    time_budget_s: float | None = None
    trials_per_iter: int = 8
    rpc: RpcDevice | None = None
    build_workers: int = max(1, min(2, os.cpu_count() or 1))


@dataclass(frozen=True)
class TaskResult:
    name: str
    kernel: str  # human description
    status: str  # "tuned", "already tuned", "stopped: time budget", "not started: ..."
    trials: int  # records of this task in the database (default included)
    space: int
    default_ms: float | None
    best_ms: float | None
    best: Tiling | None

    @property
    def speedup(self) -> float | None:
        return self.default_ms / self.best_ms if self.default_ms and self.best_ms else None


class _Stop(Exception):
    """Raised from the batch callback to end a task (time budget, Ctrl-C)."""


class _Interrupts:
    """Ctrl-C while tuning: stop after the running batch, its records saved.

    A KeyboardInterrupt raised inside MetaSchedule (it calls our Python code from its C++
    worker threads) ends in std::terminate, so the first SIGINT only sets a flag that the
    batch callback acts on; a second one stops at once: the workers are ended and the process
    exits with 130 (:func:`.processes.stop_now`), the records measured so far kept.
    """

    def __init__(self, log):
        from .processes import child_pids

        self.log, self.requested, self._previous = log, False, None
        self.keep = child_pids()  # processes that are not ours to end

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame):
        if self.requested:
            from .processes import stop_now

            stop_now("tvm-ternary: error: interrupted twice: stopped now (every record measured "
                     "before is kept in the database)", keep=self.keep)
        self.requested = True
        self.log("interrupt: stopping after the running batch (its records are kept); "
                 "Ctrl-C again to stop now", flush=True)


def check_device(*, target, rpc: RpcDevice | None, host_features) -> None:
    """Fail early (one line) when candidates could not run where they would be measured."""
    from .. import tvm_adapter as ta

    if rpc is None:
        missing = sorted(set(ta.target_features(target)) - set(host_features))
        if missing:
            raise UserError(
                f"--target {ta.target_mcpu(target)} needs CPU features this host lacks "
                f"({', '.join(missing)}): candidates cannot be measured here; measure on such a CPU "
                "with --rpc-tracker HOST:PORT --rpc-key KEY")
        return
    why = tta.tracker_reachable(rpc.host, rpc.port)
    if why:
        raise UserError(f"RPC tracker {rpc.host}:{rpc.port} unreachable ({why})")
    keys = tta.tracker_keys(rpc.host, rpc.port)
    if rpc.key not in keys:
        raise UserError(f"RPC tracker {rpc.host}:{rpc.port} has no device with key {rpc.key!r} "
                        f"(registered: {', '.join(sorted(keys)) or 'none'})")
    why = tta.rpc_session_ok(rpc.host, rpc.port, rpc.key, timeout_s=rpc.timeout_s)
    if why:
        raise UserError(f"RPC device {rpc.key!r} at {rpc.host}:{rpc.port}: cannot open a session ({why})")


def format_time(seconds: float | None) -> str:
    """``12.3 us`` / ``0.456 ms`` (``-`` for None)."""
    if seconds is None:
        return "-"
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-4 else f"{seconds * 1e3:.3f} ms"


def _state(tdb, task: KernelTask, mod):
    """``(records, default seconds, (best seconds, best tiling), measured tilings)``."""
    records = tta.workload_records(tdb.db, mod)
    valid = [(tta.record_seconds(r), tiling_of_trace(r.trace)) for r in records
             if tta.record_seconds(r) < tta.FAILED_SECONDS]
    defaults = [s for s, t in valid if t == task.default]
    best = min(valid, key=lambda v: v[0]) if valid else (None, None)
    measured = frozenset(tiling_of_trace(r.trace) for r in records)  # failed ones too
    return len(records), (min(defaults) if defaults else None), best, measured


def tune_tasks(tasks: list[KernelTask], *, tdb: TuningDatabase, target, options: TuneOptions,
               log=print, progress: bool = True) -> list[TaskResult]:
    """Tune ``tasks`` into ``tdb``; returns one :class:`TaskResult` per task.  Ctrl-C stops
    after the running batch and raises KeyboardInterrupt (every measured record is kept).
    ``progress``: a bar over the tasks on stderr (the running task's trials as its postfix)."""
    with progress_bar(len(tasks), desc="tuning", unit="kernels", enabled=progress) as bar:
        log = bar.wrap(log)
        with _Interrupts(log) as interrupts:  # first: making the runner starts its workers
            run = _Run(tdb=tdb, target=target, options=options, log=log, total=len(tasks))
            run.bar = bar
            run.interrupts = interrupts
            try:
                results = []
                for i, task in enumerate(tasks):
                    results.append(run.task(i, task))
                    bar.update(1)
                return results
            finally:  # from this thread: a pool left to the garbage collector ends with noise
                tta.close_runner(run.runner)


class _Run:
    def __init__(self, *, tdb, target, options: TuneOptions, log, total: int):
        self.tdb, self.target, self.options, self.log, self.total = tdb, target, options, log, total
        self.start = time.monotonic()
        self.deadline = None if options.time_budget_s is None else self.start + options.time_budget_s
        self.builder = tta.local_builder(workers=options.build_workers)
        rpc = options.rpc
        self.runner = tta.local_runner() if rpc is None else tta.rpc_runner(
            host=rpc.host, port=rpc.port, key=rpc.key, session_timeout_s=rpc.timeout_s)
        self.trials_left = options.max_trials if options.max_trials is not None else float("inf")
        self.interrupts = None
        self.bar = None

    def left(self) -> str:
        if self.deadline is None:
            return f"{(time.monotonic() - self.start) / 60:.1f} min elapsed"
        return f"{max(0.0, self.deadline - time.monotonic()) / 60:.1f} min left"

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def check_interrupt(self) -> None:
        if self.interrupts is not None and self.interrupts.requested:
            raise KeyboardInterrupt

    def task(self, i: int, task: KernelTask) -> TaskResult:
        self.check_interrupt()
        head = f"[{i + 1}/{self.total}] {task.name} ({task.describe()})"
        parts, mod = task.workload()
        n, default_s, _, measured = _state(self.tdb, task, mod)
        if default_s is None and not self.out_of_time() and self.trials_left >= 1:
            self._measure_default(task, parts, mod)
            self.trials_left -= 1  # a measurement like any other
            n, default_s, _, measured = _state(self.tdb, task, mod)
        goal = min(self.options.trials_per_task, task.space_size)
        todo = int(min(goal - n, self.trials_left, configs_left(task, measured)))
        if goal - n <= 0 or configs_left(task, measured) == 0:
            status = "already tuned"
        elif self.out_of_time():
            status = "not started: time budget"
        elif todo <= 0:
            status = "not started: --trials reached"
        else:
            self.log(f"{head}: space {task.space_size} configurations, {n} measured, tuning {todo} "
                     f"more; default {format_time(default_s)}; {self.left()}", flush=True)
            status = self._tune(i, task, parts, mod, n=n, todo=todo, default_s=default_s, measured=measured)
        n, default_s, (best_s, best_t), _ = _state(self.tdb, task, mod)
        r = TaskResult(name=task.name, kernel=task.describe(), status=status, trials=n, space=task.space_size,
                       default_ms=None if default_s is None else default_s * 1e3,
                       best_ms=None if best_s is None else best_s * 1e3, best=best_t)
        self.log(f"{head}: {status}; {r.trials} trials; best {format_time(best_s)} ({best_t}) vs default "
                 f"{format_time(default_s)}" + (f" = {r.speedup:.2f}x" if r.speedup else "") + f"; {self.left()}",
                 flush=True)
        self.check_interrupt()
        return r

    def _measure_default(self, task: KernelTask, parts, mod) -> None:
        sch = schedule_with(task, parts, mod, task.default)
        secs, error = tta.measure(sch.mod, target=self.target, builder=self.builder, runner=self.runner)
        if error:
            raise RuntimeFailure(f"{task.name}: the default schedule did not build/run "
                                 f"({error.strip().splitlines()[-1][:200]})")
        tta.commit_record(self.tdb.db, mod=mod, sch=sch, seconds=secs, target=self.target)

    def _tune(self, i, task, parts, mod, *, n, todo, default_s, measured) -> str:
        done, best, stop = [0], [None], [None]
        goal = n + todo

        def on_batch(secs, errors):
            done[0] += len(secs)
            ok = [s for s in secs if s is not None]
            if ok and (best[0] is None or min(ok) < best[0]):
                best[0] = min(ok)
            known = [x for x in (best[0], default_s) if x is not None]
            cur = min(known) if known else None
            gain = f" ({default_s / cur:.2f}x)" if cur and default_s else ""
            if self.bar is not None:
                self.bar.set_postfix(f"{task.name} {n + done[0]}/{goal} trials, best {format_time(cur)}")
            bad = f", {len(errors)} failed ({errors[0].strip().splitlines()[-1][:120]})" if errors else ""
            self.log(f"  {task.name}: {n + done[0]}/{goal} trials, best {format_time(cur)} vs default "
                     f"{format_time(default_s)}{gain}{bad}; tasks done {i}/{self.total}; {self.left()}", flush=True)
            if self.interrupts is not None and self.interrupts.requested:
                stop[0] = "interrupted"
            elif self.out_of_time():
                stop[0] = "stopped: time budget"
            if stop[0]:
                raise _Stop(stop[0])

        space = tta.schedule_fn_space(design_space_fn(task, parts, measured=measured))
        ctx = tta.tune_context(mod, target=self.target, space=space, name=task.name,
                               num_threads=self.options.build_workers)
        try:
            tta.tune(ctx, database=self.tdb.db, builder=self.builder, runner=self.runner, max_trials=todo,
                     trials_per_iter=min(self.options.trials_per_iter, todo), on_batch=on_batch)
        except Exception:  # pylint: disable=broad-except
            if stop[0] is None:  # the FFI hands our _Stop back as a bare RuntimeError
                raise
        finally:
            self.trials_left -= done[0]
        return stop[0] or "tuned"
