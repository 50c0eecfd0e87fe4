"""Every ``tvm.*`` call that churns between TVM releases, as small flat functions.

Written against apache-tvm 0.27 (``tvm.tirx`` / ``tvm.s_tir``, dict targets, ``tvm.runtime.tensor``).
When TVM moves, edit this module only (and its sibling :mod:`tvm_ternary.tvm_tuning_adapter`,
which holds the MetaSchedule / RPC calls of the tuner).  Keep it flat: one small function per concern.

Example::

    from tvm_ternary import tvm_adapter as ta
    target = ta.make_target("znver4")          # or ta.host_target()
    isa = ta.choose_isa(target)                 # "vnni512"
    mod = ta.build(prim_func, target=target)
    y = ta.empty((1, 56, 56, 64), "uint8")
    mod(ta.tensor(x_np), ..., y)
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te
from tvm.target import Target, codegen

# ISA choices, most capable first.  See schedules/intrin.py for what each one uses.
ISAS = ("vnni512", "avx512", "avxvnni", "avx2", "plain")


# ---------------------------------------------------------------- targets and features


# LLVM tunes Intel AVX-512 CPUs (skylake-avx512 and later, rocketlake, sapphirerapids) to prefer
# 256-bit vectors: a 16-lane loop it vectorises itself is split into ymm pairs. The kernels are
# written for zmm; the residual epilogue of ResNet-50's 1x1 64->256 @56 ran 0.376 ms with the
# preference, 0.262 ms without (Xeon, 1 thread), the other kernels the same. Turned off on every
# AVX-512 target (a tuning flag, not a CPU feature: the library needs no more of the CPU).
NO_256_PREFERENCE = "-prefer-256-bit"


def make_target(mcpu: str | None = None, *, num_cores: int | None = None,
                mattr: tuple[str, ...] = ()) -> Target:
    """An LLVM CPU target from a dict (0.27 rejects ``"llvm -mcpu=..."`` strings).

    ``mcpu=None`` means the host CPU (``"native"`` is not accepted by 0.27: it silently
    compiles for ``generic``); ``mattr`` adds LLVM features (``"+amx-int8"``). AVX-512 targets
    get :data:`NO_256_PREFERENCE`.
    """
    mcpu = host_cpu() if mcpu is None else check_mcpu(mcpu)
    cfg = {"kind": "llvm", "mcpu": mcpu}
    if num_cores is not None:
        cfg["num-cores"] = int(num_cores)
    if mattr:
        cfg["mattr"] = list(mattr)
    t = Target(cfg)
    if _is_x86(t) and target_has_features(t, "avx512f"):
        t = Target({**cfg, "mattr": [*mattr, NO_256_PREFERENCE]})
    return t


def _is_x86(t: Target) -> bool:
    try:
        return bool(codegen.target_has_features("sse2", t))
    except Exception:  # pylint: disable=broad-except  (other triples do not know the name)
        return False


# Named in the error for an unknown CPU: the x86 CPUs the kernels have an ISA path for.
EXAMPLE_MCPUS = ("znver3", "znver4", "znver5", "haswell", "skylake-avx512", "cascadelake",
                 "icelake-server", "sapphirerapids", "alderlake", "x86-64-v3", "x86-64-v4")


def known_cpus() -> list[str]:
    """LLVM's CPU names for the host's triple (``llvm_get_cpu_archlist``)."""
    return [str(c) for c in codegen.llvm_get_cpu_archlist(Target({"kind": "llvm"}))]


def check_mcpu(text: str) -> str:
    """The LLVM mcpu named by ``text`` (``znver4`` or ``llvm -mcpu=znver4``), or a
    :class:`~tvm_ternary.errors.TargetError` naming the accepted forms and the close matches.

    LLVM itself only logs "not a recognized processor" and compiles for ``generic`` (no
    vector kernels), so an unknown name is checked here against LLVM's own CPU list.
    """
    import difflib

    from .errors import TargetError

    name = str(text).strip()
    words = name.split()
    if words and words[0] == "llvm":  # the pre-0.20 string form; only -mcpu= is understood
        mcpus = [w.split("=", 1)[1] for w in words[1:] if w.startswith("-mcpu=")]
        if len(mcpus) != 1 or len(words) != 2:
            raise TargetError(f"--target {name!r}: only 'llvm -mcpu=NAME' or a bare CPU name is "
                              f"understood (e.g. --target {EXAMPLE_MCPUS[1]})")
        name = mcpus[0]
    known = known_cpus()
    if name in known:
        return name
    close = [k for k in known if k.startswith(name) and "_" not in k][:3]  # icelake: icelake-server
    close += [k for k in difflib.get_close_matches(name, known, n=4, cutoff=0.6) if k not in close]
    close = close[:4]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise TargetError(f"--target {name!r}: not a CPU LLVM knows; {hint}accepted: host, an LLVM "
                      f"mcpu such as {', '.join(EXAMPLE_MCPUS)} (or 'llvm -mcpu=NAME')")


def host_cpu() -> str:
    """LLVM's name for the host CPU, e.g. ``"znver5"``."""
    return str(codegen.llvm_get_system_cpu())


