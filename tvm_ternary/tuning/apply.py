"""``compile --tuning-db``: kernels from the best tuning record of each workload.

A kernel's workload is rebuilt exactly as the tuner built it (:meth:`KernelTask.workload`);
when the database has records for it, the fastest one's trace is replayed on it. Every
kernel gets a status saying which schedule it got and why:

- ``tuned (ow_block=.., oc_tiles=.., decode_at=..; 0.21 ms vs default 0.25 ms)``
- ``default (fastest of N measured)``: the tuner found nothing faster than the default;
- ``default (no records)`` / ``default (no search space: depthwise)``.

Example::

    kernels = TunedKernels(open_database("tuning-db", target=target, create=False))
    cm = compile_model(model, config=config, calib_images=images, target=target, kernels=kernels)
    cm.rewrite.schedules        # kernel function -> status
"""

from __future__ import annotations

from .. import tvm_tuning_adapter as tta
from ..schedules import DenseSpec, conv2d_kernel, dense_kernel
from .database import TuningDatabase
from .driver import format_time
from .space import kernel_task, tiling_of_trace


class TunedKernels:
    """Kernel provider for :func:`compiler.compile_model` (``kernels=``)."""

    def __init__(self, tdb: TuningDatabase):
        self.tdb = tdb

    def __call__(self, spec, *, target, isa: str):
        task = kernel_task(spec, isa=isa, target=target, name="kernel")
        if task is None:
            return _default(spec, target, isa), "default (no search space: depthwise)"
        _, mod = task.workload()
        records = tta.workload_records(self.tdb.db, mod)
        valid = [r for r in records if tta.record_seconds(r) < tta.FAILED_SECONDS]
        if not valid:
            return _default(spec, target, isa), "default (no records)"
        best = min(valid, key=tta.record_seconds)
        tiling = tiling_of_trace(best.trace)
        defaults = [tta.record_seconds(r) for r in valid if tiling_of_trace(r.trace) == task.default]
        if tiling == task.default:
            return _default(spec, target, isa), f"default (fastest of {len(valid)} measured)"
        sch = tta.schedule_of_record(best, mod)
        func = tta.func_of_schedule(sch).with_attr("tvm_ternary.isa", isa)
        vs = f" vs default {format_time(min(defaults))}" if defaults else ""
        knobs = f"ow_block={tiling.ow_block}, oc_tiles={tiling.oc_tiles}, decode_at={tiling.decode_at}" \
            if tiling else "foreign trace"
        return func, f"tuned ({knobs}; {format_time(tta.record_seconds(best))}{vs})"


def _default(spec, target, isa):
    if isinstance(spec, DenseSpec):
        return dense_kernel(spec, target=target, isa=isa)
    return conv2d_kernel(spec, target=target, isa=isa)
