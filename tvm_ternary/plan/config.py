"""Quantization configuration and the per-layer policy (numpy/onnx only).

Defaults follow the papers: the first conv and the last dense (classifier) layer keep 8-bit
weights, depthwise convs keep 8-bit (FGQ's groups run across input channels, and a depthwise
filter has one), everything else gets ``weight_bits``. Any layer can be overridden by name or
by op type (``conv``, ``dense``, ``depthwise``).

Example::

    >>> cfg = QuantConfig(weight_bits=2, group_size=4, overrides=(("fire9/expand3x3_1", 8),))
    >>> cfg.act_calibration_method
    'minmax'
    >>> cfg = QuantConfig(group_size=4, pointwise_group_size=2, group_overrides=(("conv3", 8),))
    >>> cfg.group_size_of("conv1"), cfg.group_size_of("conv2", pointwise=True), cfg.group_size_of("conv3", pointwise=True)
    (4, 2, 8)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import OptionError
from ..quant import CALIBRATION_METHODS, GROUPINGS, WEIGHT_BITS, per_channel

METHODS = ("reconstruct", "data-aware", "exact", "twn")
DEFAULT_METHOD = "reconstruct"
CALIB_LIMIT = 256  # default calibration images (sampled across the folder); see docs/ARCHITECTURE.md
ACT_BITS = (8, 4)
PRECISE_BITS = 8  # what the policy gives the layers it keeps precise
MAX_DISTILL_EPOCHS = 100


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides how a model is quantized; validated on construction."""

    weight_bits: int = 2
    group_size: int = 4
    grouping: str = "fgq"
    method: str = DEFAULT_METHOD
    act_bits: int = 8
    act_calibration: str | None = None  # None: minmax at 8 bits, mse at 4 bits (clipping)
    code_bits: int = 7
    first_layer_bits: int = PRECISE_BITS
    last_layer_bits: int = PRECISE_BITS
    depthwise_bits: int = PRECISE_BITS
    overrides: tuple[tuple[str, int], ...] = ()  # (layer name or op type, weight bits | 0 = float)
    # (layer name, N): that layer's groups hold N input channels instead of group_size (what the
    # sensitivity policy gives a layer that is too sensitive at group_size but not at N = 2)
    group_overrides: tuple[tuple[str, int], ...] = ()
    # N of every pointwise (1x1, not depthwise) conv instead of group_size; None: group_size.
    # The 1x1 convs of compact CNNs (SqueezeNet's squeeze and expand1x1, MobileNetV2's expand
    # and project) mix channels with one weight per pair and lose the most at N = 4; at N = 2
    # they keep half the multiplications removed instead of 3/4. group_overrides still win.
    pointwise_group_size: int | None = None
    # True: a layer with fewer input channels than group_size gets N = C (one group per kernel
    # position) instead of an error; the papers' "N = 64" and "N = C" rows need it.
    clamp_group_size: bool = False
    # epochs of end-to-end distillation of group codes, channel scales and biases against the
    # float logits after the layer-wise fit (plan.distill; needs torch); 0 = none
    distill_epochs: int = 0

    def __post_init__(self):
        def check(name, value, allowed):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

        check("weight bits", self.weight_bits, WEIGHT_BITS)
        check("grouping", self.grouping, GROUPINGS)
        check("method", self.method, METHODS)
        check("activation bits", self.act_bits, ACT_BITS)
        check("group-code bits", self.code_bits, (7, 4))
        for name in ("first_layer_bits", "last_layer_bits", "depthwise_bits"):
            check(name.replace("_", " "), getattr(self, name), WEIGHT_BITS)
        if self.act_calibration is not None:
            check("activation calibration", self.act_calibration, CALIBRATION_METHODS)
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group size must be a positive integer, got {self.group_size!r}")
        if not isinstance(self.distill_epochs, int) or not 0 <= self.distill_epochs <= MAX_DISTILL_EPOCHS:
            raise ValueError(f"distillation epochs must be an integer in [0, {MAX_DISTILL_EPOCHS}], "
                             f"got {self.distill_epochs!r}")
        for key, bits in self.overrides:
            check(f"override bits for {key!r}", bits, (0,) + WEIGHT_BITS)
        if self.pointwise_group_size is not None and (
                not isinstance(self.pointwise_group_size, int) or isinstance(self.pointwise_group_size, bool)
                or self.pointwise_group_size < 1):
            raise ValueError(f"pointwise group size must be a positive integer, got {self.pointwise_group_size!r}")
        for key, n in self.group_overrides:
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"group size override for {key!r} must be a positive integer, got {n!r}")

    def group_size_of(self, name: str, *, pointwise: bool = False) -> int:
        """N of layer ``name``: its ``group_overrides`` entry, else ``pointwise_group_size`` for a
        ``pointwise`` (1x1, not depthwise) conv when set, else ``group_size``."""
        default = self.group_size
        if pointwise and self.pointwise_group_size is not None:
            default = self.pointwise_group_size
        return dict(self.group_overrides).get(name, default)

    @property
    def act_calibration_method(self) -> str:
        if self.act_calibration is not None:
            return self.act_calibration
        return "minmax" if self.act_bits == 8 else "mse"


