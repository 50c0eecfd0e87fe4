"""What a plan costs and saves: MAC shares per weight format, multiplications removed, bytes.

The papers' table columns. MACs are per sample; a layer whose MACs shape inference missed
counts its weights instead (the ``weighting`` key says which).

Example::

    >>> s = plan_summary(plan)  # doctest: +SKIP
    >>> f"{s['ternary_mac_share']:.1%} of MACs ternary, {s['weight_bytes'] / 1e6:.2f} MB"  # doctest: +SKIP
    '93.1% of MACs ternary, 0.41 MB'
"""

from __future__ import annotations

from ..quant import FORMAT_NAMES, multiplications_removed, packed_bytes, per_channel
from .build import QuantPlan


def layer_bytes(plan: QuantPlan, name: str) -> int:
    """Storage of one layer's weights as the library holds them (bias int32 / float32 included)."""
    fused = next(l for l in plan.analysis.layers if l.name == name)
    shape = tuple(fused.weight.weight.shape)
    k, size = shape[0], int(fused.weight.weight.size)
    lp = plan.layers.get(name)
    if lp is None:  # float layer: fp32 weight and bias
        return 4 * size + 4 * k
    groups = int(lp.weights.layout.total_groups)
    if lp.weights.bits == 2:
        return packed_bytes(shape=shape, num_groups=groups) + 4 * k
    # 4/7/8-bit values stored one per byte (the kernels take int8), a byte per group code,
    # a float32 scale per channel and the int32 bias
    return size + (groups if lp.weights.bits == 4 else 0) + 4 * k + 4 * k


def plan_summary(plan: QuantPlan) -> dict:
    layers = plan.analysis.layers
    known = all(l.weight.macs is not None for l in layers)
    weight = {l.name: float(l.weight.macs if known else l.weight.weight.size) for l in layers}
    total = sum(weight.values()) or 1.0
    share = {fmt: 0.0 for fmt in FORMAT_NAMES.values()}
    removed = 0.0
    for l in layers:
        bits = plan.decisions[l.name].bits
        share[FORMAT_NAMES[bits]] += weight[l.name] / total
        if bits == 2:
            removed += weight[l.name] / total * multiplications_removed(plan.layers[l.name].weights.layout)
    return {
        "layers": len(layers),
        "weighting": "macs" if known else "weights",
        "macs": int(total) if known else None,
        "ternary_mac_share": share["ternary"],
        "int4_mac_share": share["int4"],
        "int7_mac_share": share["int7"],
        "int8_mac_share": share["int8"],
        "float_mac_share": share["float"],
        "multiplications_removed": removed,
        "weight_bytes": int(sum(layer_bytes(plan, l.name) for l in layers)),
        "float_weight_bytes": int(sum(4 * l.weight.weight.size + 4 * l.weight.weight.shape[0] for l in layers)),
        "layer_formats": {l.name: layer_format(plan, l.name) for l in layers},
    }


def layer_format(plan: QuantPlan, name: str) -> str:
    """``ternary``, ``int4``, ``int7``, ``int8`` or ``float``; `` N=2`` added where a layer's group size
    is not the plan's ``group_size`` (a per-layer override or ``pointwise_group_size``)."""
    fmt = FORMAT_NAMES[plan.decisions[name].bits]
    lp = plan.layers.get(name)
    config = plan.config
    own_n = name in dict(config.group_overrides) or config.pointwise_group_size not in (None, config.group_size)
    if lp is not None and lp.weights.bits in (2, 4) and own_n and lp.weights.group_size != config.group_size:
        fmt += f" N={lp.weights.group_size}"
    return fmt


def describe_config(config) -> str:
    """One line, e.g. ``ternary N=4 fgq data-aware, 8-bit activations (minmax)``."""
    w = "ternary" if config.weight_bits == 2 else f"{config.weight_bits}-bit"
    grouping = f" N={config.group_size} {config.grouping}" if not per_channel(config.weight_bits) else " per channel"
    extra = f", 1x1 convs N={config.pointwise_group_size}" if (
        config.pointwise_group_size not in (None, config.group_size) and not per_channel(config.weight_bits)) else ""
    extra += f", {len(config.overrides)} per-layer overrides" if config.overrides else ""
    if config.group_overrides:
        extra += f", {len(config.group_overrides)} per-layer group sizes"
    return (f"{w}{grouping} {config.method} weights, {config.act_bits}-bit activations "
            f"({config.act_calibration_method}){extra}")