# Host features LLVM's CPU name may lack: under KVM a Sapphire Rapids Xeon reports a model
# LLVM names ``rocketlake`` (no AMX), yet /proc/cpuinfo lists amx_tile and amx_int8.
HOST_EXTRA_FEATURES = ("amx-tile", "amx-int8")


def host_target(*, num_cores: int | None = None) -> Target:
    """The host CPU as a target (mcpu set, so features are known), plus the AMX features the
    host reports and its LLVM CPU name lacks (:data:`HOST_EXTRA_FEATURES`)."""
    from .cpu_features import host_features

    t = make_target(host_cpu(), num_cores=num_cores)
    if not set(HOST_EXTRA_FEATURES) <= host_features() or target_has_features(t, *HOST_EXTRA_FEATURES):
        return t
    return make_target(host_cpu(), num_cores=num_cores,
                       mattr=tuple(f"+{f}" for f in HOST_EXTRA_FEATURES))


def request_tiles_for(target) -> None:
    """Modules built for ``target`` run in this process: ask for the AMX tile state if it has
    AMX (``cpu_features.request_amx``; without it the first tile instruction is a SIGILL)."""
    if target_has_features(target, "amx-tile"):
        from .cpu_features import request_amx

        request_amx()


def as_target(target) -> Target:
    """Accept a ``Target``, a dict, an mcpu string or ``None`` (host)."""
    if isinstance(target, Target):
        return target
    if target is None:
        return host_target()
    if isinstance(target, dict):
        return Target(target)
    if isinstance(target, str):
        return make_target(target)
    raise TypeError(f"cannot make a target from {target!r}")


def target_mcpu(target) -> str:
    t = as_target(target)
    return str(t.attrs.get("mcpu", "generic"))


def target_has_features(target, *features: str) -> bool:
    """True when the LLVM target enables every named feature (e.g. ``"avx512vnni"``)."""
    t = as_target(target)
    return all(bool(codegen.target_has_features(f, t)) for f in features)


def choose_isa(target) -> str:
    """Pick the kernel ISA from the target's features (see :data:`ISAS`).

    Only CPU vector features are considered; a non-x86 or ``generic`` target gets ``plain``.
    """
    t = as_target(target)
    if str(t.kind.name) != "llvm":
        return "plain"
    try:
        if target_has_features(t, "avx512bw", "avx512vnni"):
            return "vnni512"
        if target_has_features(t, "avx512bw"):
            return "avx512"
        if target_has_features(t, "avx2", "avxvnni"):
            return "avxvnni"
        if target_has_features(t, "avx2"):
            return "avx2"
    except Exception:  # pylint: disable=broad-except
        # non-x86 triples do not know these feature names
        return "plain"
    return "plain"


# ---------------------------------------------------------------- TE / PrimFunc


def create_prim_func(tensors) -> "tvm.tirx.PrimFunc":
    """TE -> schedulable PrimFunc, int64 indices (FuseTIR needs it) and no global symbol
    (``create_prim_func`` names everything ``main``; duplicates break Relax modules)."""
    func = te.create_prim_func(list(tensors), index_dtype_override="int64")
    return func.without_attr("global_symbol")


def schedule_of(func):
    """A TensorIR schedule over ``func`` (wrapped in an IRModule as ``main``)."""
    return tvm.s_tir.Schedule(tvm.IRModule({"main": func}))


def scheduled_func(sch) -> "tvm.tirx.PrimFunc":
    return sch.mod["main"].without_attr("global_symbol")


def if_then_else(cond, then_value, else_value):
    return tvm.tirx.if_then_else(cond, then_value, else_value)


def select(cond, then_value, else_value):
    return tvm.tirx.Select(cond, then_value, else_value)


def const(value, dtype: str):
    return tvm.tirx.const(value, dtype)


# ---------------------------------------------------------------- build and run


