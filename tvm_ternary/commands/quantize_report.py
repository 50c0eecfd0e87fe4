"""``tvm-ternary quantize-report``: what ternarizing (or 4/8-bit quantizing) weights costs.

Per conv/dense layer: shape, group count, share of zero codes, relative weight error
``||W - W_hat|| / ||W||`` for both thresholds (``exact`` and ``twn``), the extra error of integer
group scales, and the share of multiplications removed; then MAC-weighted network totals.

Layer policy: the compiler's own (:func:`tvm_ternary.plan.config.decide`): the first layer
(reads the model input: 3 colour channels, and the papers keep it precise), the last layer (the
classifier) and depthwise convs (one input channel per group: nothing to share a scale with)
stay 8-bit per output channel; every other conv/dense gets the chosen weight format.

Example::

    >>> layers = find_weighted_layers(load_model("model.onnx"))  # doctest: +SKIP
    >>> report = build_report(layers, config=ReportConfig(group_size=4))  # doctest: +SKIP
    >>> print(format_report(report))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from tvm_ternary.commands import Command
from tvm_ternary.commands._options import positive_int
from tvm_ternary.errors import NoWeightedLayersError, OptionError, UserError
from tvm_ternary.onnx_io import LayerWeight, find_weighted_layers, load_model
from tvm_ternary.quant import (
    WEIGHT_BITS,
    multiplications_removed,
    quantize_weights,
    relative_error,
    ternarize,
    to_integer_scales,
)

DESCRIPTION = """\
Per conv/dense layer: weight shape, group count, share of zero codes, relative weight error
||W - W_hat|| / ||W|| for both ternary thresholds (exact and twn), the extra error of integer
group scales, and the share of multiplications removed; then MAC-weighted network totals.

The first layer, the last layer and depthwise convs stay 8-bit per output channel (the policy
compile uses); every other conv/dense layer gets the chosen weight format."""

THRESHOLDS = ("exact", "twn")
GROUPINGS = ("fgq", "cluster")
CODE_BITS = (7, 4)
KEPT_BITS = 8  # precision of the layers the policy does not ternarize


@dataclass(frozen=True)
class ReportConfig:
    """What to quantize to. ``weight_bits=2`` means ternary.

    >>> ReportConfig(group_size=4).threshold
    'exact'
    """

    group_size: int = 4
    threshold: str = "exact"
    grouping: str = "fgq"
    weight_bits: int = 2
    code_bits: int = 7


@dataclass(frozen=True)
class LayerReport:
    name: str
    op_type: str
    shape: tuple[int, ...]
    macs: int | None  # per sample; None for a conv whose output size shape inference missed
    num_weights: int
    weight_bits: int  # what this layer gets: the chosen bits, or KEPT_BITS
    kept_reason: str | None  # why the policy kept it at KEPT_BITS (None: chosen format)
    groups: int  # scales stored (one per group)
    zero_fraction: float  # share of weights whose code is 0
    error: float  # relative weight error with float group scales, chosen threshold
    error_exact: float | None  # ternary layers: both thresholds, so exact < twn is visible
    error_twn: float | None
    error_integer_scales: float  # with integer group codes x per-channel float scale
    multiplications_removed: float  # fraction of this layer's multiplications

    @property
    def integer_scales_extra_error(self) -> float:
        return self.error_integer_scales - self.error


@dataclass(frozen=True)
class Report:
    model: str
    config: ReportConfig
    layers: tuple[LayerReport, ...]
    seconds: float

    @property
    def weighting(self) -> str:
        """What the totals weight each layer by: "macs", or "weights" if some MACs are unknown."""
        return "macs" if all(layer.macs is not None for layer in self.layers) else "weights"

    def layer_weights(self) -> np.ndarray:
        field = "macs" if self.weighting == "macs" else "num_weights"
        return np.array([getattr(layer, field) for layer in self.layers], dtype=np.float64)

    def totals(self) -> dict:
        """Network totals, each per-layer figure weighted by the layer's MACs (or weights)."""
        weights = self.layer_weights()
        quantized = np.array([layer.kept_reason is None for layer in self.layers])

        def mean(values, mask=None) -> float | None:
            mask = np.ones(len(values), bool) if mask is None else mask
            if not mask.any() or weights[mask].sum() == 0:
                return None
            return float(np.dot(np.asarray(values, np.float64)[mask], weights[mask])
                         / weights[mask].sum())

        def column(field: str) -> list:
            return [getattr(layer, field) for layer in self.layers]

        ternary = quantized & (self.config.weight_bits == 2)
        return {
            "layers": len(self.layers),
            "macs": int(weights.sum()) if self.weighting == "macs" else None,
            "layers_in_chosen_format": int(quantized.sum()),
            "chosen_format_share": float(weights[quantized].sum() / weights.sum()),
            "error": mean(column("error")),
            "error_integer_scales": mean(column("error_integer_scales")),
            "error_exact": mean(column("error_exact"), ternary) if ternary.any() else None,
            "error_twn": mean(column("error_twn"), ternary) if ternary.any() else None,
            "multiplications_removed": mean(column("multiplications_removed")),
            "multiplications_removed_chosen_layers": mean(column("multiplications_removed"),
                                                          quantized),
            "zero_fraction": mean(column("zero_fraction")),
        }

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "config": asdict(self.config),
            "weighting": self.weighting,
            "seconds": round(self.seconds, 3),
            "layers": [
                {**asdict(layer), "shape": list(layer.shape),
                 "integer_scales_extra_error": layer.integer_scales_extra_error}
                for layer in self.layers
            ],
            "totals": self.totals(),
        }


