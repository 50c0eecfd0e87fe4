"""The search space of one kernel: our hand schedule with its tiling knobs sampled.

Why not MetaSchedule's generic space: its rules (AutoInline first) inline the weight decode
into the reduction and nothing can be tensorized afterwards.  So the space generator is a
``ScheduleFn`` that runs :func:`schedules.conv2d.schedule_tiled` — tensorization is kept by
construction — and the evolutionary search, cost model, builders, runners and JSON database
of MetaSchedule do the rest.

Knobs (``schedules/tiling.py``):

- ``decode_at`` ("tile" / "root") changes the loop structure: one design space per value.
- ``oc_tiles`` (divisors of the output-block count, at most 8): one design space per value,
  because the register budget couples it with ``ow_block``.
- ``ow_block``: ``sch.sample_categorical`` over the divisors of the workload's padded
  accumulator width with ``ow_block * oc_tiles <= registers - 4`` (no spills) and at least 4
  accumulators (or the whole width): the split takes the sampled variable, so MetaSchedule
  replays one trace per design space with new decisions.

``oc_tiles`` is a one-candidate ``sample_categorical`` used as the split factor, so that the
trace keeps it (MetaSchedule drops unused samples from stored traces): every record carries
``(oc_tiles, ow_block)`` as its two samples, and ``decode_at`` is "tile" exactly when the
trace computes the ``decode`` block at a loop; :func:`tiling_of_trace` reads them back (to tell a tuned record
from the default one).

Depthwise kernels have a fixed vectorised schedule without knobs: no task.

Example::

    task = kernel_task(spec, isa="vnni512", target=target, name="tt_conv0")
    parts, mod = task.workload()
    fn = design_space_fn(task, parts)       # for tvm_tuning_adapter.schedule_fn_space
    task.space_size                          # e.g. 30 configurations
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import tvm_tuning_adapter as tta
from ..schedules import ConvSpec, DenseSpec, Tiling
from ..schedules.conv2d import default_kernel_tiling, schedule_tiled, tiled_workload
from ..schedules.intrin import BLOCKS
from ..schedules.tiling import _REGS

_DECODE = ("tile", "root")
_MAX_OC_TILES = 8


@dataclass(frozen=True)
class KernelTask:
    """One tunable kernel: ``spec`` (conv form) on ``isa``, workload padded to ``acc_width``."""

    name: str
    spec: ConvSpec
    isa: str
    default: Tiling
    layers: tuple[str, ...] = ()  # model layers that use this kernel (informational)

    @property
    def acc_width(self) -> int:
        owb = self.default.ow_block
        return -(-self.spec.out_width // owb) * owb

    def workload(self):
        """``(parts, IRModule)``: the unscheduled kernel, keyed exactly as compile looks it up."""
        parts, func = tiled_workload(self.spec, isa=self.isa, acc_width=self.acc_width)
        return parts, tta.workload_module(func)

    def choices(self) -> list[tuple[int, str, list[int]]]:
        """``(oc_tiles, decode_at, ow_block candidates)`` per design space."""
        kb = -(-self.spec.out_channels // BLOCKS[self.isa].lanes)
        budget = _REGS[self.isa] - 4
        width = self.acc_width
        out = []
        for oct_ in (d for d in range(1, min(kb, _MAX_OC_TILES) + 1) if kb % d == 0):
            ows = [d for d in range(1, width + 1) if width % d == 0 and d * oct_ <= budget
                   and (d * oct_ >= 4 or d == width)]
            if oct_ == self.default.oc_tiles and self.default.ow_block not in ows:
                ows = sorted(ows + [self.default.ow_block])  # the default is always in the space
            if ows:
                out += [(oct_, dec, ows) for dec in _DECODE]
        return out

    @property
    def space_size(self) -> int:
        return sum(len(ows) for _, _, ows in self.choices())

    def describe(self) -> str:
        s = self.spec
        if s.dense:
            return f"dense {s.in_channels}->{s.out_channels} x{s.width} {s.act}->{s.out} w{s.weight_bits}"
        r, k = s.kernel, s.stride
        extra = ("+res" if s.residual else "") + ("+relu" if s.relu else "")
        return (f"{r[0]}x{r[1]}{'/s' + str(k[0]) if k != (1, 1) else ''} {s.in_channels}->"
                f"{s.out_channels} @{s.height}x{s.width} {s.act}->{s.out}{extra} w{s.weight_bits}")


def kernel_task(spec, *, isa: str, target, name: str, layers=()) -> KernelTask | None:
    """The task of a kernel built by the compile flow, or None when it has no knobs."""
    conv = spec.as_conv() if isinstance(spec, DenseSpec) else spec
    if conv.depthwise:
        return None
    return KernelTask(name=name, spec=conv, isa=isa, layers=tuple(layers),
                      default=default_kernel_tiling(conv, isa=isa, target=target))


def _apply(sch, task: KernelTask, parts, *, oc_tiles: int, decode_at: str, ows: list[int],
           ow_decision: int | None):
    # oc_tiles as a one-value sample so that the trace records it (see module docstring)
    oc = sch.sample_categorical([oc_tiles], [1.0], decision=0)
    ow = sch.sample_categorical(ows, [1.0 / len(ows)] * len(ows), decision=ow_decision)
    schedule_tiled(sch, parts, isa=task.isa, ow_block=ow, oc_tiles=oc, decode_at=decode_at)
    return sch


def design_space_fn(task: KernelTask, parts, *, measured=frozenset()):
    """``fn(sch) -> [Schedule]``: one design space per (oc_tiles, decode_at), over the
    configurations not in ``measured`` (tilings the database has already): MetaSchedule only
    avoids repeats within one run, so a resumed run would measure old configurations again."""
    choices = _open_choices(task, measured)

    def fn(sch):
        return [_apply(sch.copy(), task, parts, oc_tiles=oct_, decode_at=dec, ows=ows, ow_decision=None)
                for oct_, dec, ows in choices]

    return fn


def _open_choices(task: KernelTask, measured) -> list:
    out = []
    for oct_, dec, ows in task.choices():
        left = [w for w in ows if Tiling(ow_block=w, oc_tiles=oct_, decode_at=dec) not in measured]
        if left:
            out.append((oct_, dec, left))
    return out


def configs_left(task: KernelTask, measured) -> int:
    """How many configurations of the space are not in ``measured``."""
    return sum(len(ows) for _, _, ows in _open_choices(task, measured))


def schedule_with(task: KernelTask, parts, mod, tiling: Tiling):
    """A traced schedule of ``mod`` at fixed knobs (e.g. the default), as the space writes it."""
    for oct_, dec, ows in task.choices():
        if oct_ == tiling.oc_tiles and dec == tiling.decode_at and tiling.ow_block in ows:
            return _apply(tta.new_schedule(mod), task, parts, oc_tiles=oct_, decode_at=dec, ows=ows,
                          ow_decision=ows.index(tiling.ow_block))
    raise ValueError(f"{tiling} is outside the search space of {task.name}")


def tiling_of_trace(trace) -> Tiling | None:
    """The knobs a trace of this space was made with (None for a trace of another space)."""
    samples = tta.sampling_decisions(trace)
    if len(samples) != 2 or len(samples[0][0]) != 1:
        return None
    (oct_, _), (ows, i) = samples
    # decode_at="tile" is the only variant that computes the decode at a loop (the ternary
    # forms compute their int16 accumulator at one in both)
    decode_at = "tile" if tta.trace_computes_at(trace, "decode") else "root"
    return Tiling(ow_block=ows[i], oc_tiles=oct_[0], decode_at=decode_at)