@dataclass(frozen=True)
class LayerDecision:
    """What the policy chose for one layer: ``bits`` 2/4/8, or 0 to keep it float."""

    bits: int
    reason: str  # "configured", "first layer", "last layer", "depthwise", "override: <key>"


def decide(*, name: str, op_type: str, depthwise: bool, is_first: bool, is_last: bool,
           in_channels: int, config: QuantConfig, pointwise: bool = False) -> LayerDecision:
    """Weight precision for one layer (see the module docstring)."""
    kinds = {name, op_type} | ({"depthwise"} if depthwise else set())
    for key, bits in config.overrides:
        if key in kinds:
            return LayerDecision(bits=bits, reason=f"override: {key}")
    if is_first:
        return LayerDecision(bits=config.first_layer_bits, reason="first layer")
    if is_last:
        return LayerDecision(bits=config.last_layer_bits, reason="last layer")
    if depthwise:
        return LayerDecision(bits=config.depthwise_bits, reason="depthwise")
    n = config.group_size_of(name, pointwise=pointwise)
    if not per_channel(config.weight_bits) and n > in_channels and not config.clamp_group_size:
        raise OptionError(
            f"layer {name}: group size N={n} exceeds its {in_channels} input channels "
            f"(use {'--pointwise-group-size' if pointwise and config.pointwise_group_size else '-N'} "
            f"{in_channels} or less, or --layer-bits {name}=8)")
    return LayerDecision(bits=config.weight_bits, reason="configured")


OP_KINDS = ("conv", "dense", "depthwise")


def check_override_names(layers: list[tuple[str, str]], config: QuantConfig) -> None:
    """Every ``--layer-bits`` key must name a layer or an op kind present in the model, every
    ``--layer-group-size`` key a layer
    (``layers``: ``(name, op_type)`` pairs); an unknown one is an :class:`OptionError` with
    the close matches, never silently ignored (it would be recorded as applied)."""
    import difflib

    names = [name for name, _ in layers]
    keys = [(key, "--layer-bits", set(names) | set(OP_KINDS)) for key, _ in config.overrides]
    keys += [(key, "--layer-group-size", set(names)) for key, _ in config.group_overrides]
    for key, flag, valid in keys:
        if key in valid:
            continue
        close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
        close += [n for n in names if n.startswith(key) and n not in close][:3]
        hint = f"did you mean {', '.join(close[:3])}? " if close else ""
        kinds = flag == "--layer-bits"  # a group size is per layer, bits also per op kind
        raise OptionError(f"{flag} {key}: no layer {'or op type ' if kinds else ''}of that name; {hint}"
                          f"names are the layers' ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})"
                          f"{' or ' + ', '.join(OP_KINDS) if kinds else ''} (see quantize-report)")