def kept_reason(layer: LayerWeight, *, is_last: bool = False) -> str | None:
    """Why the compiler's policy keeps ``layer`` at 8-bit, or None when it gets the chosen
    format (one policy: :func:`tvm_ternary.plan.config.decide` with its defaults)."""
    from tvm_ternary.plan.config import QuantConfig, decide

    decision = decide(name=layer.name, op_type=layer.op_type, depthwise=layer.is_depthwise,
                      is_first=layer.reads_model_input, is_last=is_last,
                      in_channels=layer.in_channels_per_group,
                      config=QuantConfig(weight_bits=2, clamp_group_size=True))
    return None if decision.reason == "configured" else decision.reason


def build_report(layers: list[LayerWeight], *, config: ReportConfig, model: str = "") -> Report:
    """Quantize every layer's weight as ``config`` says and measure it.

    A group size the quantizer refuses for some layer (N > C) raises :class:`OptionError`
    naming the layer.
    """
    if not layers:
        raise NoWeightedLayersError(
            f"{model or 'model'}: no conv or dense layer with constant weights")
    start = time.perf_counter()
    reports = []
    for i, layer in enumerate(layers):
        try:
            reports.append(_layer_report(layer, config=config, is_last=i == len(layers) - 1))
        except ValueError as error:  # the quantizer validates N against the layer itself
            largest_allowed = min(other.in_channels_per_group for j, other in enumerate(layers)
                                  if kept_reason(other, is_last=j == len(layers) - 1) is None)
            raise OptionError(
                f"layer {layer.name} ({layer.op_type} weight {list(layer.weight.shape)}): {error}"
                f"; this model allows --group-size 1 to {largest_allowed}"
            ) from None
    return Report(model=model, config=config, layers=tuple(reports),
                  seconds=time.perf_counter() - start)


def _layer_report(layer: LayerWeight, *, config: ReportConfig, is_last: bool = False) -> LayerReport:
    weight = layer.weight
    reason = kept_reason(layer, is_last=is_last)
    bits = KEPT_BITS if reason else config.weight_bits
    errors = {}
    if bits == 2:
        results = {method: ternarize(weight, group_size=config.group_size, method=method,
                                     grouping=config.grouping) for method in THRESHOLDS}
        errors = {method: relative_error(weight, q.dequantize()) for method, q in results.items()}
        chosen = results[config.threshold]
    else:
        chosen = quantize_weights(weight, bits=bits, group_size=config.group_size,
                                  grouping=config.grouping)
    integer = to_integer_scales(chosen, code_bits=config.code_bits)
    return LayerReport(
        name=layer.name,
        op_type=layer.op_type,
        shape=tuple(int(d) for d in weight.shape),
        macs=layer.macs,
        num_weights=int(weight.size),
        weight_bits=bits,
        kept_reason=reason,
        groups=int(chosen.layout.total_groups),
        zero_fraction=chosen.zero_fraction(),
        error=relative_error(weight, chosen.dequantize()),
        error_exact=errors.get("exact"),
        error_twn=errors.get("twn"),
        error_integer_scales=relative_error(weight, integer.dequantize()),
        # Only a ternary weight turns its multiplies into adds; 4/8-bit values still multiply.
        multiplications_removed=multiplications_removed(chosen.layout) if bits == 2 else 0.0,
    )


# ---------------------------------------------------------------------------------------------
# Text output


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mode(layer: LayerReport) -> str:
    name = "ternary" if layer.weight_bits == 2 else f"{layer.weight_bits}-bit"
    return f"{name} ({layer.kept_reason})" if layer.kept_reason else name


