"""Make a quantization plan for a float ONNX CNN, and simulate the quantized network in numpy.

``make_plan`` decides each layer's precision (:mod:`.config`), calibrates activation scales on
the float network, then walks the network once with two environments in lockstep: the float
network (targets) and the quantized network built so far (inputs). Each layer is quantized
when the walk reaches it, so a data-aware fit sees the error of every layer before it.

``simulate`` runs a finished plan: the numpy reference of the compiled library (integer layers
bit-exact; float ops between them as numpy computes them).

Example::

    >>> plan = make_plan(prep.model, calib_images, config=QuantConfig(group_size=4))  # doctest: +SKIP
    >>> logits = simulate(plan, images)  # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from ..numpy_graph import NumpyGraph, conv_geometry
from ..progress import progress as progress_bar
from ..quant import (
    FORMAT_NAMES,
    ActivationQuant,
    dequantize_activation,
    per_channel,
    quantize_activation,
    quantize_weights,
    relative_error,
    ternarize,
    to_integer_scales,
)
from ..quant import reference as ref
from ..quant.data_aware import LayerStatistics, fit_layer
from ..quant.intscales import IntegerWeights
from ..quant.reconstruct import fit_depthwise, reconstruct_layer
from .calibrate import TensorStats, collect_stats
from .config import LayerDecision, QuantConfig, check_override_names, decide
from .graph import FusedLayer, GraphAnalysis, analyse, node_key
from .layer import LayerPlan, integer_params

FIT_ROWS = 32_768  # im2col rows sampled per layer for the data-aware statistics
FIT_IMAGES = 256  # calibration images the sequential fit walks (a seeded sample of them)
DEPTHWISE_ROWS = 8_192  # output positions sampled per depthwise layer (each channel has R*S weights)
CHUNK_IMAGES = 16
STORE_HALF_MIN = 1 << 20  # tensors of at least this many values are kept as float16 while planning  # images per conv evaluation in the walk: bounds im2col memory
INPUT_ACT_BITS = 8  # the image entering the first layer is always 8-bit
RELU_AWARE = True  # refit layers followed by a ReLU to targets that ignore what the ReLU hides
FITTED_METHODS = ("reconstruct", "data-aware")  # methods that fit layers to calibration outputs


@dataclass(frozen=True, eq=False)
class QuantPlan:
    config: QuantConfig
    model: onnx.ModelProto  # the normalized float32 model the plan refers to
    analysis: GraphAnalysis
    layers: dict[str, LayerPlan]  # by layer name, quantized layers only
    decisions: dict[str, LayerDecision]  # every conv/dense layer, float ones included
    seconds: float
    # make_plan(alternatives=...): the same layer fitted at other weight bits on the same
    # inputs, {layer: {bits: LayerPlan}}; the sensitivity policy swaps them in.
    alternatives: dict[str, dict[int, LayerPlan]] = field(default_factory=dict)
    # "calibrated": decided by the policy and fitted here; "model": read from a quantized
    # (QDQ) model by plan.imported.plan_from_model
    source: str = "calibrated"
    # how many calibration images set the activation scales, which ones (indices into the
    # images given) the sequential fit used, and the seed that chose them
    calibration: dict = field(default_factory=dict)

    def coverage(self) -> list[dict]:
        rows = []
        for fused in self.analysis.layers:
            d = self.decisions[fused.name]
            kind = FORMAT_NAMES[d.bits]
            lp = self.layers.get(fused.name)
            rows.append({
                "layer": fused.name, "op": fused.weight.op_type, "weights": kind,
                "reason": d.reason, "macs": fused.weight.macs,
                "fused": "+".join(["bias"] + (["residual"] if fused.residual else []) + (["relu"] if fused.relu else [])),
                "already_ternary": bool(lp and lp.weights.bits == 2 and lp.weights.lossless),
                "weight_error": None if lp is None else round(lp.weight_error, 4),
                "output_error": None if lp is None or lp.output_error is None else round(lp.output_error, 4),
            })
        return rows


def _decisions(analysis: GraphAnalysis, config: QuantConfig) -> dict[str, LayerDecision]:
    layers = analysis.layers
    if not layers:
        from ..errors import NoWeightedLayersError

        raise NoWeightedLayersError("the model has no Conv/Gemm/MatMul layer with constant weights: "
                                    "nothing to quantize")
    check_override_names([(f.name, f.weight.op_type) for f in layers], config)
    out = {}
    for i, fused in enumerate(layers):
        w = fused.weight
        out[fused.name] = decide(
            name=fused.name, op_type=w.op_type, depthwise=w.is_depthwise,
            is_first=w.reads_model_input, is_last=i == len(layers) - 1,
            in_channels=w.in_channels_per_group, config=config, pointwise=w.is_pointwise)
    return out


def _tensor_quants(analysis, stats, quantized: list[FusedLayer], config, input_name) -> dict[str, ActivationQuant]:
    """One activation format per integer tensor; tensors of a shared-scale group share it."""
    merged: dict[str, TensorStats] = {}
    for name, st in stats.items():
        rep = analysis.group_of(name)
        merged[rep] = merged[rep].merged(st) if rep in merged else st
    method = config.act_calibration_method
    out = {}
    for name in stats:
        rep = analysis.group_of(name)
        bits = INPUT_ACT_BITS if name == input_name else config.act_bits
        out[name] = merged[rep].quant(bits=bits, method=method)
    return out


def _relu_aware_stats(fit, rows, stats: LayerStatistics) -> LayerStatistics:
    """Statistics against targets that ignore what a following ReLU hides: where the float
    pre-activation is negative, any non-positive output is as good as the float one."""
    x, y = rows
    k = y.shape[1]
    w_hat = fit.weights.dequantize().reshape(k, -1)
    out = LayerStatistics.empty(in_features=x.shape[1], out_features=k)
    for chunk in np.array_split(np.arange(len(x)), max(1, len(x) // 4096)):
        xc, yc = x[chunk], y[chunk]
        pred = xc @ w_hat.T + fit.bias
        out.accumulate(xc, np.where(yc > 0, yc, np.minimum(pred, 0.0)))
    return out


def _quantize_weights(fused: FusedLayer, bits: int, config: QuantConfig, stats: LayerStatistics | None,
                      rows=None, group_size: int | None = None):
    w = fused.weight.weight
    if group_size is None:
        group_size = config.group_size_of(fused.name, pointwise=fused.weight.is_pointwise)
    n = min(group_size, w.shape[1])
    if config.method == "reconstruct" and fused.weight.is_depthwise and rows is not None and per_channel(bits):
        return fit_depthwise(w, *rows, bits=bits, grouping=config.grouping)
    if config.method in FITTED_METHODS and stats is not None:
        fit = fit_layer(w, stats=stats, group_size=n, grouping=config.grouping, bits=bits)
        if RELU_AWARE and rows is not None and fused.relu and fused.residual is None:
            stats = _relu_aware_stats(fit, rows, stats)
            if config.method == "data-aware":  # reconstruct descends from the first fit instead
                fit = fit_layer(w, stats=stats, group_size=n, grouping=config.grouping, bits=bits)
        if config.method == "reconstruct":
            rec = reconstruct_layer(fit.weights, stats=stats, code_bits=config.code_bits, weight=w)
            return rec.weights, rec.bias, rec.output_error
        return fit.weights, fit.bias, fit.output_error
    if bits == 2:
        qw = ternarize(w, group_size=n, method="exact" if config.method in FITTED_METHODS else config.method,
                       grouping=config.grouping)
    else:
        qw = quantize_weights(w, bits=bits, group_size=n, grouping=config.grouping)
    bias = fused.weight.bias if fused.weight.bias is not None else np.zeros(w.shape[0], np.float32)
    return qw, bias, None


def _targets(fused: FusedLayer, y: np.ndarray) -> np.ndarray:
    """Float layer outputs as rows [P, K] in the same (n, oh, ow) order as the patches."""
    if fused.weight.op_type == "dense":
        return y.reshape(y.shape[0], -1)
    return y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1])


class _Walk:
    """Runs the float and the quantized network node by node over one batch."""

    def __init__(self, graph: NumpyGraph, analysis: GraphAnalysis, quantized: set[str]):
        self.graph = graph
        self.fused_at_root = {l.root: l for l in analysis.layers if l.name in quantized}
        self.skipped = {n for l in self.fused_at_root.values() for n in l.skipped}
        last = {}
        for i, node in enumerate(graph.nodes):
            key = node_key(node)
            if key in self.skipped:
                continue
            fused = self.fused_at_root.get(key)
            reads = [fused.input] + ([fused.residual] if fused.residual else []) if fused else list(node.input)
            for name in reads:
                last[name] = i
        for name in graph.output_names:
            last[name] = len(graph.nodes)
        self.last = last

    def free(self, env: dict, i: int, node) -> None:
        """Drop tensors no later node reads (memory stays at one frontier of the network)."""
        fused = self.fused_at_root.get(node_key(node))
        reads = list(node.input) + ([fused.input, fused.residual] if fused else [])
        for name in reads:
            if name and self.last.get(name, -1) <= i and name not in self.graph.constants:
                env.pop(name, None)


def _integer_tensors(analysis: GraphAnalysis, layers) -> set[str]:
    wanted = {t for l in layers for t in (l.input, l.output, l.residual) if t}
    wanted |= {t for t in analysis.scale_groups if any(analysis.group_of(t) == analysis.group_of(w) for w in wanted)}
    return wanted


def calibration_stats(model: onnx.ModelProto, images: np.ndarray, *, progress: bool = True,
                      seed: int = 0) -> dict[str, TensorStats]:
    """Activation statistics of every tensor any plan of ``model`` may store as integers.

    Compute once and pass to :func:`make_plan` as ``stats=`` to plan many configurations
    (sweeps, the sensitivity policy) without re-running the float network::

        >>> stats = calibration_stats(model, calib_images)  # doctest: +SKIP
        >>> plans = [make_plan(model, calib_images, config=c, stats=stats) for c in configs]  # doctest: +SKIP
    """
    analysis = analyse(model)
    graph = NumpyGraph(model)
    return collect_stats(graph, images, tensors=_integer_tensors(analysis, analysis.layers),
                         progress=progress, seed=seed)


def make_plan(model: onnx.ModelProto, images: np.ndarray, *, config: QuantConfig,
              fit_images: int = FIT_IMAGES, progress: bool = True, seed: int = 0,
              stats: dict[str, TensorStats] | None = None,
              alternatives: tuple = ()) -> QuantPlan:
    """Plan the quantization of a normalized float32 ONNX ``model`` with calibration ``images``.

    Activation scales come from all ``images``; the sequential fit walks ``fit_images`` of
    them, a seeded sample spread across the set (recorded in ``plan.calibration``).
    ``stats``: from :func:`calibration_stats` on the same images (skips calibration).
    ``alternatives``: weight bits (or ``(bits, N)`` pairs: at group size N) at which every layer
    the policy gives ``config.weight_bits`` is also fitted, on the same inputs, into
    ``plan.alternatives[layer][alternative]`` (for the sensitivity policy; a pair is skipped
    where N is not below the layer's input channels).
    """
    start = time.perf_counter()
    graph = NumpyGraph(model)
    analysis = analyse(model)
    decisions = _decisions(analysis, config)
    quantized = [l for l in analysis.layers if decisions[l.name].bits]
    input_name = graph.input_names[0]
    wanted = _integer_tensors(analysis, quantized)
    if stats is None:
        stats = collect_stats(graph, images, tensors=wanted, progress=progress, seed=seed)
    else:
        missing = wanted - stats.keys()
        if missing:
            raise ValueError(f"calibration stats lack tensor(s) {sorted(missing)[:3]}: not from this model")
        stats = {t: stats[t] for t in wanted}
    quants = _tensor_quants(analysis, stats, quantized, config, input_name)
    alt_plans: dict[str, dict[int, LayerPlan]] = {}

    rng = np.random.default_rng(seed)
    layers: dict[str, LayerPlan] = {}
    last_layer = analysis.layers[-1].name

    def fit(fused: FusedLayer, x_q: np.ndarray, float_env: dict, env: dict) -> LayerPlan:
        node = next(n for n in graph.nodes if node_key(n) == fused.name)
        w = fused.weight.weight
        geometry = {} if fused.weight.op_type == "dense" else conv_geometry(node, x_q.shape[2:], w.shape[2:])
        in_q = quants[fused.input]
        layer_stats = fit_rows = None
        if config.method == "reconstruct" and fused.weight.is_depthwise and w.shape[0] == geometry["groups"]:
            fit_rows = _fit_rows(fused, x_q, float_env[node.output[0]], geometry, in_q, rng,
                                 rows=DEPTHWISE_ROWS, depthwise=True)
        elif config.method in FITTED_METHODS and geometry.get("groups", 1) == 1:
            target = float_env[node.output[0]]
            if config.method == "reconstruct" and fused.residual:
                # reconstruct the block output, not the branch: the conv also makes up for the
                # quantized skip path's error (float block = float conv + float skip)
                res_q = quants[fused.residual]
                skip_q = _chunked(lambda r: dequantize_activation(quantize_activation(r, res_q), res_q),
                                  env[fused.residual])
                target = _chunked(lambda t, a, b: t.astype(np.float32) + a - b, target,
                                  float_env[fused.residual], skip_q)
            fit_rows = _fit_rows(fused, x_q, target, geometry, in_q, rng)
            layer_stats = LayerStatistics.empty(in_features=fit_rows[0].shape[1], out_features=fit_rows[1].shape[1])
            for chunk in np.array_split(np.arange(len(fit_rows[0])), max(1, len(fit_rows[0]) // 4096)):
                layer_stats.accumulate(fit_rows[0][chunk], fit_rows[1][chunk])
        decision = decisions[fused.name]

        def build(bits, decision, group_size=None):
            return build_layer(fused, bits, decision, geometry=geometry, in_q=in_q, layer_stats=layer_stats,
                               fit_rows=fit_rows, group_size=group_size)

        if decision.reason == "configured":
            others = {}
            for alt in alternatives:
                bits, n = alt if isinstance(alt, tuple) else (alt, None)
                if alt != decision.bits and (n is None or n < fused.weight.in_channels_per_group):
                    others[alt] = build(bits, decision, group_size=n)
            if others:
                alt_plans[fused.name] = others
        return build(decision.bits, decision)

    def build_layer(fused, bits, decision, *, geometry, in_q, layer_stats, fit_rows, group_size=None) -> LayerPlan:
        w = fused.weight.weight
        qw, bias, out_err = _quantize_weights(fused, bits, config, layer_stats, fit_rows, group_size=group_size)
        # reconstruct returns integer scales already (it fits the codes on that grid)
        iw = qw if isinstance(qw, IntegerWeights) else to_integer_scales(qw, code_bits=config.code_bits)
        terminal = fused.name == last_layer and fused.residual is None
        out_q = None if terminal else quants[fused.output]
        res_q = quants[fused.residual] if fused.residual else None
        bias_int, dequant, mult, shift, res_mult = integer_params(
            iw, bias, input_quant=in_q, output_quant=out_q, residual_quant=res_q)
        return LayerPlan(
            fused=fused, decision=decision if bits == decision.bits else LayerDecision(bits, "alternative"),
            weights=iw, bias_int=bias_int,
            geometry=geometry, input_quant=in_q, output_quant=out_q, residual_quant=res_q,
            multiplier=mult, shift=shift, residual_multiplier=res_mult, dequant_scale=dequant,
            weight_error=relative_error(w, iw.dequantize()), output_error=out_err)

    # a user's folder is often sorted by class: walk a sample spread across it, not a prefix
    fit_idx = sorted(int(i) for i in np.random.default_rng(seed).choice(
        len(images), size=min(fit_images, len(images)), replace=False))
    _run(graph, analysis, layers, images[fit_idx], quantized={l.name for l in quantized},
         fit=fit, progress=progress)
    calibration = {"activation_images": len(images), "fit_images": len(fit_idx), "fit_indices": fit_idx,
                   "fit_seed": seed, "method": config.method}
    plan = QuantPlan(config=config, model=model, analysis=analysis, layers=layers,
                     decisions=decisions, seconds=time.perf_counter() - start,
                     alternatives=alt_plans, calibration=calibration)
    if config.distill_epochs and layers:
        from .distill import distill_plan

        plan, info = distill_plan(plan, images[fit_idx], epochs=config.distill_epochs, seed=seed,
                                  progress=progress)
        if not info["distilled"]:
            from ..errors import UserError

            raise UserError(f"--distill-epochs: cannot distill this model: {info['why']}")
        plan = replace(plan, seconds=time.perf_counter() - start)
    return plan


def _fit_rows(fused: FusedLayer, x: np.ndarray, y: np.ndarray, geometry: dict, in_q: ActivationQuant,
              rng: np.random.Generator, rows: int = FIT_ROWS, depthwise: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """FIT_ROWS sampled rows of the layer's input patches (on the kernel's integer grid) and of
    the float targets, built image chunk by chunk: the full im2col of the fit set never exists.
    ``depthwise``: patches per channel, [P, C, R*S]."""
    n = x.shape[0]
    per = 1 if fused.weight.op_type == "dense" else y.shape[2] * y.shape[3]
    total = n * per
    sel = np.sort(rng.choice(total, size=min(total, rows), replace=False))
    xs, ys = [], []
    for i0 in range(0, n, CHUNK_IMAGES):
        lo, hi = np.searchsorted(sel, [i0 * per, (i0 + CHUNK_IMAGES) * per])
        if lo == hi:
            continue
        idx = sel[lo:hi] - i0 * per
        # what the kernel will see: the input on its integer grid (the shared quantizer's rounding)
        x_deq = dequantize_activation(quantize_activation(x[i0 : i0 + CHUNK_IMAGES], in_q), in_q)
        xs.append((_depthwise_patches if depthwise else _patches)(fused, x_deq, geometry)[idx])
        ys.append(_targets(fused, y[i0 : i0 + CHUNK_IMAGES])[idx])
    return np.concatenate(xs), np.concatenate(ys)


def _depthwise_patches(fused: FusedLayer, x: np.ndarray, geometry: dict) -> np.ndarray:
    """Per-channel im2col rows [P, C, R*S] of a depthwise conv."""
    w = fused.weight.weight
    cols = ref.im2col(x, kernel_hw=w.shape[2:], stride=geometry["stride"], padding=geometry["padding"],
                      dilation=geometry["dilation"], dtype=np.float32)
    n, c, r, s, oh, ow = cols.shape
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * oh * ow, c, r * s)


def _patches(fused: FusedLayer, x: np.ndarray, geometry: dict) -> np.ndarray:
    """im2col rows [P, D], D in C-major (c, r, s) order like ``weight.reshape(K, -1)``."""
    if fused.weight.op_type == "dense":
        return x.reshape(x.shape[0], -1)
    w = fused.weight.weight
    cols = ref.im2col(x, kernel_hw=w.shape[2:], stride=geometry["stride"], padding=geometry["padding"],
                      dilation=geometry["dilation"], dtype=np.float32)
    n, c, r, s, oh, ow = cols.shape
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * oh * ow, c * r * s)


def _chunked(fn, x: np.ndarray, *rest, store=None):
    """``fn`` over CHUNK_IMAGES images at a time (per-image ops; bounds im2col memory); each
    chunk's result goes through ``store`` (e.g. to float16) before the chunks are joined."""
    store = store or (lambda a: a)
    if x.shape[0] <= CHUNK_IMAGES:
        return store(fn(x, *rest))
    parts = [store(fn(x[i : i + CHUNK_IMAGES], *[None if r is None else r[i : i + CHUNK_IMAGES] for r in rest]))
             for i in range(0, x.shape[0], CHUNK_IMAGES)]
    return np.concatenate(parts)


