"""The fused epilogue as a TE expression (ARCHITECTURE.md, "Epilogue").

requantize, in float32 (``quant.reference.requantize``):
``y = clip(rint(f32(acc) * S[k]) (+ rint(f32(res - z_r) * S_r[k])) + z_out, lo, hi)``, with
``S`` = ``requant_scale`` and ``S_r`` = ``residual_scale`` made once per layer (zero points z
are 0 except for imported models; a ReLU raises ``lo`` to ``z_out``);
dequantize: ``y = float32(acc) * scale[k] (+ float_bias[k])``; ``acc`` already holds the bias.

Example::

    y = te.compute(shape, lambda n, h, w, k: epilogue_value(spec, acc[n, h, w, k], k, ph, None))
"""

from __future__ import annotations

from tvm import te

from .. import tvm_adapter as ta
from .spec import OUT_DTYPES, RANGES


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
    # requant_scale[k] = f32(M[k] * 2^-shift[k]), made once per layer (kernel_args); as an
    # argument it is one vector load per channel block, where computing it from M and shift
    # in the epilogue repeated the float64 conversions for every pixel (LLVM did not hoist them)
    y = acc.astype("float32") * ph["requant_scale"][k]
    if res is None:
        # clip(rint(y) + z, lo, hi) = rint(clip(y, lo - z, hi - z)) + z (integer bounds):
        # clipped first, the one rounding conversion stays in int32 range (vcvtps2dq in place
        # of vrndscaleps + vcvttps2dq); z is added after the rounding, as in the reference
        z = spec.out_zero_point
        y = te.min(te.max(y, ta.const(float(lo - z), "float32")), ta.const(float(hi - z), "float32"))
        q = ta.rint_int32(y)
        if z:
            q = q + ta.const(z, "int32")
        return q.astype(OUT_DTYPES[spec.out])
    # the residual's term rounded on its own: rint between the product and the sum, so LLVM
    # cannot contract them into an FMA (which would round once, unlike the reference)
    r = res.astype("float32")
    if spec.residual_zero_point:
        r = r - ta.const(float(spec.residual_zero_point), "float32")
    y = ta.nearbyint(y) + ta.nearbyint(r * ph["residual_scale"][k])
    if spec.out_zero_point:
        y = y + ta.const(float(spec.out_zero_point), "float32")
    y = te.min(te.max(y, ta.const(float(lo), "float32")), ta.const(float(hi), "float32"))
    return y.astype(OUT_DTYPES[spec.out])
