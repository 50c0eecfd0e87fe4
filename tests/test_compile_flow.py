"""Compile flow on tiny CNNs: structure of the rewritten module, and the compiled library
bit-exact against the numpy reference pipeline (plan.simulate)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tiny_models import tiny_cnn, tiny_images

from tvm_ternary.compiler import compile_model
from tvm_ternary.cpu_features import missing_features
from tvm_ternary.schedules import ConvSpec
from tvm_ternary.plan import QuantConfig, simulate


def compiled(model, config, calib=16):
    return compile_model(model, config=config, calib_images=tiny_images(calib), progress=False)


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(method="exact"),
        QuantConfig(method="data-aware", group_size=2),
        QuantConfig(method="reconstruct", pointwise_group_size=2),
        QuantConfig(weight_bits=4, method="exact", grouping="cluster"),
        QuantConfig(weight_bits=8, method="exact"),
        QuantConfig(weight_bits=7, method="reconstruct"),
        QuantConfig(method="exact", act_bits=4),
        QuantConfig(method="twn", group_size=1, act_calibration="dfp"),
    ],
    ids=["ternary-exact", "ternary-data-aware-N2", "ternary-1x1-N2", "w4-cluster", "w8", "w7", "act4", "twn-N1-dfp"],
)
def test_bit_exact_against_reference_pipeline(config):
    """Conv head: every op is integer until the head dequantizes acc * scale (one float multiply,
    exact in both), so the library must equal the numpy reference exactly."""
    cm = compiled(tiny_cnn(conv_head=True), config)
    x = tiny_images(3, seed=5)
    np.testing.assert_array_equal(cm.run(x), simulate(cm.plan, x))


def test_structure_every_layer_is_a_kernel_and_region_ops_are_integer():
    cm = compiled(tiny_cnn(), QuantConfig(method="exact"))
    assert cm.rewrite.left_float == {}
    assert sorted(cm.rewrite.fused) == sorted(["conv1", "fire_squeeze", "fire_e1", "fire_e3",
                                               "res_a", "res_b", "dw", "fc"])
    assert sorted(cm.rewrite.integer_ops) == ["concat", "max_pool2d"]
    assert set(cm.rewrite.kernels.values()) >= {cm.isa, "plain"}  # depthwise uses the plain schedule


def test_classifier_after_float_pool_matches_reference():
    """GAP runs in float between the region and the dense layer: a different summation order
    may move the dense input by one quantization step, hence the tolerance (one step of the
    dense layer's input times its largest weight contribution)."""
    cm = compiled(tiny_cnn(), QuantConfig(method="exact"))
    x = tiny_images(4, seed=9)
    got, want = cm.run(x), simulate(cm.plan, x)
    fc = cm.plan.layers["fc"]
    step = fc.input_quant.scale * np.abs(fc.weights.dequantize()).sum(axis=1).max()
    assert np.abs(got - want).max() <= step
    assert (got.argmax(1) == want.argmax(1)).all()


def test_unpacked_ternary_layer_gets_the_words_of_its_packed_weights():
    """A ternary layer run unpacked (compute.unpacked_spec, 3x3 on a small map on vnni512)
    gets its int8 words q_g * t and codes of 1: the integers of the packed kernel, so the same
    bias (with the +128 compensation of s8 inputs) and accumulators. Checked in numpy, on any
    host; the compiled tiny CNN (its 3x3 layers are unpacked on a VNNI host) is bit-exact above."""
    from tvm_ternary.passes.kernel_args import layer_kernel_args, layer_spec
    from tvm_ternary.plan import make_plan
    from tvm_ternary.schedules.compute import unpacked_spec
    from tvm_ternary.schedules.layout import unblock_weights

    plan = make_plan(tiny_cnn(conv_head=True), tiny_images(8), config=QuantConfig(method="exact"),
                     progress=False)
    layer = plan.layers["res_a"]
    packed = layer_spec(layer, x_shape=(1, 32, 4, 4))
    words = unpacked_spec(packed, "vnni512")
    assert packed.weight_bits == 2 and words is not None
    got, want = (layer_kernel_args(layer, s, isa="vnni512") for s in (words, packed))
    w = layer.weights.decode_int8()
    assert np.abs(w).max() > 1  # group codes other than 1: the words are not the bare t
    np.testing.assert_array_equal(unblock_weights(got["weights"], shape=w.shape), w)
    assert (got["codes"] == 1).all()
    np.testing.assert_array_equal(got["bias"], want["bias"])
    np.testing.assert_array_equal(got["requant_scale"], want["requant_scale"])


def test_float_override_stays_float_and_is_reported():
    cm = compiled(tiny_cnn(), QuantConfig(method="exact", overrides=(("res_a", 0),)))
    assert "res_a" not in cm.rewrite.fused
    meta = cm.sidecar(library_sha256="0")
    status = {row["layer"]: row["status"] for row in meta["coverage"]}
    assert status["res_a"] == "float (policy)" and status["res_b"] == "kernel"
    x = tiny_images(2, seed=4)
    np.testing.assert_allclose(cm.run(x), simulate(cm.plan, x), rtol=1e-4, atol=1e-4)


def test_export_and_run_in_fresh_process_with_runtime_only(tmp_path):
    cm = compiled(tiny_cnn(), QuantConfig(method="exact"))
    lib = tmp_path / "tiny.so"
    meta = cm.export(lib)
    assert lib.is_file() and json.loads((tmp_path / "tiny.so.json").read_text()) == json.loads(json.dumps(meta))
    assert "avx2" in meta["required_cpu_features"] or meta["target"]["isa"] == "plain"
    x = tiny_images(3, seed=2)
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    code = ("import sys, numpy as np; from tvm_ternary.runtime import load; "
            "y = load(sys.argv[1]).run(np.load(sys.argv[2])); np.save(sys.argv[3], y); "
            "print(any(m.startswith('tvm.relax') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(lib), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # the compiler was never loaded
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), cm.run(x))


