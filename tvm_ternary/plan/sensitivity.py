"""Per-layer sensitivity policy: as many MACs ternary as a ``max_drop`` budget allows.

Budget: top-1 points lost on a *check set* of images never used to fit a layer or an activation
scale (:class:`CheckSet`: the calibration folder's images calibration did not take, or a seeded
quarter held out of the calibration images). With labels (the folder has a ``labels.txt``) the
budget is what it says: top-1 *accuracy* lost against the float model. Without labels it is the
drop in top-1 *agreement with the float model* relative to the same network with every eligible
layer at 8-bit weights (the policy's most precise choice), which is stricter: a changed
prediction on an image the float model already got wrong costs nothing in accuracy but a point
of agreement (SqueezeNet with its 3x3 expands ternary: 85% agreement, 1 point of accuracy lost on
400 held-out calib1000 images). The check images are scored together with their horizontal
mirror images: twice the samples, so one image is half as many points.

Cost on 2 cores is a few make_plan passes, not one per layer:

1. one data-aware pass with every eligible layer at 8-bit, fitting each layer's alternatives on
   the same inputs (``make_plan(alternatives=(2, 4, (2, 2)))``: ternary at the configured N,
   4-bit, and ternary at N = 2);
2. sensitivity of layer i: the KL divergence from the float outputs, on ``probe`` images, of
   the 8-bit network with only layer i swapped for its ternary fit (simulate only);
3. layers sorted by sensitivity per MAC; the largest ternary prefix that meets the budget is
   found by bisection on swapped networks (simulate only); then, of the rest, likewise the
   largest prefix at ternary N = 2 (a finer group: half the multiplications removed instead of
   3/4, far less error), then at 4 bits (each ordered by its fit's relative output error per
   MAC: one simulation per layer less keeps the policy to minutes);
4. the chosen assignment is re-planned sequentially (each layer fitted behind the quantized
   ones, as the compiler's plan is) and verified; on a miss the share of every stage's layers
   kept (each stage's best-ranked first) is bisected on verified plans, MAX_RETRIES more
   passes, and the largest share that verified within the budget is the choice (none: every
   eligible layer stays 8-bit).

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

from ..evaluate import class_scores, compare, default_label_offset
from ..numpy_graph import NumpyGraph
from ..progress import progress as progress_bar
from ..quant import FORMAT_NAMES as QUANT_FORMAT_NAMES
from .build import QuantPlan, calibration_stats, make_plan, simulate
from .config import LayerDecision, QuantConfig
from .summary import plan_summary

BATCH = 16
FINE_GROUP = 2  # the ternary group size a layer too sensitive at the configured N gets next
FORMAT_NAMES = {**{b: n for b, n in QUANT_FORMAT_NAMES.items() if b}, (2, FINE_GROUP): f"ternary N={FINE_GROUP}"}
CHECK_IMAGES = 256  # check-set size when the calibration folder has images calibration did not take
HOLDOUT = 0.25  # share of the calibration images the budget is checked on (not fitted on)
MAX_RETRIES = 3  # verified plans after a miss (bisecting the share of the picked layers kept)


@dataclass(frozen=True)
class CheckSet:
    """Images the budget is checked on (never fitted on) and their labels (None: the budget is
    agreement with the float model); ``source`` says where they came from (for the report)."""
    images: np.ndarray
    labels: np.ndarray | None = None
    source: str = "held out of the calibration images"

    def __post_init__(self):
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.labels)} labels for {len(self.images)} check images")


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
    accuracy: float | None = None  # top-1 on the labelled check set


@dataclass(frozen=True)
class SensitivityResult:
    baseline_agreement: float  # all eligible layers 8-bit
    layers: tuple[LayerSensitivity, ...]  # in the greedy (ternary) order
    choices: tuple[PolicyChoice, ...]
    passes: int  # full make_plan passes
    seconds: float
    criterion: str = "agreement"  # "accuracy" (labelled check set) or "agreement"
    check_source: str = ""
    float_accuracy: float | None = None  # on the check set, when labelled

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
        what = ("top-1 accuracy lost against float" if self.criterion == "accuracy"
                else "top-1 agreement with float lost against the all-8-bit network")
        out.append(f"budget = {what}, checked on {self.check_source} (+ mirror images)")
        if self.float_accuracy is not None:
            out.append(f"float top-1 there: {self.float_accuracy:.1%}")
        out.append(f"8-bit baseline agreement with float: {self.baseline_agreement:.1%}")
        for c in self.choices:
            out.append(f"budget {c.max_drop:g} pt: {c.summary['ternary_mac_share']:.1%} of MACs ternary, "
                       f"{c.summary['int4_mac_share']:.1%} int4; drop estimated {c.estimated_drop:.2f} pt, "
                       f"verified {c.verified_drop:.2f} pt (agreement {c.agreement:.1%}"
                       + (f", top-1 {c.accuracy:.1%})" if c.accuracy is not None else ")"))
        out.append(f"{self.passes} make_plan passes, {self.seconds:.0f} s")
        return "\n".join(out)


def split_holdout(images: np.ndarray, holdout: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fitting images, held-out check images): a seeded ``holdout`` fraction is held out
    (at least one image each side; with ``holdout`` 0 both are all the images)."""
    fit, check = holdout_indices(len(images), holdout, seed)
    if fit is None:
        return images, images
    return images[fit], images[check]


