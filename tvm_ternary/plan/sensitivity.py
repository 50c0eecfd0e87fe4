"""Per-layer sensitivity policy: as many MACs ternary as a ``max_drop`` budget allows.

Budget: top-1 points lost on held-out calibration images (``holdout``, a seeded quarter by
default: never used to fit a layer or an activation scale), measured as the drop in top-1
*agreement with the float model* relative to the same network with every eligible layer at
8-bit weights (the policy's most precise choice, same activations). Agreement needs no labels;
the budget is what the low-bit weights cost on top of the 8-bit/activation floor, which is
reported beside it (``baseline_agreement``). The calibration images are scored together with
their horizontal mirror images: twice the samples, so one image is half as many points (with
64 images one disagreement would otherwise already be 1.6 points).

Cost on 2 cores is a few make_plan passes, not one per layer:

1. one data-aware pass with every eligible layer at 8-bit, fitting each layer's ternary and
   4-bit alternatives on the same inputs (``make_plan(alternatives=(2, 4))``);
2. sensitivity of layer i: the KL divergence from the float outputs, on ``probe`` images, of
   the 8-bit network with only layer i swapped for its ternary fit (simulate only);
3. layers sorted by sensitivity per MAC; the largest ternary prefix that meets the budget is
   found by bisection on swapped networks (simulate only), then the rest likewise for 4-bit
   (ordered by their 4-bit fit's relative output error per MAC: 4-bit is far less harmful,
   and one simulation per layer less keeps the policy to minutes);
4. the chosen assignment is re-planned sequentially (each layer fitted behind the quantized
   ones, as the compiler's plan is) and verified; on a miss the ternary prefix shrinks.

Example::

    >>> result = choose_precision(model, calib, config=QuantConfig(group_size=4),
    ...                           max_drops=(1.0, 3.0))  # doctest: +SKIP
    >>> cfg = result.choices[0].config  # QuantConfig with per-layer overrides  # doctest: +SKIP
    >>> print(result.table())  # doctest: +SKIP
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import onnx

from ..evaluate import class_scores, compare
from ..numpy_graph import NumpyGraph
from ..progress import progress as progress_bar
from .build import QuantPlan, calibration_stats, make_plan, simulate
from .config import LayerDecision, QuantConfig
from .summary import plan_summary

BATCH = 16
HOLDOUT = 0.25  # share of the calibration images the budget is checked on (not fitted on)
MAX_RETRIES = 3  # verification misses before giving up on a budget (shrinking each time)


@dataclass(frozen=True)
class LayerSensitivity:
    name: str
    macs: int
    kl_ternary: float  # KL increase over the 8-bit network with only this layer ternary
    error_int4: float  # relative output error of the layer's 4-bit fit
    agreement_ternary: float  # on the probe images


@dataclass(frozen=True)
class PolicyChoice:
    max_drop: float  # points
    config: QuantConfig  # with per-layer overrides
    estimated_drop: float  # points, swapped single-layer fits
    verified_drop: float  # points, the sequential plan
    agreement: float
    summary: dict  # plan_summary of the verified plan
    plan: QuantPlan


@dataclass(frozen=True)
class SensitivityResult:
    baseline_agreement: float  # all eligible layers 8-bit
    layers: tuple[LayerSensitivity, ...]  # in the greedy (ternary) order
    choices: tuple[PolicyChoice, ...]
    passes: int  # full make_plan passes
    seconds: float

    def table(self) -> str:
        """The chosen plan per budget as a text table."""
        budgets = [c.max_drop for c in self.choices]
        fmt = {c.max_drop: c.summary["layer_formats"] for c in self.choices}
        head = ["layer", "MMACs", "KL tern", "err int4"] + [f"<= {b:g} pt" for b in budgets]
        rows = [[s.name, f"{s.macs / 1e6:.1f}", f"{s.kl_ternary:.4f}", f"{s.error_int4:.4f}"]
                + [fmt[b][s.name] for b in budgets] for s in self.layers]
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        line = lambda r: "  ".join(c.ljust(w) if i in (0,) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
        out.append(f"8-bit baseline agreement with float: {self.baseline_agreement:.1%}")
        for c in self.choices:
            out.append(f"budget {c.max_drop:g} pt: {c.summary['ternary_mac_share']:.1%} of MACs ternary, "
                       f"{c.summary['int4_mac_share']:.1%} int4; drop estimated {c.estimated_drop:.2f} pt, "
                       f"verified {c.verified_drop:.2f} pt (agreement {c.agreement:.1%})")
        out.append(f"{self.passes} make_plan passes, {self.seconds:.0f} s")
        return "\n".join(out)


def split_holdout(images: np.ndarray, holdout: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fitting images, held-out check images): a seeded ``holdout`` fraction is held out
    (at least one image each side; with ``holdout`` 0 both are all the images)."""
    if holdout <= 0 or len(images) < 2:
        return images, images
    n_check = min(len(images) - 1, max(1, int(round(len(images) * holdout))))
    perm = np.random.default_rng(seed + 1).permutation(len(images))
    return images[np.sort(perm[n_check:])], images[np.sort(perm[:n_check])]


def _scores(fn, x) -> np.ndarray:
    return np.concatenate([class_scores(fn(x[i : i + BATCH])) for i in range(0, len(x), BATCH)])


