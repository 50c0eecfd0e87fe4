"""Per-CPU auto-tuning of the kernels with MetaSchedule (locally or over TVM RPC).

Modules: ``space`` (search space: our schedule with sampled tiling knobs), ``database``
(per-CPU JSON databases under one DIR), ``tasks`` (a model's kernels), ``driver`` (the tuning
loop, progress, budget, resume), ``apply`` (tuned kernels for ``compile --tuning-db``).
Every MetaSchedule/RPC call goes through :mod:`tvm_ternary.tvm_tuning_adapter`.

Example::

    from tvm_ternary.tuning import open_database, model_tasks, tune_tasks, TuneOptions
    tdb = open_database("tuning-db", target=target, create=True)
    tasks, _ = model_tasks("model.onnx", config=config, calib_images=x, target=target)
    tune_tasks(tasks, tdb=tdb, target=target, options=TuneOptions(trials_per_task=8))
"""

from .apply import TunedKernels
from .database import TuningDatabase, TuningDatabaseError, cpu_key, open_database
from .driver import RpcDevice, TaskResult, TuneOptions, check_device, tune_tasks
from .space import KernelTask, kernel_task
from .tasks import model_tasks

__all__ = ["KernelTask", "RpcDevice", "TaskResult", "TuneOptions", "TunedKernels", "TuningDatabase",
           "TuningDatabaseError", "check_device", "cpu_key", "kernel_task", "model_tasks",
           "open_database", "tune_tasks"]