def holdout_indices(n: int, holdout: float, seed: int = 0):
    """(fitting indices, check indices) of :func:`split_holdout`; (None, None): no split."""
    if holdout <= 0 or n < 2:
        return None, None
    n_check = min(n - 1, max(1, int(round(n * holdout))))
    perm = np.random.default_rng(seed + 1).permutation(n)
    return np.sort(perm[n_check:]), np.sort(perm[:n_check])


def _scores(fn, x) -> np.ndarray:
    return np.concatenate([class_scores(fn(x[i : i + BATCH])) for i in range(0, len(x), BATCH)])


def _bits(choice) -> int:
    """Weight bits of a policy choice: ``bits`` or ``(bits, N)``."""
    return choice[0] if isinstance(choice, tuple) else choice


def _swapped(base: QuantPlan, assignment: dict) -> QuantPlan:
    layers, decisions = dict(base.layers), dict(base.decisions)
    for name, choice in assignment.items():
        if choice != base.decisions[name].bits:
            layers[name] = base.alternatives[name][choice]
            decisions[name] = LayerDecision(bits=_bits(choice), reason="sensitivity")
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


def largest_verified_share(scaled, verify, *, budget: float, retries: int = MAX_RETRIES):
    """The result of the largest share f of the picked layers that verifies within ``budget``.

    ``scaled(f)`` is the assignment keeping the first ``f`` of every stage's picked layers (the
    rest 8-bit); ``verify(assignment)`` returns ``(result, points lost)``. f = 1 is tried first;
    on a miss f is bisected for ``retries`` more verifications (stopping early once the layer
    counts stop changing). With no share within the budget, f = 0 (every layer 8-bit, the
    policy's most precise choice) is the result, over the budget or not.

    Example (each non-8-bit layer costs 0.3 points, 8 layers picked)::

        >>> scaled = lambda f: {f"l{i}": 2 if i < int(f * 8) else 8 for i in range(8)}
        >>> verify = lambda a: (sum(v != 8 for v in a.values()), 0.3 * sum(v != 8 for v in a.values()))
        >>> largest_verified_share(scaled, verify, budget=1.0, retries=3)  # f = 1, 1/2, 1/4, 3/8
        3
    """
    lo, hi, f, best, seen = 0.0, 1.0, 1.0, None, []
    for _ in range(retries + 1):
        assignment = scaled(f)
        if assignment in seen:
            break  # the bisection no longer changes the layer counts
        seen.append(assignment)
        result, lost = verify(assignment)
        precise = all(v == 8 for v in assignment.values())
        if lost <= budget or precise:  # all 8-bit is the choice even over the budget
            best, lo = result, f
            if f == 1.0 or precise:
                break
        else:
            hi = f
        f = (lo + hi) / 2
    if best is None:
        best, _ = verify(scaled(0.0))
    return best


