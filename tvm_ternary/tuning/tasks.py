"""The tuning tasks of a model: every distinct kernel the compile flow builds for it.

The model goes through the compile flow up to the rewrite (import, plan with calibration,
:func:`passes.quantize_graph.apply_plan`), so the tasks are exactly the kernels ``compile``
will look up, built from the same specs.

Example::

    tasks, untuned = model_tasks("model.onnx", config=QuantConfig(), calib_images=x, target=t)
    [t.name for t in tasks]        # ['tt_conv0', 'tt_conv1', ..., 'tt_dense7']
    untuned                         # {'tt_conv6': 'depthwise: fixed schedule, no knobs'}
"""

from __future__ import annotations

from dataclasses import replace

from .. import tvm_adapter as ta
from .space import KernelTask, kernel_task


def model_tasks(model, *, config, calib_images, target, input_shapes=None, isa: str | None = None,
                progress: bool = False, prepared=None) -> tuple[list[KernelTask], dict[str, str]]:
    """``(tasks, untuned)``: tunable kernels in program order, and why the others are not.
    ``prepared``: ``model`` already normalised (then normalised once per tune)."""
    from ..compiler import plan_model
    from ..passes.import_onnx import import_onnx
    from ..passes.onnx_normalize import prepare
    from ..passes.quantize_graph import apply_plan

    prep = prepare(model, input_shapes=input_shapes, prepared=prepared)
    plan = plan_model(prep, config=config, calib_images=calib_images, progress=progress)  # what compile builds
    imported = import_onnx(None, prepared=replace(prep, model=plan.model))  # the planned graph
    target = ta.as_target(target)
    isa = isa or ta.choose_isa(target)
    _, report = apply_plan(imported, plan=plan, target=target, isa=isa)
    tasks, untuned = [], {}
    for name, spec in report.specs.items():
        layers = [layer for layer, kernel in report.layer_kernels.items() if kernel == name]
        task = kernel_task(spec, isa=isa, target=target, name=name, layers=layers)
        if task is None:
            untuned[name] = "depthwise: fixed schedule, no knobs"
        else:
            tasks.append(task)
    return tasks, untuned