def format_report(report: Report) -> str:
    config = report.config
    fmt_name = "ternary" if config.weight_bits == 2 else f"{config.weight_bits}-bit"
    threshold = f", threshold {config.threshold}" if config.weight_bits == 2 else ""
    unit = "MMACs" if report.weighting == "macs" else "kweights"
    header = ["layer", "op", "weight shape", unit, "format", "groups", "zeros", "err",
              "err exact", "err twn", "+int scales", "mult removed"]
    size_unit = 1e6 if report.weighting == "macs" else 1e3
    rows = [
        [layer.name, layer.op_type, "x".join(map(str, layer.shape)),
         f"{size / size_unit:.2f}", _mode(layer),
         str(layer.groups), f"{layer.zero_fraction:.1%}", f"{layer.error:.4f}",
         _fmt(layer.error_exact, ".4f"), _fmt(layer.error_twn, ".4f"),
         f"{layer.integer_scales_extra_error:+.4f}", f"{layer.multiplications_removed:.1%}"]
        for layer, size in zip(report.layers, report.layer_weights())
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    left_aligned = {0, 1, 2, 4}

    def line(cells):
        return "  ".join(cell.ljust(w) if i in left_aligned else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    totals = report.totals()
    weighted = "MAC" if report.weighting == "macs" else "weight-count"
    macs = f", {totals['macs'] / 1e6:.1f} M MACs" if totals["macs"] is not None else ""
    lines = [
        f"{report.model}: {totals['layers']} conv/dense layers{macs}",
        f"{fmt_name} weights{threshold}, grouping {config.grouping}, "
        f"group size N={config.group_size}, {config.code_bits}-bit integer group scales; "
        f"first, last and depthwise layers stay {KEPT_BITS}-bit (compile's policy)",
        "",
        line(header),
        line(["-" * w for w in widths]),
        *(line(row) for row in rows),
        "",
        f"totals ({weighted}-weighted):",
    ]
    share_of = "MACs" if report.weighting == "macs" else "weights"
    totals_rows = [
        (f"layers in {fmt_name}", f"{totals['layers_in_chosen_format']} of {totals['layers']} "
                                  f"({totals['chosen_format_share']:.1%} of {share_of})"),
        ("weight error exact / twn",
         f"{totals['error_exact']:.4f} / {totals['error_twn']:.4f} (ternary layers)"
         if totals["error_exact"] is not None else None),
        ("weight error, all layers",
         f"{totals['error']:.4f} with float scales, {totals['error_integer_scales']:.4f} with "
         f"integer scales ({totals['error_integer_scales'] - totals['error']:+.4f})"),
        ("zero codes", f"{totals['zero_fraction']:.1%}"),
        ("multiplications removed",
         f"{totals['multiplications_removed']:.1%} of the network "
         f"({_fmt(totals['multiplications_removed_chosen_layers'], '.1%')} in {fmt_name} layers)"),
        ("run time", f"{report.seconds:.2f} s"),
    ]
    label_width = max(len(label) for label, _ in totals_rows)
    lines += [f"  {label.ljust(label_width)}  {value}" for label, value in totals_rows if value]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx", help="ONNX model to read")
    parser.add_argument("--group-size", "-N", type=positive_int, default=4, metavar="N",
                        help="input channels per scale group (default 4: removes 75%% of the "
                             "multiplications with fgq)")
    parser.add_argument("--threshold", choices=THRESHOLDS, default="exact",
                        help="ternary threshold: exact (optimal per group) or twn (0.7·mean|w|); "
                             "the table shows both errors either way (default exact)")
    parser.add_argument("--grouping", choices=GROUPINGS, default="fgq",
                        help="fgq: N channels at one kernel position share a scale; cluster: N "
                             "whole kernels of one filter do (default fgq)")
    parser.add_argument("--weight-bits", type=int, choices=WEIGHT_BITS, default=2,
                        help="2 = ternary (default), 4 or 8 = symmetric integer weights")
    parser.add_argument("--code-bits", type=int, choices=CODE_BITS, default=7,
                        help="bits of the integer group-scale codes (default 7)")
    parser.add_argument("--json", metavar="PATH", type=Path,
                        help="also write the report as JSON to PATH")


def run(args: argparse.Namespace) -> int:
    config = ReportConfig(group_size=args.group_size, threshold=args.threshold,
                          grouping=args.grouping, weight_bits=args.weight_bits,
                          code_bits=args.code_bits)
    if args.json is not None:
        from ._options import check_output

        check_output(args.json, inputs=(args.model,), what="JSON report")
    start = time.perf_counter()
    layers = find_weighted_layers(load_model(args.model))
    report = build_report(layers, config=config, model=str(args.model))
    report = replace(report, seconds=time.perf_counter() - start)  # include the loading time
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        except OSError as error:
            raise UserError(f"cannot write JSON report to {args.json}: "
                            f"{error.strerror or error}") from None
    print(format_report(report))
    if args.json is not None:
        print(f"JSON report written to {args.json}")
    return 0


COMMAND = Command(
    name="quantize-report",
    summary="per-layer error and multiplications removed when ternarizing a model's weights",
    description=DESCRIPTION,
    epilog="example:\n  tvm-ternary quantize-report ../shared/data/imagenet/models/"
           "squeezenet1.1.onnx --group-size 4 --json report.json",
    add_arguments=add_arguments,
    run=run,
)