def choose_precision(model: onnx.ModelProto, images: np.ndarray, *, config: QuantConfig,
                     max_drops: tuple[float, ...] = (1.0,), check: CheckSet | None = None,
                     labels=None, probe: int = 24, stats=None, progress: bool = True, seed: int = 0,
                     holdout: float = HOLDOUT) -> SensitivityResult:
    """Pick ternary / 4-bit / 8-bit per eligible layer for each budget in ``max_drops`` (points).

    ``config`` gives everything else (group size, grouping, method, activations); its
    ``weight_bits`` is ignored. Layers the policy keeps precise (first, last, depthwise,
    overrides) are left as they are. ``check``: the images the budget is checked on; without
    it a seeded ``holdout`` fraction of ``images`` is held out (with ``labels``, the labels of
    ``images``, it is labelled) and the rest calibrate and fit (``stats``, if given, must come
    from those: ``calibration_stats(model, split_holdout(images, holdout, seed)[0])``; 0 checks
    on the fitting images themselves). See the module docstring.
    """
    start = time.perf_counter()
    if check is None:
        fit_idx, check_idx = holdout_indices(len(images), holdout, seed)
        lab = None if labels is None else np.asarray(labels)
        if fit_idx is not None:
            check = CheckSet(images=images[check_idx], labels=None if lab is None else lab[check_idx],
                             source=f"{len(check_idx)} of {len(images)} calibration images held out")
            images = images[fit_idx]
        else:
            check = CheckSet(images=images, labels=lab, source=f"the {len(images)} calibration images")
    elif labels is not None:
        raise ValueError("labels are those of a held-out split: give them inside check= instead")
    if stats is None:
        stats = calibration_stats(model, images, progress=progress, seed=seed)
    scored = np.concatenate([check.images, check.images[..., ::-1]])  # + mirror images (docstring)
    scored_labels = None if check.labels is None else np.concatenate([check.labels, check.labels])
    float_scores = _scores(NumpyGraph(model).run, scored)
    offset = default_label_offset(float_scores.shape[1])
    probe_x, probe_f = scored[:probe], float_scores[:probe]

    def measure(plan: QuantPlan, on_probe: bool = False) -> dict:
        x, f = (probe_x, probe_f) if on_probe else (scored, float_scores)
        return compare(f, _scores(lambda b: simulate(plan, b), x),
                       labels=None if on_probe else scored_labels, label_offset=offset)

    fine = (2, FINE_GROUP)  # ternary at the finer group size, before giving a layer 4 bits
    alternatives = (2, 4) + ((fine,) if config.group_size > FINE_GROUP else ())
    _log(progress, f"sensitivity: 8-bit pass with the alternatives {alternatives} (bits or (bits, N)); "
                   f"budget checked on {check.source}")
    base = make_plan(model, images, config=replace(config, weight_bits=8, distill_epochs=0), stats=stats,
                     alternatives=alternatives, progress=progress, seed=seed)
    passes = 1
    eligible = [l for l in base.analysis.layers if l.name in base.alternatives]
    macs = {l.name: int(l.weight.macs or l.weight.weight.size) for l in eligible}
    base_full = measure(base)
    base_probe = measure(base, on_probe=True)
    by_accuracy = scored_labels is not None

    def points_lost(m: dict) -> float:
        if by_accuracy:
            return 100.0 * (m["float"]["top1"] - m["quantized"]["top1"])
        return 100.0 * (base_full["agreement_top1"] - m["agreement_top1"])

    def fit_error(name: str, choice) -> float:
        lp = base.alternatives[name][choice]
        return lp.output_error if lp.output_error is not None else lp.weight_error

    sens = {}
    bar = progress_bar(len(eligible), desc="sensitivity", unit="layers", enabled=progress)
    for i, layer in enumerate(eligible, 1):
        t = measure(_swapped(base, {layer.name: 2}), on_probe=True)
        sens[layer.name] = LayerSensitivity(
            name=layer.name, macs=macs[layer.name],
            kl_ternary=max(t["kl_divergence"] - base_probe["kl_divergence"], 0.0),
            error_int4=fit_error(layer.name, 4), agreement_ternary=t["agreement_top1"])
        bar.update(1)
    bar.close()
    # Greedy on sensitivity per MAC: a big layer that hurts a little is worth more ternary MACs
    # than a small one that hurts nothing. The tiny constant orders zero-sensitivity layers by size.
    order = sorted(sens, key=lambda n: (sens[n].kl_ternary + 1e-9) / macs[n])

    cache: dict[tuple, float] = {}

    def drop_of(assignment: dict) -> float:
        key = tuple(sorted(assignment.items(), key=str))
        if key not in cache:
            cache[key] = points_lost(measure(_swapped(base, assignment)))
            counts = {c: sum(1 for v in assignment.values() if v == c) for c in set(assignment.values())}
            _log(progress, f"  checked {', '.join(f'{n} {FORMAT_NAMES[c]}' for c, n in sorted(counts.items(), key=str))}"
                           f": {cache[key]:.2f} pt lost")
        return cache[key]

    def ladder(rest: list[str], choice, fixed: dict, budget: float) -> tuple[dict, list[str], list[str]]:
        """The largest prefix of ``rest``, ordered by the fit error of ``choice`` per MAC, at
        ``choice`` on top of ``fixed`` within the budget: (assignment, what is left, the prefix)."""
        can = [n for n in rest if choice in base.alternatives[n]]
        can = sorted(can, key=lambda n: (fit_error(n, choice) + 1e-9) / macs[n])
        k = _largest_prefix(can, lambda k: drop_of({**fixed, **{n: choice for n in can[:k]}}) <= budget)
        return {**fixed, **{n: choice for n in can[:k]}}, [n for n in rest if n not in can[:k]], can[:k]

    def verify(assignment: dict):
        overrides = tuple(config.overrides) + tuple((n, _bits(c)) for n, c in assignment.items())
        groups = tuple(config.group_overrides) + tuple((n, c[1]) for n, c in assignment.items()
                                                       if isinstance(c, tuple))
        cfg = replace(config, weight_bits=2, overrides=overrides, group_overrides=groups)
        plan = make_plan(model, images, config=cfg, stats=stats, progress=False, seed=seed)
        got = measure(plan)
        return cfg, plan, got, points_lost(got)

    stages = (2,) + ((fine,) if fine in alternatives else ()) + (4,)
    choices = []
    for budget in max_drops:
        # the estimate: stage by stage, each the largest prefix within the budget (simulate only)
        k = _largest_prefix(order, lambda k: drop_of({n: 2 for n in order[:k]}) <= budget)
        picked, rest = {2: order[:k]}, order[k:]
        assignment = {n: 2 for n in order[:k]}
        for c in stages[1:]:
            assignment, rest, picked[c] = ladder(rest, c, assignment, budget)

        def scaled(f: float) -> dict:
            """The first ``f`` of every stage's picked layers, the rest 8-bit."""
            out = {n: 8 for n in order}
            for c in stages:
                out.update({n: c for n in picked[c][:int(f * len(picked[c]))]})
            return out

        # Verification: the sequential plan (each layer fitted behind the quantized ones) can
        # lose more than the swapped estimate (SqueezeNet: 0.6 -> 2.2 points at the estimate's
        # 1-point mix), so on a miss the share of the picked layers is bisected on verified plans.
        def check_plan(assignment: dict):
            nonlocal passes
            estimated = drop_of(assignment)
            cfg, plan, got, lost = verify(assignment)
            passes += 1
            _log(progress, f"budget {budget:g} pt: " + ", ".join(
                f"{sum(1 for v in assignment.values() if v == c)} {FORMAT_NAMES[c]}" for c in stages)
                + f" layers; drop estimated {estimated:.2f}, verified {lost:.2f} pt"
                + ("" if lost <= budget else " (over budget)"))
            return (cfg, plan, got, estimated, lost), lost

        best = largest_verified_share(scaled, check_plan, budget=budget, retries=MAX_RETRIES)
        cfg, plan, got, estimated, verified = best
        choices.append(PolicyChoice(max_drop=budget, config=cfg, estimated_drop=estimated,
                                    verified_drop=verified, agreement=got["agreement_top1"],
                                    summary=plan_summary(plan), plan=plan,
                                    accuracy=got["quantized"]["top1"] if by_accuracy else None))
    return SensitivityResult(baseline_agreement=base_full["agreement_top1"],
                             layers=tuple(sens[n] for n in order), choices=tuple(choices),
                             passes=passes, seconds=time.perf_counter() - start,
                             criterion="accuracy" if by_accuracy else "agreement",
                             check_source=check.source,
                             float_accuracy=base_full["float"]["top1"] if by_accuracy else None)
