"""Reconstruction (coordinate descent over codes on the integer grid) and calibration sampling."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_quant_data_aware import direct_error, make_layer
from tiny_models import tiny_cnn, tiny_images

from tvm_ternary.plan import QuantConfig, make_plan, simulate
from tvm_ternary.plan.calibrate import TensorStats, collect_stats
from tvm_ternary.numpy_graph import NumpyGraph
from tvm_ternary.preprocess import sample_calibration
from tvm_ternary.quant import to_integer_scales
from tvm_ternary.quant.data_aware import fit_layer
from tvm_ternary.quant.intscales import code_max
from tvm_ternary.quant.reconstruct import descend, descend_groups, reconstruct_layer, ternary_patterns


def objective(codes, alpha, h, c):
    w = alpha * codes
    return float(np.einsum("kd,de,ke->", w, h, w) - 2 * np.einsum("kd,dk->", w, c))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), vmax=st.sampled_from([1, 7, 127]), k=st.integers(1, 6), d=st.integers(1, 12))
def test_descent_never_increases_objective_and_stays_on_the_grid(seed, vmax, k, d):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(3 * d, d))
    h = a.T @ a / len(a)
    c = rng.normal(size=(d, k))
    alpha = np.abs(rng.normal(size=(k, d))) * (rng.random((k, d)) > 0.2)  # some dead scales
    codes = rng.integers(-vmax, vmax + 1, size=(k, d)).astype(np.float64)
    new = descend(codes, alpha, h, c, vmax=vmax, sweeps=3)
    assert np.all(new == np.rint(new)) and np.abs(new).max(initial=0) <= vmax
    assert objective(new, alpha, h, c) <= objective(codes, alpha, h, c) + 1e-9 * (1 + abs(objective(codes, alpha, h, c)))


def test_descent_reaches_a_coordinate_wise_optimum():
    """After convergence no single code change lowers the objective (checked by brute force)."""
    rng = np.random.default_rng(3)
    d, k = 8, 3
    a = rng.normal(size=(40, d))
    h, c = a.T @ a / 40, rng.normal(size=(d, k))
    alpha = np.abs(rng.normal(size=(k, d)))
    codes = descend(np.zeros((k, d)), alpha, h, c, vmax=1, sweeps=50)
    best = objective(codes, alpha, h, c)
    for row in range(k):
        for j in range(d):
            for t in (-1, 0, 1):
                trial = codes.copy()
                trial[row, j] = t
                assert objective(trial, alpha, h, c) >= best - 1e-9


def test_ternary_patterns_are_every_nonzero_pattern_up_to_sign():
    import itertools

    for n in (1, 2, 4):
        pats = ternary_patterns(n)
        assert len(pats) == (3**n - 1) // 2
        both = {tuple(p) for p in pats} | {tuple(-p) for p in pats}
        assert both == {t for t in itertools.product((-1.0, 0.0, 1.0), repeat=n) if any(t)}


def _problem(seed, k, groups, n):
    rng = np.random.default_rng(seed)
    d = groups * n
    a = rng.normal(size=(3 * d, d)) @ rng.normal(size=(d, d))  # correlated inputs
    h, c = a.T @ a / len(a), rng.normal(size=(d, k))
    bounds = [(g * n, (g + 1) * n) for g in range(groups)]
    codes = rng.integers(-1, 2, size=(k, d)).astype(np.float64)
    scales = np.abs(rng.normal(size=(k, groups)))
    return h, c, bounds, codes, scales


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.sampled_from([1, 2, 4]), k=st.integers(1, 5), groups=st.integers(1, 4),
       on_grid=st.booleans())
def test_group_search_never_increases_the_objective(seed, n, k, groups, on_grid):
    h, c, bounds, codes, scales = _problem(seed, k, groups, n)
    sizes = [n] * groups
    if on_grid:
        s = np.abs(np.random.default_rng(seed + 1).normal(size=k)) * 0.05
        q = np.rint(scales / s[:, None]).clip(0, 127)
        before = objective(codes, np.repeat(q * s[:, None], sizes, axis=1), h, c)
        new, q_new = descend_groups(codes, q, h, c, bounds, sweeps=3, grid=(s, 127))
        assert np.all(q_new == np.rint(q_new)) and q_new.min() >= 0 and q_new.max() <= 127
        after = objective(new, np.repeat(q_new * s[:, None], sizes, axis=1), h, c)
    else:
        before = objective(codes, np.repeat(scales, sizes, axis=1), h, c)
        new, sc = descend_groups(codes, scales, h, c, bounds, sweeps=3)
        assert sc.min() >= 0
        after = objective(new, np.repeat(sc, sizes, axis=1), h, c)
    assert set(np.unique(new)) <= {-1.0, 0.0, 1.0}
    assert after <= before + 1e-9 * (1 + abs(before))


def test_group_search_reaches_a_group_wise_optimum():
    """Converged, no group's (pattern, scale) can be replaced by a better one: brute force over
    the 81 patterns of each group with its least-squares scale, the other groups fixed."""
    import itertools

    h, c, bounds, codes, scales = _problem(5, 3, 3, 4)
    new, sc = descend_groups(codes, scales, h, c, bounds, sweeps=50)
    alpha = np.repeat(sc, 4, axis=1)
    best = objective(new, alpha, h, c)
    for row in range(3):
        for g, (lo, hi) in enumerate(bounds):
            for t in itertools.product((-1.0, 0.0, 1.0), repeat=4):
                trial, a = new.copy(), alpha.copy()
                trial[row, lo:hi] = t
                tv = np.array(t)
                den = tv @ h[lo:hi, lo:hi] @ tv
                if den == 0:
                    continue
                # the scale minimising this channel's objective with the rest fixed
                rest = a[row] * trial[row]
                rest[lo:hi] = 0
                b = c[lo:hi, row] - h[lo:hi] @ rest
                a[row, lo:hi] = max(tv @ b / den, 0.0)
                assert objective(trial, a, h, c) >= best - 1e-9 * (1 + abs(best))


def test_group_search_fits_real_layers_better_than_single_weight_descent(monkeypatch):
    import tvm_ternary.quant.reconstruct as reconstruct

    w, x, y, stats = make_layer(21)
    fit = fit_layer(w, stats=stats, group_size=4)
    errs = {}
    for search in (False, True):
        monkeypatch.setattr(reconstruct, "GROUP_SEARCH", search)
        rec = reconstruct_layer(fit.weights, stats=stats, weight=w)
        errs[search] = direct_error(x, y, rec.weights.dequantize().reshape(w.shape[0], -1), rec.bias)
        assert rec.output_error == pytest.approx(errs[search], rel=1e-6)
    assert errs[True] < errs[False]


@pytest.mark.parametrize("grouping", ["fgq", "cluster"])
@pytest.mark.parametrize("n,bits", [(2, 2), (4, 2), (8, 2), (4, 4)])
def test_reconstruct_beats_data_aware_on_the_integer_grid(n, bits, grouping):
    w, x, y, stats = make_layer(10 + n + bits)
    fit = fit_layer(w, stats=stats, group_size=n, grouping=grouping, bits=bits)
    # what data-aware really deploys: its scales made integer, its bias
    da = to_integer_scales(fit.weights).dequantize().reshape(w.shape[0], -1)
    da_err = direct_error(x, y, da, fit.bias)
    rec = reconstruct_layer(fit.weights, stats=stats, weight=w)
    got = rec.weights.dequantize().reshape(w.shape[0], -1)
    rec_err = direct_error(x, y, got, rec.bias)
    assert rec.output_error == pytest.approx(rec_err, rel=1e-6)
    assert rec_err < da_err
    # the integer contract: values in range, group codes within qmax, int8 decode
    iw = rec.weights
    vmax = 1 if bits == 2 else 7
    assert iw.values.dtype == np.int8 and np.abs(iw.values).max() <= vmax
    assert iw.group_codes.dtype == np.uint8 and iw.group_codes.max() <= code_max(bits=bits, code_bits=7)
    assert iw.group_codes.shape == fit.weights.layout.scale_shape
    assert np.abs(iw.decode_int8().astype(int)).max() <= 127


def test_sampling_is_seeded_spread_and_not_a_prefix():
    items = list(range(1000))
    a, b = sample_calibration(items, 64, seed=0), sample_calibration(items, 64, seed=0)
    assert a == b and a == sorted(set(a)) and len(a) == 64
    assert a != list(range(64)) and sample_calibration(items, 64, seed=1) != a
    # spread: every quarter of a class-sorted folder contributes
    assert all(any(q * 250 <= i < (q + 1) * 250 for i in a) for q in range(4))
    assert sample_calibration(items, 5000) == items and sample_calibration(items, None) == items


def test_activation_samples_do_not_grow_with_the_calibration_set(monkeypatch):
    import tvm_ternary.plan.calibrate as calibrate

    monkeypatch.setattr(calibrate, "SAMPLE_SIZE", 1000)  # below one batch of tiny images
    model = tiny_cnn()
    graph = NumpyGraph(model)
    name = graph.input_names[0]
    small = collect_stats(graph, tiny_images(16), tensors={name}, batch=4, progress=False)[name]
    big = collect_stats(graph, tiny_images(64), tensors={name}, batch=4, progress=False)[name]
    count = lambda s: sum(len(v) for v in s.samples)  # noqa: E731
    assert 1000 <= count(big) <= 1000 + 16 and 1000 <= count(small) <= 1000 + 4
    x = tiny_images(64)
    assert big.minimum == float(x.min()) and big.maximum == float(x.max())
    assert isinstance(big, TensorStats)


def test_a_tensors_activation_sample_does_not_depend_on_the_other_tensors(monkeypatch):
    # a shared random stream made each sample depend on the set's iteration order, which
    # changes between Python processes: percentile / MSE scales, and so plans, differed per run
    import tvm_ternary.plan.calibrate as calibrate

    monkeypatch.setattr(calibrate, "SAMPLE_SIZE", 500)
    model = tiny_cnn()
    graph = NumpyGraph(model)
    names = sorted({t for n in graph.nodes for t in n.output})
    images = tiny_images(16)
    every = collect_stats(graph, images, tensors=set(names), batch=4, progress=False)
    for name in names[:3] + names[-2:]:
        alone = collect_stats(graph, images, tensors={name}, batch=4, progress=False)[name]
        assert all(np.array_equal(a, b) for a, b in zip(alone.samples, every[name].samples, strict=True))
        assert alone.quant(bits=8, method="percentile") == every[name].quant(bits=8, method="percentile")


def test_plan_records_which_images_the_fit_used():
    model = tiny_cnn()
    calib = tiny_images(24)
    plan = make_plan(model, calib, config=QuantConfig(group_size=4), fit_images=10, progress=False, seed=3)
    rec = plan.calibration
    assert rec["activation_images"] == 24 and rec["fit_images"] == 10 and rec["method"] == "reconstruct"
    assert len(set(rec["fit_indices"])) == 10 and rec["fit_indices"] != list(range(10))
    again = make_plan(model, calib, config=QuantConfig(group_size=4), fit_images=10, progress=False, seed=3)
    assert again.calibration == rec
    x = tiny_images(4, seed=9)
    assert np.array_equal(simulate(plan, x), simulate(again, x))  # reproducible


def test_reconstruct_plan_fits_layers_no_worse_than_data_aware():
    model = tiny_cnn()
    calib = tiny_images(32)
    errs = {}
    for method in ("data-aware", "reconstruct"):
        plan = make_plan(model, calib, config=QuantConfig(group_size=4, method=method), progress=False)
        # (res_b is left out: under reconstruct its target is the block output, skip error included)
        errs[method] = [plan.layers[n].output_error for n in ("fire_squeeze", "fire_e1", "fire_e3", "res_a", "fc")]
    # output errors on each method's own quantized inputs; reconstruct's include the integer grid,
    # data-aware's do not (it is scored before its scales are made integer)
    assert sum(errs["reconstruct"]) < sum(errs["data-aware"])
    assert plan.layers["dw"].output_error is not None  # the depthwise layer is refitted too


def test_depthwise_refit_undoes_an_input_error():
    """A depthwise layer fed a distorted input (per-channel gain and offset, as a ternary layer
    before it leaves) is refitted to the float output: far lower error than the float filter."""
    from tvm_ternary.quant.reconstruct import fit_depthwise

    rng = np.random.default_rng(0)
    c, p = 12, 4000
    w = rng.normal(size=(c, 1, 3, 3)).astype(np.float32)
    x_float = rng.normal(size=(p, c, 9))
    y = np.einsum("pcd,cd->pc", x_float, w.reshape(c, 9)) + 0.5
    gain, offset = 1 + 0.2 * rng.normal(size=(1, c, 1)), 0.3 * rng.normal(size=(1, c, 1))
    x_seen = x_float * gain + offset
    qw, bias, err = fit_depthwise(w, x_seen, y)
    got = np.einsum("pcd,cd->pc", x_seen, qw.dequantize().reshape(c, 9)) + bias
    plain = np.einsum("pcd,cd->pc", x_seen, w.reshape(c, 9)) + 0.5
    direct = float(((y - got) ** 2).sum() / (y**2).sum())
    assert err == pytest.approx(direct, rel=1e-6, abs=1e-9)
    assert direct < 0.01 * float(((y - plain) ** 2).sum() / (y**2).sum())
    assert qw.bits == 8 and np.abs(qw.codes).max() <= 127


def test_chunked_walk_matches_image_by_image_simulation():
    """More images than one chunk: planning (float16 frontier) runs, and simulating a batch in
    chunks gives exactly what one image at a time gives."""
    import tvm_ternary.plan.build as build

    model = tiny_cnn()
    calib = tiny_images(3 * build.CHUNK_IMAGES + 5)
    plan = make_plan(model, calib, config=QuantConfig(group_size=4), progress=False)
    assert plan.calibration["fit_images"] == len(calib)
    x = tiny_images(build.CHUNK_IMAGES + 3, seed=5)
    whole = simulate(plan, x)
    one_by_one = np.concatenate([simulate(plan, x[i : i + 1]) for i in range(len(x))])
    assert np.array_equal(whole, one_by_one)


@pytest.mark.parametrize("bounds", [[(0, 4), (4, 8), (8, 12)], [(0, 5), (5, 10), (10, 12)]],
                         ids=["equal-groups", "short-last-group"])
def test_group_scale_refit_is_the_least_squares_solution(bounds):
    from tvm_ternary.quant.data_aware import _refit_scales

    rng = np.random.default_rng(1)
    d, k = 12, 5
    a = rng.normal(size=(60, d))
    h, c = a.T @ a / 60, rng.normal(size=(d, k))
    codes = rng.integers(-1, 2, size=(k, d)).astype(np.float64)
    codes[:, 0] = 1  # no all-zero group
    got_codes, got = _refit_scales(codes, h, c, bounds)
    for row in range(k):
        basis = np.zeros((d, len(bounds)))
        for g, (lo, hi) in enumerate(bounds):
            basis[lo:hi, g] = codes[row, lo:hi]
        want = np.linalg.lstsq(basis.T @ h @ basis, basis.T @ c[:, row], rcond=None)[0]
        np.testing.assert_allclose(got[row], np.abs(want), rtol=1e-4, atol=1e-8)
        np.testing.assert_array_equal(got_codes[row], codes[row] * np.repeat(np.sign(want) + (want == 0),
                                                                              [hi - lo for lo, hi in bounds]))
