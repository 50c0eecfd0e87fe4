"""`tvm-ternary eval` on the tiny CNN and a temporary labelled image folder; metric helpers."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_models import tiny_cnn

from tvm_ternary import evaluate as ev
from tvm_ternary.cli import main
from tvm_ternary.preprocess import PreprocessConfig, preprocess_images

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "imagenet"
N_IMAGES = 72
CALIB = 16


def _write_folder(root: Path, model, *, shift: int = 0) -> Path:
    """PNG images + labels.txt whose labels are the float model's own predictions (+ shift)."""
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(5)
    names = []
    for i in range(N_IMAGES):
        name = f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / name)
        names.append(name)
    x = preprocess_images([root / n for n in names], config=PreprocessConfig.preset("unit"),
                          input_shape=(1, 3, 16, 16))
    pred = ev.class_scores(ev.onnxruntime_runner(model)(x)).argmax(1)
    (root / "labels.txt").write_text("".join(f"{n},{(p + shift) % 10}\n" for n, p in zip(names, pred)))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import onnx

    base = tmp_path_factory.mktemp("eval")
    model = tiny_cnn()
    path = base / "tiny.onnx"
    onnx.save(model, path)
    return {"model": path, "images": _write_folder(base / "images", model),
            "wrong": _write_folder(base / "wrong", model, shift=1)}


def _eval(tiny, *extra, folder="images", capsys=None):
    argv = ["eval", str(tiny["model"]), "--images", str(tiny[folder]), "--preprocess", "unit",
            "--backend", "simulate", "--calib-limit", str(CALIB), "--quiet", *extra]
    return main(argv)