def _swapped(base: QuantPlan, assignment: dict[str, int]) -> QuantPlan:
    layers, decisions = dict(base.layers), dict(base.decisions)
    for name, bits in assignment.items():
        if bits != base.decisions[name].bits:
            layers[name] = base.alternatives[name][bits]
            decisions[name] = LayerDecision(bits=bits, reason="sensitivity")
    return replace(base, layers=layers, decisions=decisions)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _largest_prefix(order: list[str], ok) -> int:
    """Largest k with ok(k) (ok(0) assumed true, ok monotone non-increasing in k)."""
    lo, hi = 0, len(order)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def choose_precision(model: onnx.ModelProto, images: np.ndarray, *, config: QuantConfig,
                     max_drops: tuple[float, ...] = (1.0,), probe: int = 24, stats=None,
                     progress: bool = True, seed: int = 0, holdout: float = HOLDOUT) -> SensitivityResult:
    """Pick ternary / 4-bit / 8-bit per eligible layer for each budget in ``max_drops`` (points).

    ``config`` gives everything else (group size, grouping, method, activations); its
    ``weight_bits`` is ignored. Layers the policy keeps precise (first, last, depthwise,
    overrides) are left as they are. ``holdout``: the fraction of ``images`` (a seeded sample)
    the budget is checked on; the rest calibrate and fit (``stats``, if given, must come from
    those: ``calibration_stats(model, split_holdout(images, holdout, seed)[0])``). 0 checks on
    the fitting images themselves. See the module docstring.
    """
    start = time.perf_counter()
    images, check = split_holdout(images, holdout, seed)
    if stats is None:
        stats = calibration_stats(model, images, progress=progress, seed=seed)
    scored = np.concatenate([check, check[..., ::-1]])  # + mirror images (see the docstring)
    float_scores = _scores(NumpyGraph(model).run, scored)
    probe_x, probe_f = scored[:probe], float_scores[:probe]

    def measure(plan: QuantPlan, on_probe: bool = False) -> dict:
        x, f = (probe_x, probe_f) if on_probe else (scored, float_scores)
        return compare(f, _scores(lambda b: simulate(plan, b), x), labels=None)

    _log(progress, "sensitivity: 8-bit pass with ternary and 4-bit alternatives")
    base = make_plan(model, images, config=replace(config, weight_bits=8, distill_epochs=0), stats=stats,
                     alternatives=(2, 4), progress=progress, seed=seed)
    passes = 1
    eligible = [l for l in base.analysis.layers if l.name in base.alternatives]
    macs = {l.name: int(l.weight.macs or l.weight.weight.size) for l in eligible}
    base_full = measure(base)
    base_probe = measure(base, on_probe=True)

    sens = {}
    bar = progress_bar(len(eligible), desc="sensitivity", unit="layers", enabled=progress)
    for i, layer in enumerate(eligible, 1):
        t = measure(_swapped(base, {layer.name: 2}), on_probe=True)
        int4 = base.alternatives[layer.name][4]
        sens[layer.name] = LayerSensitivity(
            name=layer.name, macs=macs[layer.name],
            kl_ternary=max(t["kl_divergence"] - base_probe["kl_divergence"], 0.0),
            error_int4=int4.output_error if int4.output_error is not None else int4.weight_error,
            agreement_ternary=t["agreement_top1"])
        bar.update(1)
    bar.close()
    # Greedy on sensitivity per MAC: a big layer that hurts a little is worth more ternary MACs
    # than a small one that hurts nothing. The tiny constant orders zero-sensitivity layers by size.
    order = sorted(sens, key=lambda n: (sens[n].kl_ternary + 1e-9) / macs[n])

    cache: dict[tuple, float] = {}

    def drop_of(assignment: dict[str, int]) -> float:
        key = tuple(sorted(assignment.items()))
        if key not in cache:
            cache[key] = 100.0 * (base_full["agreement_top1"] - measure(_swapped(base, assignment))["agreement_top1"])
        return cache[key]

    choices = []
    for budget in max_drops:
        limit = len(order)
        for attempt in range(MAX_RETRIES + 1):
            k = _largest_prefix(order[:limit], lambda k: drop_of({n: 2 for n in order[:k]}) <= budget)
            rest = sorted(order[k:], key=lambda n: (sens[n].error_int4 + 1e-9) / macs[n])
            ternary = {n: 2 for n in order[:k]}
            m = _largest_prefix(rest, lambda m: drop_of({**ternary, **{n: 4 for n in rest[:m]}}) <= budget)
            assignment = {**ternary, **{n: 4 for n in rest[:m]}, **{n: 8 for n in rest[m:]}}
            estimated = drop_of(assignment)
            overrides = tuple(config.overrides) + tuple((n, b) for n, b in assignment.items())
            cfg = replace(config, weight_bits=2, overrides=overrides)
            plan = make_plan(model, images, config=cfg, stats=stats, progress=False, seed=seed)
            passes += 1
            got = measure(plan)
            verified = 100.0 * (base_full["agreement_top1"] - got["agreement_top1"])
            _log(progress, f"budget {budget:g} pt: {k} ternary + {m} int4 layers, drop estimated "
                           f"{estimated:.2f}, verified {verified:.2f} pt")
            if verified <= budget or k == 0:
                break
            limit = max(0, k - max(1, k // 5))  # shrink the ternary prefix and try again
        choices.append(PolicyChoice(max_drop=budget, config=cfg, estimated_drop=estimated,
                                    verified_drop=verified, agreement=got["agreement_top1"],
                                    summary=plan_summary(plan), plan=plan))
    return SensitivityResult(baseline_agreement=base_full["agreement_top1"],
                             layers=tuple(sens[n] for n in order), choices=tuple(choices),
                             passes=passes, seconds=time.perf_counter() - start)
