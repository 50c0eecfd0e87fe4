"""Reconstruction of a layer's output by coordinate descent over its integer codes.

The data-aware fit (:mod:`.data_aware`) chooses every code once, greedily, and then only
rescales. Starting from its solution this module optimises the codes themselves on the layer's
quadratic output objective, using the second moments the fit already accumulated:

    E|| y - x W_hat^T - b ||^2  =  tr(W_hat H W_hat^T) - 2 tr(W_hat C) + const      (centred)

with ``W_hat[k, j] = a[k, j] * t[k, j]`` (``a`` the scale of the weight's group). For one weight
the objective is a 1-D convex quadratic in its integer code, so the best code given all others
is the rounded, clipped continuous optimum; one sweep visits every column for all output
channels at once and keeps the gradient ``G = W_hat H - C^T`` current with a rank-1 update
(O(K D^2) a sweep, numpy only). Ternary groups of up to ``MAX_SEARCH_WIDTH`` weights (FGQ
N <= 8) are searched whole instead (:func:`descend_groups`: every pattern of the group with its
best scale, 40 at N=4), which escapes the single-weight optimum where two codes only pay
together. Sweeps alternate with a least-squares refit of the group scales.
Then the scales become integers (``s_k * q_g``, what the kernels execute) and the codes are
descended once more on that exact grid (ternary groups: pattern and integer group code
together), ``s_k`` refitted, and the bias corrected against the
float output. So the objective is minimised for the weights the compiled library really uses.

``H`` and ``C`` are damped towards the float weight (``H + l I``, ``C + l W``): directions the
calibration patches never excite keep the float weight's behaviour instead of drifting.

Example::

    >>> import numpy as np
    >>> from tvm_ternary.quant.data_aware import LayerStatistics, fit_layer
    >>> rng = np.random.default_rng(0)
    >>> w = rng.normal(size=(8, 16)).astype(np.float32)
    >>> x = rng.normal(size=(512, 16)) @ rng.normal(size=(16, 16))
    >>> stats = LayerStatistics.empty(in_features=16, out_features=8)
    >>> stats.accumulate(x, x @ w.T)
    >>> fit = fit_layer(w, stats=stats, group_size=4)
    >>> rec = reconstruct_layer(fit.weights, stats=stats)
    >>> rec.output_error < fit.output_error
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats import value_max
from .data_aware import (DAMPING, LayerStatistics, _bounds_order_to_layout, _column_order, _group_bounds,
                         _refit_scales)
from .intscales import IntegerWeights, code_max, to_integer_scales
from .ternary import QuantizedWeights

ROUNDS = 3  # (code sweeps | scale refit) alternations on float group scales
SWEEPS = 2  # coordinate-descent sweeps over all codes per round
FINAL_SWEEPS = 2  # sweeps on the integer scale grid
GROUP_SEARCH = True  # ternary: search whole groups (descend_groups), else one weight at a time


@dataclass(frozen=True)
class Reconstruction:
    weights: IntegerWeights
    bias: np.ndarray  # float32 [K]
    output_error: float  # relative, see LayerStatistics.output_error


def descend(codes: np.ndarray, alpha: np.ndarray, h: np.ndarray, c: np.ndarray, *, vmax: int,
            sweeps: int) -> np.ndarray:
    """Coordinate descent on integer ``codes`` [K, D] in [-vmax, vmax] with fixed per-weight
    scales ``alpha`` [K, D], minimising ``w H w^T - 2 w c_k`` per output channel (``w = alpha *
    codes``, ``c`` [D, K]). Returns the new codes; the objective never increases."""
    codes = codes.astype(np.float64).copy()
    grad = (alpha * codes) @ h - c.T  # half the gradient, [K, D]
    diag = np.diag(h)
    for _ in range(sweeps):
        changed = 0
        for j in range(codes.shape[1]):
            a = alpha[:, j]
            curv = a * a * diag[j]
            live = curv > 0
            if not live.any():
                continue
            t = codes[:, j]
            # best integer code for this weight given all others: rounded 1-D optimum
            step = np.where(live, grad[:, j] * a / np.where(live, curv, 1.0), 0.0)
            new = np.clip(np.rint(t - step), -vmax, vmax)
            rows = np.nonzero(new != t)[0]
            if rows.size == 0:
                continue
            delta = a[rows] * (new[rows] - t[rows])
            grad[rows] += np.outer(delta, h[j])
            codes[rows, j] = new[rows]
            changed += rows.size
        if changed == 0:
            break
    return codes


MAX_SEARCH_WIDTH = 8  # ternary groups up to this many weights are searched exhaustively


def ternary_patterns(n: int) -> np.ndarray:
    """Every non-zero ternary vector of length ``n`` up to sign, [(3**n - 1) / 2, n]: the first
    non-zero entry is +1 (the group's scale takes the sign)."""
    grid = np.array(np.meshgrid(*[[-1.0, 0.0, 1.0]] * n, indexing="ij")).reshape(n, -1).T
    first = grid[np.arange(len(grid)), np.argmax(grid != 0, axis=1)]  # 0 for the all-zero row
    return grid[first > 0]


def descend_groups(codes: np.ndarray, scales: np.ndarray, h: np.ndarray, c: np.ndarray, bounds, *,
                   sweeps: int, grid: tuple[np.ndarray, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Block coordinate descent over whole ternary groups: for each group (contiguous columns
    ``bounds``), every output channel at once, the best (pattern, scale) given all other
    weights, searched over every ternary pattern of the group (40 at N=4). For one pattern
    ``t`` the objective ``v H_gg v - 2 v b`` of ``v = a t`` is a 1-D quadratic in ``a`` whose
    minimum ``-(t.b)^2 / (t H_gg t)`` ranks the patterns, so the search is exact where the
    single-weight descent (:func:`descend`) stops at a pattern whose codes only pay together.

    ``codes`` [K, D] in {-1, 0, 1}, ``scales`` [K, G] >= 0 float group scales; ``grid``:
    ``(s, qmax)`` to search on the integer grid ``a = s_k * q`` with ``q`` in ``[0, qmax]``
    instead (the scale rounded to its best integer code, exact for a 1-D quadratic). Returns the
    new codes and scales (integer codes ``q`` as float when ``grid`` is given); the objective
    never increases.
    """
    codes = codes.astype(np.float64).copy()
    scales = scales.astype(np.float64).copy()
    sizes = np.array([hi - lo for lo, hi in bounds])
    unit = np.repeat(scales if grid is None else scales * grid[0][:, None], sizes, axis=1)
    grad = (unit * codes) @ h - c.T
    patterns = {n: ternary_patterns(n) for n in set(sizes.tolist())}
    for _ in range(sweeps):
        changed = 0
        for g, (lo, hi) in enumerate(bounds):
            t_all = patterns[hi - lo]
            hgg = h[lo:hi, lo:hi]
            old = unit[:, lo:hi] * codes[:, lo:hi]  # [K, n]
            b = old @ hgg - grad[:, lo:hi]  # c_g - H_g,rest w_rest, [K, n]
            den = np.einsum("pi,ij,pj->p", t_all, hgg, t_all)
            live = den > 0
            if not live.any():
                continue
            t_live, den = t_all[live], den[live]
            num = b @ t_live.T  # [K, P]
            if grid is None:
                gain = num * num / den  # objective decrease vs the all-zero group
                a = chosen = np.abs(num) / den
            else:
                s, qmax = grid
                safe = np.where(s > 0, s, 1.0)[:, None]
                chosen = np.clip(np.rint(np.abs(num) / (den * safe)), 0, qmax)  # integer codes q
                a = chosen * s[:, None]
                gain = 2 * a * np.abs(num) - a * a * den
            best = np.argmax(gain, axis=1)
            rows = np.arange(len(b))
            take = gain[rows, best] > 0
            sign = np.sign(num[rows, best])
            t_new = np.where(take[:, None], t_live[best] * sign[:, None], 0.0)
            a_new = np.where(take, a[rows, best], 0.0)
            scale_new = np.where(take, chosen[rows, best], 0.0)
            new = a_new[:, None] * t_new
            # keep a channel's group unless the search found a strictly better one
            cur = np.einsum("ki,ij,kj->k", old, hgg, old) - 2 * np.einsum("ki,ki->k", old, b)
            cand = np.einsum("ki,ij,kj->k", new, hgg, new) - 2 * np.einsum("ki,ki->k", new, b)
            better = cand < cur - 1e-12 * np.maximum(np.abs(cur), 1e-300)
            if not better.any():
                continue
            rows = np.nonzero(better)[0]
            grad[rows] += (new[rows] - old[rows]) @ h[lo:hi]
            codes[rows, lo:hi] = t_new[rows]
            scales[rows, g] = scale_new[rows]
            unit[rows, lo:hi] = a_new[rows, None]
            changed += rows.size
        if changed == 0:
            break
    return codes, scales


def _damped(stats: LayerStatistics, w2: np.ndarray):
    h, c, mu_x, mu_y = stats.centered()
    lam = DAMPING * max(float(np.mean(np.diag(h))), 1e-12)
    return h + lam * np.eye(len(h)), c + lam * w2.T, mu_x, mu_y


def reconstruct_layer(start: QuantizedWeights, *, stats: LayerStatistics, code_bits: int = 7,
                      weight: np.ndarray | None = None) -> Reconstruction:
    """Improve ``start`` (a data-aware fit's codes and float group scales) on ``stats``; return
    integer weights (``s_k * q_g * t``), the corrected float bias and the output error.

    ``weight``: the float weight the damping pulls towards (default: ``start`` itself, i.e. the
    data-aware solution, when the float weight is not at hand).
    """
    layout = start.layout
    k = layout.out_channels
    vmax = value_max(start.bits)
    w_ref = (start.dequantize() if weight is None else np.asarray(weight)).reshape(k, -1).astype(np.float64)
    h, c, mu_x, mu_y = _damped(stats, w_ref)

    # contiguous groups (the order data_aware fits in) so scales broadcast by np.repeat
    order = _column_order(layout)
    bounds = _group_bounds(layout)
    sizes = np.array([hi - lo for lo, hi in bounds])
    hp, cp = h[np.ix_(order, order)], c[order]
    codes = start.codes.reshape(k, -1)[:, order].astype(np.float64)
    scales = _scales_in_bounds_order(start)
    search = GROUP_SEARCH and start.bits == 2 and int(sizes.max()) <= MAX_SEARCH_WIDTH
    for _ in range(ROUNDS):
        if search:
            codes, scales = descend_groups(codes, scales, hp, cp, bounds, sweeps=SWEEPS)
        else:
            codes = descend(codes, np.repeat(scales, sizes, axis=1), hp, cp, vmax=vmax, sweeps=SWEEPS)
        codes, scales = _refit_scales(codes, hp, cp, bounds)

    # onto the integer grid the kernels execute, then descend on that grid
    qw = _from_bounds_order(start, codes, scales, order)
    iw = to_integer_scales(qw, code_bits=code_bits)
    q = _scales_in_bounds_order_int(iw)  # [K, G] integer codes as float
    s = iw.channel_scales.astype(np.float64)
    if search:  # patterns and group codes q_g together, on the integer grid
        codes, q = descend_groups(codes, q, hp, cp, bounds, sweeps=FINAL_SWEEPS,
                                  grid=(s, code_max(bits=start.bits, code_bits=code_bits)))
        group_codes = _bounds_order_to_layout(layout, q).astype(np.uint8)
    else:
        alpha = np.repeat(q * s[:, None], sizes, axis=1)
        codes = descend(codes, alpha, hp, cp, vmax=vmax, sweeps=FINAL_SWEEPS)
        group_codes = iw.group_codes
    # s_k by least squares for the final integer weights u = q_g * t (one scalar per channel)
    u = np.repeat(q, sizes, axis=1) * codes
    num = np.einsum("kd,dk->k", u, cp)
    den = np.einsum("kd,de,ke->k", u, hp, u)
    s = np.where(den > 0, num / np.maximum(den, 1e-300), s)
    flip = s < 0  # a channel whose best scale is negative: flip its codes instead
    codes[flip] *= -1
    s = np.abs(s)

    values = np.empty_like(codes)
    values[:, order] = codes
    iw = IntegerWeights(values=values.reshape(start.codes.shape).astype(np.int8), group_codes=group_codes,
                        channel_scales=s.astype(np.float32), layout=layout, bits=start.bits,
                        code_bits=code_bits, lossless=False)
    w_hat = iw.dequantize().reshape(k, -1).astype(np.float64)
    bias = mu_y - w_hat @ mu_x
    return Reconstruction(weights=iw, bias=bias.astype(np.float32), output_error=stats.output_error(w_hat, bias))


def _scales_in_bounds_order(qw: QuantizedWeights) -> np.ndarray:
    """Group scales [K, G_total] in the order of ``_group_bounds`` ((position, group) for fgq)."""
    return _to_bounds_order(qw.layout, qw.scales.astype(np.float64))


def _scales_in_bounds_order_int(iw: IntegerWeights) -> np.ndarray:
    return _to_bounds_order(iw.layout, iw.group_codes.astype(np.float64))


def _to_bounds_order(layout, arr: np.ndarray) -> np.ndarray:
    k = layout.out_channels
    if layout.grouping == "fgq" and len(layout.scale_shape) == 4:
        return arr.reshape(layout.scale_shape).transpose(0, 2, 3, 1).reshape(k, -1)
    return arr.reshape(k, -1)


def _from_bounds_order(start: QuantizedWeights, codes: np.ndarray, scales: np.ndarray, order) -> QuantizedWeights:
    layout = start.layout
    cmajor = np.empty_like(codes)
    cmajor[:, order] = codes
    return QuantizedWeights(codes=cmajor.reshape(start.codes.shape).astype(np.int8),
                            scales=np.ascontiguousarray(_bounds_order_to_layout(layout, scales), dtype=np.float32),
                            layout=layout,
                            bits=start.bits, method="reconstruct")


__all__ = ["Reconstruction", "descend", "reconstruct_layer"]


def fit_depthwise(weight: np.ndarray, x: np.ndarray, y: np.ndarray, *, bits: int = 8, grouping: str = "fgq"):
    """Refit a depthwise conv (one filter per channel) to its float output, then quantize.

    ``x`` [P, C, R*S]: each channel's input patches (from the quantized prefix); ``y`` [P, C]:
    the float layer's output. Each channel is its own small least-squares problem (R*S weights),
    damped towards the float filter like :func:`reconstruct_layer`, so the depthwise layer
    undoes what the ternary layer before it got wrong. Returns (weights as
    :func:`~tvm_ternary.quant.quantize_weights` gives them, float bias [C], output error).
    """
    from .ternary import quantize_weights

    c = weight.shape[0]
    w = weight.reshape(c, -1).astype(np.float64)
    p, d = len(x), w.shape[1]
    xx, xy = np.zeros((c, d, d)), np.zeros((c, d))
    x_sum, y_sum, yy = np.zeros((c, d)), np.zeros(c), np.zeros(c)
    for lo in range(0, p, 1024):  # raw moments in float64, a chunk of rows at a time
        xb = np.asarray(x[lo : lo + 1024], np.float64)
        yb = np.asarray(y[lo : lo + 1024], np.float64)
        xx += np.einsum("pcd,pce->cde", xb, xb)
        xy += np.einsum("pcd,pc->cd", xb, yb)
        x_sum += xb.sum(axis=0)
        y_sum += yb.sum(axis=0)
        yy += (yb * yb).sum(axis=0)
    mu_x, mu_y = x_sum / p, y_sum / p
    h = xx / p - np.einsum("cd,ce->cde", mu_x, mu_x)
    cxy = xy / p - mu_x * mu_y[:, None]
    lam = DAMPING * np.maximum(np.einsum("cdd->c", h) / d, 1e-12)
    w_fit = np.linalg.solve(h + lam[:, None, None] * np.eye(d), (cxy + lam[:, None] * w)[..., None])[..., 0]
    qw = quantize_weights(w_fit.reshape(weight.shape).astype(np.float32), bits=bits, group_size=1,
                          grouping=grouping)
    w_hat = qw.dequantize().reshape(c, -1).astype(np.float64)
    bias = mu_y - np.einsum("cd,cd->c", w_hat, mu_x)
    # centred residual E||(y - mu_y) - (x - mu_x) w||^2 from the moments, relative to E||y||^2
    var_y = yy / p - mu_y**2
    err = var_y - 2 * np.einsum("cd,cd->c", w_hat, cxy) + np.einsum("cd,cde,ce->c", w_hat, h, w_hat)
    return qw, bias.astype(np.float32), float(max(err.sum(), 0.0) * p / max(yy.sum(), 1e-30))