def test_eval_json_shape_and_held_out_calibration(tiny, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert _eval(tiny, "--weight-bits", "8", "--method", "exact", "--json", str(out)) == 0
    r = json.loads(out.read_text())
    for key in ("float", "quantized", "agreement_top1", "n_images", "config"):
        assert key in r
    assert set(r["float"]) == set(r["quantized"]) == {"top1", "top5"}
    assert r["float"]["top1"] == 1.0  # labels are the float model's own predictions
    assert r["n_images"] == N_IMAGES - CALIB  # calibration images held out
    assert 0.0 <= r["quantized"]["top1"] <= r["quantized"]["top5"] <= 1.0
    assert r["agreement_top1"] == r["quantized"]["top1"]
    assert r["config"]["weight_bits"] == 8 and r["backend"] == "simulate"
    assert r["warnings"] == []
    text = capsys.readouterr().out
    assert "backend: simulate" in text and "top-1 agreement" in text and "held out" in text


def test_eval_overlapping_calibration_warns(tiny, capsys):
    assert _eval(tiny, "--calib", str(tiny["images"]), "--method", "exact", "--limit", "20") == 0
    err = capsys.readouterr().err
    assert "also calibration images" in err


def test_eval_flags_wrong_preprocessing(tiny, capsys):
    assert _eval(tiny, "--method", "exact", "--calib-limit", "8", folder="wrong") == 0
    err = capsys.readouterr().err
    assert "float top-1 is 0.0%" in err and "--preprocess" in err


def test_eval_layer_group_size(tiny, tmp_path):
    out = tmp_path / "r.json"
    assert _eval(tiny, "--method", "exact", "--layer-group-size", "res_a=2", "--json", str(out)) == 0
    r = json.loads(out.read_text())
    assert r["layer_formats"]["res_a"] == "ternary N=2" and r["layer_formats"]["res_b"] == "ternary"
    assert r["config"]["group_overrides"] == [["res_a", 2]]


def test_eval_pointwise_group_size(tiny, tmp_path):
    out = tmp_path / "r.json"
    assert _eval(tiny, "--method", "exact", "--pointwise-group-size", "2", "--json", str(out)) == 0
    r = json.loads(out.read_text())
    formats = {k: v for k, v in r["layer_formats"].items() if k.startswith(("fire", "res"))}
    assert formats == {"fire_squeeze": "ternary N=2", "fire_e1": "ternary N=2", "fire_e3": "ternary",
                       "res_a": "ternary", "res_b": "ternary"}
    assert r["config"]["pointwise_group_size"] == 2


def test_eval_sensitivity_policy(tiny, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert _eval(tiny, "--max-drop", "100", "--json", str(out)) == 0
    r = json.loads(out.read_text())
    assert "sensitivity policy" in capsys.readouterr().out
    assert r["config"]["overrides"]  # per-layer choices recorded
    assert r["plan"]["ternary_mac_share"] > 0.5  # an unlimited budget ternarizes every eligible layer


@pytest.mark.parametrize("extra, message", [
    ([], "preprocess"),
    (["--preprocess", "unit", "--group-size", "64"], "group size"),
])
def test_eval_errors_are_one_line(tiny, capsys, extra, message):
    argv = ["eval", str(tiny["model"]), "--images", str(tiny["images"]), "--backend", "simulate",
            "--quiet", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_eval_library_needs_float_model(tiny, tmp_path, capsys):
    lib = tmp_path / "m.so"
    lib.write_bytes(b"")
    assert main(["eval", str(lib), "--images", str(tiny["images"])]) == 2
    assert "--float-model" in capsys.readouterr().err
    assert main(["eval", str(lib), "--images", str(tiny["images"]), "--group-size", "4",
                 "--float-model", str(tiny["model"])]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_missing_onnxruntime_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ev.UserError, match="pip install onnxruntime"):
        ev.onnxruntime_runner(tiny_cnn())


def test_scores_softmax_4d_and_label_offset():
    logits = np.random.default_rng(0).normal(size=(6, 1001))
    probs = ev.probabilities(logits)
    assert ev.is_probability(probs) and not ev.is_probability(logits)
    four_d = probs.reshape(6, 1001, 1, 1)
    assert ev.class_scores(four_d).shape == (6, 1001)
    m = ev.compare(logits, four_d, labels=logits.argmax(1) - 1, label_offset=1)
    assert m["float"]["top1"] == m["quantized"]["top1"] == 1.0 and m["agreement_top1"] == 1.0
    assert m["kl_divergence"] < 1e-9
    assert ev.default_label_offset(1001) == 1 and ev.default_label_offset(1000) == 0
    top = ev.topk(np.array([[0.1, 0.5, 0.2, 0.9]]), 3)
    assert top.tolist() == [[3, 1, 2]]
    with pytest.raises(ev.UserError, match="class scores"):
        ev.class_scores(np.zeros((2, 10, 3, 3)))


def test_probabilities_of_a_softmax_model_are_not_softmaxed_again():
    p = np.array([[0.7, 0.2, 0.1]])
    np.testing.assert_allclose(ev.probabilities(p), p)


@pytest.mark.slow
@pytest.mark.parametrize("name, preset, top1", [("squeezenet1.1.onnx", "caffe", 0.705),
                                                ("mobilenet_v2_wint8.onnx", "torchvision", 0.765)])
def test_real_model_float_reference(tmp_path, name, preset, top1):
    """Float top-1 on all of val200 (calibrating on it: the overlap warning is expected)."""
    out = tmp_path / "r.json"
    images = SHARED / "images" / "val200"
    assert main(["eval", str(SHARED / "models" / name), "--images", str(images), "--calib", str(images),
                 "--calib-limit", "16", "--preprocess", preset, "--backend", "simulate", "--weight-bits", "8",
                 "--method", "exact", "--quiet", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["n_images"] == 200 and abs(r["float"]["top1"] - top1) <= 0.005
    assert r["agreement_top1"] >= 0.9


@pytest.mark.slow
def test_eval_tvm_backend_agrees_with_simulate(tiny, tmp_path):
    """The compiled library's integer layers are bit-exact with simulate: same predictions."""
    pytest.importorskip("tvm_ternary.compiler")
    outs = {}
    for backend in ("simulate", "tvm"):
        out = tmp_path / f"{backend}.json"
        assert main(["eval", str(tiny["model"]), "--images", str(tiny["images"]), "--preprocess", "unit",
                     "--backend", backend, "--calib-limit", str(CALIB), "--quiet", "--json", str(out)]) == 0
        outs[backend] = json.loads(out.read_text())
    assert outs["tvm"]["backend"] == "tvm"
    assert outs["tvm"]["quantized"] == outs["simulate"]["quantized"]


def test_eval_qdq_model_against_ort_on_it(tiny, tmp_path, capsys):
    """A QDQ model is evaluated against ORT running it (not a float model), with its own plan."""
    import onnx

    from tiny_models import ort_qdq, tiny_images

    path = tmp_path / "tiny_qdq.onnx"
    onnx.save(ort_qdq(tiny_cnn(), tiny_images(16)), path)
    out = tmp_path / "r.json"
    argv = ["eval", str(path), "--images", str(tiny["images"]), "--preprocess", "unit",
            "--backend", "simulate", "--quiet", "--json", str(out)]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert r["reference"] == "ORT (QDQ model)" and r["config"] == {"quantization": "model (QDQ)"}
    assert r["n_images"] == N_IMAGES and r["calibration"]["images"] == 0  # nothing held out
    assert r["agreement_top1"] >= 0.95
    assert "read from the model" in capsys.readouterr().out
    # quantization flags do not apply to a model that carries its own
    assert main(argv + ["--weight-bits", "2"]) == 2
