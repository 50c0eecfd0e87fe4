"""``compile --emit-onnx``: our quantized model as standard QDQ ONNX. ONNX Runtime runs it and
agrees with the library; compiling the emitted file gives the same library outputs bit for bit,
with the FGQ ternary groups found again at the group size they were made with."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tiny_models import tiny_cnn, tiny_images
from tvm_ternary.cli import main
from tvm_ternary.compiler import compile_model
from tvm_ternary.export_onnx import qdq_model
from tvm_ternary.plan import QuantConfig


def _ort(model, x):
    # ONNX Runtime's QDQ graph as written (DequantizeLinear -> float op -> QuantizeLinear), not
    # its fused int8 kernels: on CPUs without VNNI their u8 x s8 vpmaddubsw pairs saturate at
    # int16 (measured: 7 steps off on an AVX2-only Zen 3), so they are not the semantics
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": x[i : i + 1]})[0] for i in range(len(x))])


@pytest.mark.parametrize("conv_head,n", [(True, 4), (False, 2)])
def test_emitted_qdq_reimports_bit_identical_and_ort_agrees(conv_head, n):
    cm = compile_model(tiny_cnn(conv_head=conv_head), config=QuantConfig(group_size=n),
                       calib_images=tiny_images(16), progress=False)
    emitted = qdq_model(cm.plan)
    ops = {node.op_type for node in emitted.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    again = compile_model(emitted, config=QuantConfig(), progress=False)
    assert again.plan.source == "model"
    for name, layer in cm.plan.layers.items():
        re = again.plan.layers[name]
        np.testing.assert_array_equal(re.weights.decode_int8(), layer.weights.decode_int8())
        assert re.weights.bits == layer.weights.bits
        if layer.weights.bits == 2:  # the groups are found again (or a multiple of them)
            assert re.weights.group_size % n == 0
            assert again.plan.coverage()[list(cm.plan.layers).index(name)]["weights"] == "ternary"
        assert re.input_quant == layer.input_quant and re.output_quant == layer.output_quant
    x = tiny_images(30, seed=9)
    ours = cm.run(x)
    np.testing.assert_array_equal(again.run(x), ours)
    theirs = _ort(emitted, x).reshape(30, -1)
    ours = ours.reshape(30, -1)
    # ORT requantizes in float (one rounding; ours rounds a residual's term on its own): the
    # logits may differ by a few output steps, so top-1 may differ only where ORT's own top two
    # are that close, and on at most 10% of the images
    gap = np.abs(ours - theirs).max()
    differ = np.flatnonzero(ours.argmax(1) != theirs.argmax(1))
    assert all(theirs[i].max() - theirs[i, ours[i].argmax()] <= 2 * gap for i in differ)
    assert len(differ) <= 3


def test_cli_emit_onnx_writes_a_model_ort_runs(tmp_path, capsys):
    onnx.save(tiny_cnn(), tmp_path / "tiny.onnx")
    np.save(tmp_path / "calib.npy", tiny_images(8))
    rc = main(["compile", str(tmp_path / "tiny.onnx"), "-o", str(tmp_path / "tiny.so"),
               "--calib", str(tmp_path / "calib.npy"), "--emit-onnx", str(tmp_path / "tiny_qdq.onnx")])
    assert rc == 0 and "QDQ ONNX" in capsys.readouterr().out
    model = onnx.load(tmp_path / "tiny_qdq.onnx")
    out = _ort(model, tiny_images(2))
    assert out.shape == (2, 10) and np.all(np.isfinite(out))


def test_cli_emit_onnx_refuses_to_overwrite_the_input(tmp_path, capsys):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(), path)
    before = path.read_bytes()
    np.save(tmp_path / "calib.npy", tiny_images(4))
    rc = main(["compile", str(path), "-o", str(tmp_path / "t.so"), "--calib", str(tmp_path / "calib.npy"),
               "--emit-onnx", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is an input of this command" in err[0], err
    assert path.read_bytes() == before


def test_emit_of_an_imported_qdq_model_round_trips():
    """ORT's QDQ model -> our plan -> emitted QDQ -> our plan again: same library outputs, and
    the emitted graph is valid ONNX (unique names, though it already carries our roundings)."""
    from tiny_models import ort_qdq

    first = compile_model(ort_qdq(tiny_cnn(conv_head=True), tiny_images(16)), config=QuantConfig(),
                          progress=False)
    emitted = qdq_model(first.plan)
    again = compile_model(emitted, config=QuantConfig(), progress=False)
    for model in (emitted, again.plan.model):
        names = [t.name for t in model.graph.initializer] + [o for n in model.graph.node for o in n.output]
        assert len(names) == len(set(names))
    x = tiny_images(20, seed=4)
    np.testing.assert_array_equal(again.run(x), first.run(x))