def _half(a: np.ndarray) -> np.ndarray:
    """How the planning walk keeps a tensor: float32 as float16, which halves the frontier of
    the fit set (targets keep ~3 significant digits; a tensor on an 8-bit grid re-quantizes to
    the same integers: the float16 error is < 1/8 of a step). Not where float16 would
    overflow, and not small tensors (logits, pooled features)."""
    if a.dtype != np.float32 or a.size < STORE_HALF_MIN // CHUNK_IMAGES or np.abs(a).max() >= 60_000:
        return a
    return a.astype(np.float16)


# ops that treat each image on its own: the planning walk runs them CHUNK_IMAGES at a time
PER_IMAGE_OPS = {"Conv", "Relu", "Clip", "MaxPool", "AveragePool", "Add", "Mul", "Concat",
                 "BatchNormalization", "Sigmoid", "HardSwish", "HardSigmoid", "LeakyRelu", "LRN"}


def _run(graph, analysis, layers, x, *, quantized, fit=None, progress=False, keep_int=None):
    """Walk the network once. With ``fit``, quantize each layer on reaching it (planning) and
    keep the float network alongside; else run the plan in ``layers``. Both networks keep only
    the tensors a later node reads."""
    total = len(quantized)
    walk = _Walk(graph, analysis, quantized)
    float_env = dict(graph.constants) if fit is not None else None
    float_last = graph.last_uses()
    at = {node_key(n): i for i, n in enumerate(graph.nodes)}
    for fused in walk.fused_at_root.values():  # the fit reads these float tensors at the root
        for name in (graph.nodes[at[fused.name]].output[0], fused.residual):
            if name:
                float_last[name] = max(float_last.get(name, -1), at[fused.root])
    env = dict(graph.constants)
    name_in = graph.input_names[0]
    env[name_in] = np.asarray(x, np.float32)
    if float_env is not None:
        float_env[name_in] = env[name_in]
    bar = progress_bar(total, desc="quantizing layers", unit="layers", enabled=progress and fit is not None)

    store = _half if fit is not None else None

    def evaluate(node, inputs):
        n = inputs[0].shape[0] if inputs and inputs[0] is not None and inputs[0].ndim == 4 else 0
        per_image = [i for i, (name, a) in enumerate(zip(node.input, inputs))
                     if a is not None and name not in graph.constants and a.ndim == 4 and a.shape[0] == n]
        along_batch = node.op_type == "Concat" and onnx.helper.get_node_attr_value(node, "axis") in (0, -4)
        if n > CHUNK_IMAGES and node.op_type in PER_IMAGE_OPS and per_image and not along_batch:
            def one(*parts):
                args = list(inputs)
                for i, part in zip(per_image, parts):
                    args[i] = part
                return graph.evaluate(node, args)
            return _chunked(one, *[inputs[i] for i in per_image], store=store)
        out = graph.evaluate(node, inputs)
        return out if store is None else store(out)

    for i, node in enumerate(graph.nodes):
        key = node_key(node)
        if float_env is not None:
            float_env[node.output[0]] = evaluate(node, [float_env.get(n) if n else None for n in node.input])
        if key in walk.skipped:
            pass
        elif (fused := walk.fused_at_root.get(key)) is None:
            env[node.output[0]] = evaluate(node, [env[n] if n else None for n in node.input])
            walk.free(env, i, node)
        else:
            if fit is not None:
                layers[fused.name] = fit(fused, env[fused.input], float_env, env)
                bar.update(1)
            residual = env[fused.residual] if fused.residual else None
            if keep_int is None:
                run = layers[fused.name].run
                env[fused.output] = _chunked(lambda xb, rb: run(xb, rb)[0], env[fused.input], residual, store=store)
            else:
                env[fused.output], keep_int[fused.name] = layers[fused.name].run(env[fused.input], residual)
            walk.free(env, i, node)
        if float_env is not None:
            for name in node.input:
                if name and float_last.get(name) == i and name not in graph.constants:
                    float_env.pop(name, None)
    bar.close()
    return env[graph.output_names[0]]


def simulate(plan: QuantPlan, x: np.ndarray, *, keep_int: dict | None = None) -> np.ndarray:
    """Run the quantized network in numpy (the reference of the compiled library)."""
    graph = NumpyGraph(plan.model)
    return _run(graph, plan.analysis, plan.layers, x, quantized=set(plan.layers), keep_int=keep_int)
