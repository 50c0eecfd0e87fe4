"""`tvm-ternary quantize-report`: the report on small and real models, and one-line errors on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from tvm_ternary.cli import main
from tvm_ternary.commands import quantize_report

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO.parent / "shared" / "data" / "imagenet" / "models"
needs_real_models = pytest.mark.skipif(not MODELS.is_dir(), reason=f"{MODELS} not present")
RNG = np.random.default_rng(1)


def two_layer_model(*, first_weight=None, second_weight=None, input_size=(4, 4)):
    """input -> Conv(3->16, 3x3) -> Relu -> Conv(16->8, 3x3) -> Flatten -> Gemm(8*4*4 -> 10)."""
    first = RNG.normal(size=(16, 3, 3, 3)).astype(np.float32) if first_weight is None else first_weight
    second = RNG.normal(size=(8, 16, 3, 3)).astype(np.float32) if second_weight is None else second_weight
    fc = RNG.normal(size=(10, 128)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["h2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["h2"], ["f"]),
        helper.make_node("Gemm", ["f", "wfc"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "two_layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, *input_size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(v, n) for n, v in (("w1", first), ("w2", second), ("wfc", fc))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def write(model, tmp_path, name="model.onnx") -> Path:
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


def run_cli(capsys, *argv):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code, out, err, *fragments):
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tvm-ternary: error: "), err
    assert "Traceback" not in err + out
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --- report on a small model --------------------------------------------------------------------


def test_report_table_and_json(capsys, tmp_path):
    model = write(two_layer_model(), tmp_path)
    json_path = tmp_path / "report.json"
    code, out, err = run_cli(capsys, "quantize-report", model, "--group-size", "4", "--json", json_path)
    assert code == 0 and err == ""
    for text in ("conv1", "conv2", "fc", "8-bit (first layer)", "75.0%", "totals"):
        assert text in out
    report = json.loads(json_path.read_text())
    assert report["config"] == {"group_size": 4, "threshold": "exact", "grouping": "fgq",
                                "weight_bits": 2, "code_bits": 7}
    by_name = {layer["name"]: layer for layer in report["layers"]}
    assert by_name["conv1"]["kept_reason"] == "first layer" and by_name["conv1"]["weight_bits"] == 8
    conv2 = by_name["conv2"]
    assert conv2["shape"] == [8, 16, 3, 3] and conv2["groups"] == 8 * 4 * 9
    assert conv2["multiplications_removed"] == pytest.approx(0.75)
    assert conv2["error_exact"] < conv2["error_twn"] and conv2["error"] == conv2["error_exact"]
    assert 0 <= conv2["integer_scales_extra_error"] < 0.01
    assert by_name["fc"]["op_type"] == "dense" and by_name["fc"]["macs"] == 1280
    # the compiler's policy: the classifier (last layer) stays 8-bit too
    assert by_name["fc"]["kept_reason"] == "last layer" and by_name["fc"]["weight_bits"] == 8
    totals = report["totals"]
    assert totals["layers"] == 3 and totals["layers_in_chosen_format"] == 1
    assert totals["multiplications_removed_chosen_layers"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    "options, check",
    [
        (["--threshold", "twn"], lambda layer: layer["error"] == layer["error_twn"]),
        (["--grouping", "cluster"],
         lambda layer: layer["multiplications_removed"] == pytest.approx(1 - 1 / (4 * 9))),
        (["--weight-bits", "4"],
         lambda layer: layer["weight_bits"] == 4 and layer["multiplications_removed"] == 0.0),
        (["--code-bits", "4"], lambda layer: layer["integer_scales_extra_error"] >= 0),
    ],
)
def test_report_options(capsys, tmp_path, options, check):
    json_path = tmp_path / "report.json"
    code, _, err = run_cli(capsys, "quantize-report", write(two_layer_model(), tmp_path),
                           *options, "--json", json_path)
    assert code == 0, err
    conv2 = next(l for l in json.loads(json_path.read_text())["layers"] if l["name"] == "conv2")
    assert check(conv2)


def test_unknown_output_size_weights_totals_by_weight_count(capsys, tmp_path):
    json_path = tmp_path / "report.json"
    model = write(two_layer_model(input_size=("height", "width")), tmp_path)
    code, out, err = run_cli(capsys, "quantize-report", model, "--json", json_path)
    assert code == 0, err
    report = json.loads(json_path.read_text())
    assert report["weighting"] == "weights" and report["totals"]["macs"] is None
    assert "kweights" in out and "weight-count-weighted" in out


def test_help_explains_itself(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "quantize-report" in out
    code, out, _ = run_cli(capsys, "quantize-report", "--help")
    assert code == 0 and "--group-size" in out and "--threshold" in out


# --- bad input: one line, exit 2 ----------------------------------------------------------------


def test_missing_file(capsys, tmp_path):
    assert_one_error_line(*run_cli(capsys, "quantize-report", tmp_path / "nope.onnx"), "no such file")


def test_not_onnx(capsys, tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("these are not the weights you are looking for\n")
    assert_one_error_line(*run_cli(capsys, "quantize-report", path), "not an ONNX model")


def test_truncated_onnx(capsys, tmp_path):
    data = two_layer_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    assert_one_error_line(*run_cli(capsys, "quantize-report", path), "truncated")


def test_model_without_conv_or_dense(capsys, tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert_one_error_line(*run_cli(capsys, "quantize-report", write(model, tmp_path)),
                          "no conv or dense layer")


@pytest.mark.parametrize("group_size", ["0", "-4", "four"])
def test_group_size_not_positive(capsys, tmp_path, group_size):
    assert_one_error_line(*run_cli(capsys, "quantize-report", write(two_layer_model(), tmp_path),
                                   "--group-size", group_size), "--group-size")


def test_group_size_larger_than_a_layer_names_the_layer(capsys, tmp_path):
    # conv2 has 16 input channels (conv1's 3 stay 8-bit, so it does not limit N).
    assert_one_error_line(*run_cli(capsys, "quantize-report", write(two_layer_model(), tmp_path),
                                   "--group-size", "17"), "layer conv2", "N=17", "1 to 16")


@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_non_finite_weight_names_the_layer(capsys, tmp_path, bad):
    weight = RNG.normal(size=(8, 16, 3, 3)).astype(np.float32)
    weight[3, 5, 1, 1] = bad
    path = write(two_layer_model(second_weight=weight), tmp_path)
    assert_one_error_line(*run_cli(capsys, "quantize-report", path), "layer conv2", "NaN/Inf")


def test_unknown_option_and_missing_command(capsys):
    assert_one_error_line(*run_cli(capsys, "quantize-report", "m.onnx", "--bogus"), "--bogus")
    assert_one_error_line(*run_cli(capsys), "COMMAND")


def test_internal_error_is_one_line_with_exit_1(capsys, tmp_path, monkeypatch):
    def broken(model):
        raise RuntimeError("simulated bug")

    monkeypatch.delenv("TVM_TERNARY_TRACEBACK", raising=False)
    monkeypatch.setattr(quantize_report, "find_weighted_layers", broken)
    code, out, err = run_cli(capsys, "quantize-report", write(two_layer_model(), tmp_path))
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines() == ["tvm-ternary: error: internal error: RuntimeError: "
                                        "simulated bug (set TVM_TERNARY_TRACEBACK=1 to see the traceback)"]


def test_subprocess_bad_input_and_good_run(tmp_path):
    command = [sys.executable, "-m", "tvm_ternary.cli", "quantize-report"]
    bad = subprocess.run([*command, str(tmp_path / "missing.onnx")], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        f"tvm-ternary: error: {tmp_path / 'missing.onnx'}: no such file"]
    good = subprocess.run([*command, str(write(two_layer_model(), tmp_path))], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0 and "multiplications removed" in good.stdout, good.stderr


# --- the real models (issue 2 acceptance) -------------------------------------------------------


@needs_real_models
@pytest.mark.parametrize("model_file", ["squeezenet1.1.onnx", "mobilenet_v2_wint8.onnx"])
def test_real_model_n4_removes_75_percent_and_exact_beats_twn(capsys, tmp_path, model_file):
    json_path = tmp_path / "report.json"
    code, out, err = run_cli(capsys, "quantize-report", MODELS / model_file, "--group-size", "4",
                             "--json", json_path)
    assert code == 0, err
    report = json.loads(json_path.read_text())
    ternary = [layer for layer in report["layers"] if layer["weight_bits"] == 2]
    assert len(ternary) >= 0.6 * len(report["layers"])
    for layer in ternary:
        assert layer["multiplications_removed"] == pytest.approx(0.75), layer["name"]
        assert layer["error_exact"] < layer["error_twn"], layer["name"]
    assert report["totals"]["error_exact"] < report["totals"]["error_twn"]
    assert report["seconds"] < 30  # "finishes in seconds" (about 1 s on 2 shared cores)


def test_cli_and_onnx_io_do_not_import_tvm():
    # Command modules are all imported to build --help; TVM must wait until a command runs.
    code = ("import sys, tvm_ternary.cli, tvm_ternary.onnx_io; tvm_ternary.cli.build_parser(); "
            "print('tvm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "False"