def build(func, *, target, name: str = "main"):
    """Compile one PrimFunc for ``target``; returns a callable runtime module (run in this
    process: an AMX target gets the tile state requested, ``cpu_features.request_amx``)."""
    t = as_target(target)
    request_tiles_for(t)
    func = func.with_attr("global_symbol", name)
    return tvm.compile(tvm.IRModule({name: func}), target=t)


def device():
    return tvm.cpu(0)


def tensor(array: np.ndarray):
    """A runtime tensor on the CPU (0.27: ``tvm.runtime.tensor`` replaced ``tvm.nd.array``)."""
    return tvm.runtime.tensor(np.ascontiguousarray(array), device())


def empty(shape, dtype: str):
    return tvm.runtime.empty(tuple(int(s) for s in shape), dtype, device())


def set_num_threads(n: int) -> None:
    """Size TVM's CPU thread pool (affinity mode 0 = default)."""
    tvm.get_global_func("runtime.config_threadpool")(0, int(n))


def time_ms(mod, args, *, name: str = "main", number: int = 10, repeat: int = 5,
            min_repeat_ms: int = 0) -> list[float]:
    """Per-call times in ms, one per repeat (each the mean of ``number`` calls)."""
    if hasattr(mod, "jit"):  # tvm.compile returns an Executable; time the jitted module
        mod = mod.jit()
    ev = mod.time_evaluator(name, device(), number=number, repeat=repeat,
                            min_repeat_ms=min_repeat_ms)
    return [float(r) * 1e3 for r in ev(*args).results]


def llvm_ir(func, *, target) -> str:
    """LLVM IR of a built PrimFunc (for inspecting what an intrinsic lowered to)."""
    mod = build(func, target=target)
    lib = mod.mod if hasattr(mod, "mod") else mod
    return lib.inspect_source("ll")


def assembly(func, *, target) -> str:
    """Assembly of a built PrimFunc (to count e.g. vpdpbusd in the inner loop)."""
    mod = build(func, target=target)
    lib = mod.mod if hasattr(mod, "mod") else mod
    return lib.inspect_source("asm")


def tvm_version() -> str:
    return str(tvm.__version__)


# ---------------------------------------------------------------- Relax: import, constants, float VM
# (section owned by the import pass: tvm_ternary/passes/import_onnx.py)


def relax_from_onnx(model, *, shape_dict: dict, dtype_dict: dict) -> tuple:
    """ONNX ModelProto -> ``(IRModule, {parameter name: numpy value})``: every initializer is a
    parameter of ``main`` after the data inputs, named as in the graph (the frontend drops an
    ``onnx::`` prefix), its value detached from the module (``relax.frontend.detach_params``)."""
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.onnx import from_onnx

    mod, params = detach_params(from_onnx(model, shape_dict=shape_dict, dtype_dict=dtype_dict,
                                          keep_params_in_input=True))
    func = mod["main"]
    n_inputs = int(func.attrs["num_input"])
    values = [value.numpy() for value in params.get("main", [])]
    if len(func.params) != n_inputs + len(values):  # an initializer listed as a graph input too
        raise ValueError("the frontend's parameters do not line up with their values")
    return mod, {var_name(var): value for var, value in zip(func.params[n_inputs:], values)}


def bind_params(mod, values: dict, func_name: str = "main"):
    """Bind parameters of ``func_name`` (by name) as constants; they leave its signature."""
    from tvm import relax

    if not values:
        return mod
    return relax.transform.BindParams(func_name, dict(values))(mod)


def param_names(mod, func_name: str = "main") -> list[str]:
    return [var_name(var) for var in mod[func_name].params]


def const_numpy(expr) -> np.ndarray | None:
    """The value of a Relax constant as numpy, or None when ``expr`` is not a constant.

    0.27 renamed ``relax.Constant`` to ``tvm.ir.GenericConst`` (``.value`` is a runtime Tensor).
    """
    if isinstance(expr, tvm.ir.GenericConst):
        return expr.value.numpy()
    return None


def relax_const(array: np.ndarray):
    from tvm import relax

    return relax.const(np.ascontiguousarray(array))


