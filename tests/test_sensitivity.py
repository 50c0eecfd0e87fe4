"""Calibration statistics reuse, alternative fits, and the per-layer sensitivity policy."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from tiny_models import tiny_cnn, tiny_images

from tvm_ternary.plan import QuantConfig, calibration_stats, make_plan, simulate
from tvm_ternary.plan.sensitivity import choose_precision
from tvm_ternary.plan.summary import plan_summary

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet"


@pytest.fixture(scope="module")
def model():
    return tiny_cnn()


def test_reused_stats_give_the_same_plan(model):
    calib, x = tiny_images(16), tiny_images(4, seed=9)
    cfg = QuantConfig(group_size=4, method="exact")  # minmax scales: sampling cannot differ
    stats = calibration_stats(model, calib, progress=False)
    a = make_plan(model, calib, config=cfg, progress=False)
    b = make_plan(model, calib, config=cfg, stats=stats, progress=False)
    np.testing.assert_array_equal(simulate(a, x), simulate(b, x))
    with pytest.raises(ValueError, match="not from this model"):
        make_plan(model, calib, config=cfg, stats={}, progress=False)


def test_alternatives_are_fitted_for_configured_layers_only(model):
    plan = make_plan(model, tiny_images(16), config=QuantConfig(weight_bits=8), alternatives=(2, 4),
                     progress=False)
    assert set(plan.alternatives) == {"fire_squeeze", "fire_e1", "fire_e3", "res_a", "res_b"}
    alt = plan.alternatives["res_a"]
    assert alt[2].weights.bits == 2 and alt[4].weights.bits == 4
    assert alt[2].input_quant == plan.layers["res_a"].input_quant  # same inputs, swappable


def test_summary_counts_macs_and_bytes(model):
    plan = make_plan(model, tiny_images(8), config=QuantConfig(method="exact"), progress=False)
    s = plan_summary(plan)
    assert abs(s["ternary_mac_share"] + s["int8_mac_share"] - 1.0) < 1e-9
    assert 0 < s["multiplications_removed"] < s["ternary_mac_share"]
    assert s["weight_bytes"] < s["float_weight_bytes"] / 4
    assert s["layer_formats"]["conv1"] == "int8" and s["layer_formats"]["res_a"] == "ternary"


def test_policy_meets_budgets_and_is_monotone(model):
    calib = tiny_images(48)
    # holdout 0: checked on the fitting images, so the estimate-vs-verified retries stay rare
    result = choose_precision(model, calib, config=QuantConfig(group_size=4), max_drops=(0.0, 100.0),
                              probe=16, progress=False, holdout=0.0)
    tight, loose = result.choices
    assert tight.verified_drop <= 0.0 + 1e-9 or tight.summary["ternary_mac_share"] == 0
    assert loose.summary["ternary_mac_share"] >= tight.summary["ternary_mac_share"]
    # an unlimited budget ternarizes every eligible layer
    assert all(bits == 2 for _, bits in loose.config.overrides)
    assert {s.name for s in result.layers} == {"fire_squeeze", "fire_e1", "fire_e3", "res_a", "res_b"}
    from tvm_ternary.plan.sensitivity import MAX_RETRIES

    assert result.passes <= 1 + 2 * (MAX_RETRIES + 2)  # one base pass, then verification passes only
    text = result.table()
    assert "budget 100 pt" in text and "ternary" in text


@pytest.mark.parametrize("cost, budget, want_layers, want_checks", [
    (0.1, 1.0, 8, 1),     # the estimate verifies: one plan
    (0.3, 1.0, 2, 4),     # f = 1, 1/2, 1/4, 3/8: 8, 4, 1, 2 layers
    (0.2, 1.0, 5, 4),     # f = 1, 1/2, 3/4, 7/8: 8, 4, 5, 6 layers
    (2.0, 1.0, 0, 4),     # f = 1/8 keeps no layer: all 8-bit
    (2.0, -1.0, 0, 4),    # all 8-bit even over the budget (nothing finer)
])
def test_verification_bisects_the_share_of_picked_layers(cost, budget, want_layers, want_checks):
    """Sequential plans may lose more than the estimate: the largest verified share is kept."""
    from tvm_ternary.plan.sensitivity import MAX_RETRIES, largest_verified_share

    names = [f"l{i}" for i in range(8)]
    checks = []

    def scaled(f):  # two stages, 6 + 2 picked layers, each keeping its best-ranked first
        out = {n: 8 for n in names}
        out.update({n: 2 for n in names[:6][:int(f * 6)]})
        out.update({n: (2, 2) for n in names[6:][:int(f * 2)]})
        return out

    def verify(assignment):
        k = sum(v != 8 for v in assignment.values())
        checks.append(k)
        return k, cost * k

    got = largest_verified_share(scaled, verify, budget=budget, retries=MAX_RETRIES)
    assert got == want_layers and len(checks) == want_checks
    assert all(cost * k > budget for k in checks if k > got)  # every larger share missed


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="shared ImageNet data not present")
def test_squeezenet_policy_runs_in_minutes():
    import time

    from tvm_ternary.onnx_io import load_model
    from tvm_ternary.passes.onnx_normalize import normalize_onnx
    from tvm_ternary.preprocess import PreprocessConfig, load_image_folder, preprocess_images

    prep = normalize_onnx(load_model(SHARED / "models" / "squeezenet1.1.onnx"))
    paths, _ = load_image_folder(SHARED / "images" / "val200", limit=64)
    x = preprocess_images(paths, config=PreprocessConfig.preset("caffe"), input_shape=prep.input_shape)
    start = time.perf_counter()
    result = choose_precision(prep.model, x, config=QuantConfig(group_size=4), max_drops=(3.0,), progress=False)
    assert time.perf_counter() - start < 600
    assert result.choices[0].verified_drop <= 3.0
    assert result.choices[0].summary["ternary_mac_share"] > 0.2


def test_budget_is_checked_on_held_out_images():
    from tvm_ternary.plan.sensitivity import split_holdout

    x = tiny_images(20)
    fit, check = split_holdout(x, 0.25, seed=0)
    assert len(fit) == 15 and len(check) == 5
    rows = {r.tobytes() for r in x}
    fit_rows, check_rows = {r.tobytes() for r in fit}, {r.tobytes() for r in check}
    assert not fit_rows & check_rows and fit_rows | check_rows == rows
    again = split_holdout(x, 0.25, seed=0)
    assert np.array_equal(again[1], check)
    same, same_check = split_holdout(x, 0.0)
    assert same is x and same_check is x


def test_labelled_check_set_budgets_top1_accuracy(model):
    """With labels the budget is accuracy lost against float on the check images (+ mirrors),
    recomputed here from the chosen plan."""
    from tvm_ternary import evaluate as ev
    from tvm_ternary.numpy_graph import NumpyGraph
    from tvm_ternary.plan.sensitivity import CheckSet

    calib, x = tiny_images(32), tiny_images(12, seed=7)
    pred = ev.class_scores(NumpyGraph(model).run(x)).argmax(1)
    labels = np.where(np.arange(12) % 3 == 0, (pred + 1) % 10, pred)  # float top-1: 2/3 here
    result = choose_precision(model, calib, config=QuantConfig(group_size=4, method="exact"),
                              max_drops=(100.0,), check=CheckSet(images=x, labels=labels, source="12 test images"),
                              probe=8, progress=False)
    both, both_labels = np.concatenate([x, x[..., ::-1]]), np.concatenate([labels, labels])
    float_top1 = np.mean(ev.class_scores(NumpyGraph(model).run(both)).argmax(1) == both_labels)
    (choice,) = result.choices
    quant_top1 = np.mean(ev.class_scores(simulate(choice.plan, both)).argmax(1) == both_labels)
    assert result.criterion == "accuracy" and result.float_accuracy == pytest.approx(float_top1)
    assert choice.accuracy == pytest.approx(quant_top1)
    assert choice.verified_drop == pytest.approx(100 * (float_top1 - quant_top1))
    assert "top-1 accuracy lost against float, checked on 12 test images" in result.table()
    with pytest.raises(ValueError, match="inside check="):
        choose_precision(model, calib, config=QuantConfig(), check=CheckSet(images=x), labels=labels,
                         progress=False)


def test_check_set_is_the_unused_calibration_images(tmp_path):
    from PIL import Image

    from tvm_ternary.inputs import policy_check_set
    from tvm_ternary.preprocess import PreprocessConfig

    rng = np.random.default_rng(3)
    names = [f"{i:02d}.png" for i in range(12)]
    for n in names:
        Image.fromarray(rng.integers(0, 256, (18, 18, 3), dtype=np.uint8)).save(tmp_path / n)
    (tmp_path / "labels.txt").write_text("".join(f"{n},{i % 5}\n" for i, n in enumerate(names)))
    kw = dict(preprocess=PreprocessConfig.preset("unit"), input_shape=(1, 3, 16, 16), seed=0)
    check = policy_check_set(tmp_path, calibration={"files": names[:8]}, limit=10, **kw)
    assert len(check.images) == 4 and check.labels.tolist() == [8 % 5, 9 % 5, 10 % 5, 11 % 5]
    assert "4 images" in check.source and "labelled" in check.source
    two = policy_check_set(tmp_path, calibration={"files": names[:8]}, limit=2, **kw)
    again = policy_check_set(tmp_path, calibration={"files": names[:8]}, limit=2, **kw)
    assert len(two.images) == 2 and np.array_equal(two.images, again.images)  # seeded
    assert policy_check_set(tmp_path, calibration={"files": names}, limit=10, **kw) is None
    (tmp_path / "labels.txt").unlink()
    assert policy_check_set(tmp_path, calibration={"files": names[:10]}, limit=10, **kw).labels is None
    arr = tiny_images(10)
    rows = policy_check_set(arr, calibration={"indices": [0, 1, 2, 3, 4, 5]}, limit=10, **kw)
    assert rows.labels is None and np.array_equal(rows.images, arr[6:])


def test_group_size_override_and_fine_ternary_alternative(model):
    """A per-layer N: the layer's groups hold N channels, the rest keep group_size; the policy's
    N = 2 alternative is that very fit."""
    calib = tiny_images(16)
    cfg = QuantConfig(group_size=4, method="exact", group_overrides=(("res_a", 2),))
    plan = make_plan(model, calib, config=cfg, progress=False)
    assert plan.layers["res_a"].weights.group_size == 2 and plan.layers["res_b"].weights.group_size == 4
    assert plan_summary(plan)["layer_formats"]["res_a"] == "ternary N=2"
    alt = make_plan(model, calib, config=replace(cfg, weight_bits=8, group_overrides=()),
                    alternatives=(2, (2, 2)), progress=False)
    assert alt.alternatives["res_a"][(2, 2)].weights.group_size == 2
    assert alt.alternatives["res_a"][2].weights.group_size == 4
    np.testing.assert_array_equal(alt.alternatives["res_a"][(2, 2)].weights.values, plan.layers["res_a"].weights.values)
    with pytest.raises(ValueError, match="positive integer"):
        QuantConfig(group_overrides=(("res_a", 0),))