# Ternary (and 4-bit) layers on AVX2 / AVX-512BW targets (no VNNI) run the vpmaddubsw kernel
# (schedules/compute_ternary.py); run where the host has the ISA, else their code is checked. FGQ N=4, cluster (int16 runs over
# R x S), N=2 (a code per vpmaddubsw pair) with u4 activations, 4-bit weights.
_MADDUBS_CONFIGS = {
    "fgq-N4": QuantConfig(method="exact"),
    "cluster-N8": QuantConfig(method="exact", grouping="cluster", group_size=8,
                              clamp_group_size=True),
    "N2-act4": QuantConfig(method="data-aware", group_size=2, act_bits=4),
    "w4": QuantConfig(weight_bits=4, method="exact"),
    # first and last layer at 7 bits (--precise-bits 7): u8 x |v| <= 63 is exact on vpmaddubsw
    "precise7": QuantConfig(method="exact", first_layer_bits=7, last_layer_bits=7),
}


@pytest.mark.parametrize("mcpu,name", [("haswell", n) for n in _MADDUBS_CONFIGS]
                         + [("skylake-avx512", "fgq-N4"), ("skylake-avx512", "w4"),
                            ("skylake-avx512", "precise7")])
def test_ternary_maddubs_targets_bit_exact(mcpu, name):
    config = _MADDUBS_CONFIGS[name]
    from tvm_ternary import tvm_adapter as ta
    from tvm_ternary.schedules.spec import maddubs_form

    target = ta.make_target(mcpu)
    cm = compile_model(tiny_cnn(conv_head=True), config=config, calib_images=tiny_images(16),
                       target=target, progress=False)
    specs = [s for s in cm.rewrite.specs.values() if not getattr(s, "depthwise", False)]
    convs = [s.as_conv() if hasattr(s, "as_conv") else s for s in specs]
    assert any(maddubs_form(s, cm.isa) for s in convs), "no layer used the vpmaddubsw kernel"
    seven = [s for s in convs if s.weight_bits == 7]
    assert len(seven) == (2 if name == "precise7" else 0)
    assert all(maddubs_form(s, cm.isa) for s in seven), "a 7-bit layer kept the int16 block"
    if name == "precise7":  # reported as int7, first and last layer
        from tvm_ternary.plan.summary import plan_summary

        kinds = {r["layer"]: r["weights"] for r in cm.plan.coverage()}
        assert [k for k, v in kinds.items() if v == "int7"] == [next(iter(kinds)), list(kinds)[-1]]
        assert plan_summary(cm.plan)["int7_mac_share"] > 0
    if missing_features(ta.target_features(target)):
        # built (cross-compiled) but not run on a host without the target's ISA: the code of
        # its vpmaddubsw kernels is checked instead (zmm registers for avx512)
        from tvm_ternary.schedules import conv2d_kernel

        spec = next(s for s in specs if isinstance(s, ConvSpec) and maddubs_form(s, cm.isa))
        asm = ta.assembly(conv2d_kernel(spec, target=target), target=target)
        assert "vpmaddubsw" in asm and ("zmm" in asm) == (cm.isa == "avx512")
        return
    x = tiny_images(3, seed=5)
    np.testing.assert_array_equal(cm.run(x), simulate(cm.plan, x))
