"""The fused epilogue as a TE expression (ARCHITECTURE.md, "Epilogue").

requantize: ``y = clip(rint(f32(acc) * f32(M[k] * 2^-shift[k])) + z_out, lo, hi)`` in float32
without a residual, ``y = clip(rhe(acc*M[k] + (res - z_r)*R[k], shift[k]) + z_out, lo, hi)`` in
int64 with one (``quant.reference.requantize``; zero points z are 0 except for imported
models; a ReLU raises ``lo`` to ``z_out``);
dequantize: ``y = float32(acc) * scale[k] (+ float_bias[k])``; ``acc`` already holds the bias.

Example::

    y = te.compute(shape, lambda n, h, w, k: epilogue_value(spec, acc[n, h, w, k], k, ph, None))
"""

from __future__ import annotations

from tvm import te

from .. import tvm_adapter as ta
from .spec import OUT_DTYPES, RANGES


def round_half_even_shift(v, s):
    """``v / 2**s`` rounded half to even, for int64 ``v`` and ``s >= 0``, without division.

    With ``q = v >> s`` (floor) and ``half = 2**(s-1)``: adding ``half - 1 + (q & 1)`` before
    the shift rounds up exactly when the remainder exceeds half, or equals half with q odd.
    ``s == 0`` adds nothing.
    """
    one = ta.const(1, "int64")
    q = v >> s
    half = (one << s) >> one
    bump = ta.select(s > ta.const(0, "int64"), half - one + (q & one), ta.const(0, "int64"))
    return (v + bump) >> s


def epilogue_value(spec, acc, k, ph: dict, res):
    """Epilogue of one accumulator ``acc`` (int32) of output channel ``k``.

    ``ph`` maps parameter names (see ``spec.kernel_arg_names``) to TE placeholders; ``res`` is
    the residual element or None.
    """
    if "bias" in ph:
        acc = acc + ph["bias"][k]
    if spec.out == "i32":
        return te.max(acc, ta.const(0, "int32")) if spec.relu else acc
    if spec.out == "f32":
        y = acc.astype("float32") * ph["scale"][k]
        if spec.float_bias:
            y = y + ph["float_bias"][k]
        return te.max(y, ta.const(0.0, "float32")) if spec.relu else y
    lo, hi = RANGES[spec.out]
    if spec.relu:
        lo = max(lo, spec.out_zero_point)
    if res is None:
        # requant_scale[k] = f32(M[k] * 2^-shift[k]), made once per layer (kernel_args); as an
        # argument it is one vector load per channel block, where computing it from M and shift
        # in the epilogue repeated the float64 conversions for every pixel (LLVM did not hoist them)
        y = ta.nearbyint(acc.astype("float32") * ph["requant_scale"][k])
        if spec.out_zero_point:
            y = y + ta.const(float(spec.out_zero_point), "float32")
        y = te.min(te.max(y, ta.const(float(lo), "float32")), ta.const(float(hi), "float32"))
        return y.astype(OUT_DTYPES[spec.out])
    if "bias" in ph:
        # TVM's simplifier rewrites int64(acc + bias) into int64(acc) + int64(bias); LLVM then
        # cannot prove the product's operand fits 32 bits and emits the 3-uop vpmullq. A max
        # with the int32 minimum (a no-op LLVM folds away) keeps the sum an int32 value, so
        # both factors are sign-extended int32: one vpmuldq per 8 lanes.
        acc = te.max(acc, ta.const(-(2**31), "int32"))
    v = acc.astype("int64") * ph["multiplier"][k].astype("int64")
    if res is not None:
        r = res.astype("int64")
        if spec.residual_zero_point:
            r = r - ta.const(spec.residual_zero_point, "int64")
        v = v + r * ph["residual_multiplier"][k].astype("int64")
    y = round_half_even_shift(v, ph["shift"][k].astype("int64"))
    if spec.out_zero_point:
        y = y + ta.const(spec.out_zero_point, "int64")
    y = te.min(te.max(y, ta.const(lo, "int64")), ta.const(hi, "int64"))
    return y.astype(OUT_DTYPES[spec.out])