def static_shape(expr) -> tuple[int, ...] | None:
    """Static shape of a Relax tensor expression, None when unknown or symbolic."""
    ty = getattr(expr, "ty", None)
    shape = getattr(ty, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        return None


def tensor_dtype(expr) -> str | None:
    ty = getattr(expr, "ty", None)
    dtype = getattr(ty, "dtype", None)
    return None if dtype is None else str(getattr(dtype, "dtype", dtype))


def call_op_name(expr) -> str | None:
    """``"relax.nn.conv2d"`` for a call of a Relax operator, else None."""
    from tvm import relax

    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return str(expr.op.name)
    return None


def var_name(var) -> str:
    """A Relax var's name (0.27: ``.name``; older releases: ``.name_hint``)."""
    return str(var.name)


def main_bindings(mod, func_name: str = "main") -> list:
    """``(var, value)`` of every binding of ``func_name``, in program order."""
    func = mod[func_name]
    pairs = []
    for block in func.body.blocks:
        for binding in block.bindings:
            pairs.append((binding.var, binding.value))
    return pairs


def build_relax_vm(mod, *, target=None):
    """Compile a Relax module (see :func:`build_relax`) straight into a VM (float graphs are
    untuned: fine for tests on small CNNs, not for speed)."""
    return relax_vm(build_relax(mod, target=target))


def run_relax_vm(vm, *inputs: np.ndarray, func_name: str = "main") -> list[np.ndarray]:
    """Run ``func_name`` on numpy inputs; a tuple result comes back flattened to a list."""
    result = vm[func_name](*(tensor(x) for x in inputs))
    items = list(result) if isinstance(result, (list, tuple)) or hasattr(result, "__len__") \
        and not hasattr(result, "numpy") else [result]
    return [item.numpy() for item in items]


# ---------------------------------------------------------------- region ops, graph rewriting, export
# (section owned by the compile flow: schedules/region_ops.py, passes/quantize_graph.py, compiler.py)


def fma64(a, b, c):
    """float64 ``a * b + c`` with one rounding (``llvm.fma``; vectorises to ``vfmadd``)."""
    return tvm.tirx.call_llvm_pure_intrin("float64", "llvm.fma", a, b, c)


def exact_quotient(value, divisor: float):
    """``value / divisor`` correctly rounded, for a float64 ``value`` and a constant non-zero
    ``divisor``, without a division (``vdivpd`` is ~16 cycles per zmm): ``q0 = value * y`` with
    ``y`` = the correctly rounded ``1 / divisor``, then one correction with the exact residual
    ``r = value - q0 * divisor`` (an FMA): ``q = q0 + r * y``. Markstein's theorem: with ``y``
    within half an ulp of ``1/divisor`` and ``q0`` within one ulp of the quotient, ``q`` is the
    correctly rounded quotient (no overflow / underflow: activations and scales are far from
    the float64 limits)."""
    b = const(float(divisor), "float64")
    y = const(1.0 / float(divisor), "float64")
    q0 = value * y
    r = fma64(-q0, b, value)
    return fma64(r, y, q0)


def nearbyint(value):
    """Round half to even (``llvm.nearbyint``); ``tirx.round`` rounds half away from zero."""
    return tvm.tirx.nearbyint(value)


def rint_int32(value):
    """A float32 value rounded half to even to int32 in one conversion (``llvm.lrint``: x86
    ``cvtps2dq`` under the default MXCSR rounding, where ``nearbyint`` + a cast is a round
    and a truncating conversion). The caller keeps ``value`` within int32: out of range the
    conversion gives INT_MIN."""
    return tvm.tirx.call_llvm_pure_intrin("int32", "llvm.lrint", value)


def build_relax(mod, *, target):
    """Lower and compile a Relax module for ``target`` (zero pipeline: legalize the float ops
    left between quantized layers, fuse them; our scheduled kernels are kept as they are)."""
    from tvm import relax

    t = as_target(target)
    request_tiles_for(t)
    with t:
        mod = relax.get_pipeline("zero")(mod)
    return tvm.compile(mod, target=t)


def relax_vm(executable):
    from tvm import relax

    return relax.VirtualMachine(executable, device())


def export_library(executable, path: str, *, addons: list[str] | None = None) -> None:
    """Write the compiled module (weights embedded) as a shared library; ``addons``: more
    source/object files linked in (the C++ compiler builds a ``.cc``)."""
    executable.export_library(str(path), addons=list(addons) if addons else None)


def target_features(target) -> list[str]:
    """The LLVM features (of :data:`cpu_features.LLVM_TO_CPUINFO`) that ``target`` enables."""
    from .cpu_features import LLVM_TO_CPUINFO

    t = as_target(target)
    if str(t.kind.name) != "llvm":
        return []
    out = []
    for name in LLVM_TO_CPUINFO:
        try:
            if target_has_features(t, name):
                out.append(name)
        except Exception:  # pylint: disable=broad-except  # feature unknown to this triple
            continue
    return out
