"""Bad input to ``tvm-ternary compile`` / ``run``: one clear line on stderr, a non-zero exit, no
traceback, and no (partial) output file left behind. Plus: an op we do not quantize stays float
and is reported, not dropped and not a crash."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tiny_models import tiny_cnn, tiny_images

from tvm_ternary.cli import main
from tvm_ternary.compiler import compile_model
from tvm_ternary.plan import QuantConfig, simulate


def cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean_error(rc, err, *, match, code=2):
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tvm-ternary: error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    assert match in lines[0], lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    onnx.save(tiny_cnn(), d / "tiny.onnx")
    np.save(d / "calib.npy", tiny_images(4))
    np.save(d / "x.npy", tiny_images(2, seed=3))
    return d


@pytest.fixture(scope="module")
def library(work, tmp_path_factory):
    """A good library + sidecar, compiled once through the CLI."""
    d = tmp_path_factory.mktemp("lib")
    rc = main(["compile", str(work / "tiny.onnx"), "-o", str(d / "tiny.so"), "--calib", str(work / "calib.npy"),
               "--method", "exact"])
    assert rc == 0
    return d / "tiny.so"


def _dynamic_batch():
    m = tiny_cnn()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    return m


def _with_op(op_type, **attrs):
    """conv -> relu -> OP -> conv -> relu -> conv: OP sits between two quantized layers."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.normal(size=s) * 0.3).astype(np.float32), n)
             for n, s in (("w1", (8, 3, 3, 3)), ("w2", (8, 8, 3, 3)), ("w3", (4, 8, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["a"], name="relu1"),
             helper.make_node(op_type, ["a"], ["b"], name="the_op", **attrs),
             helper.make_node("Conv", ["b", "w2"], ["c2"], name="conv2", pads=[1] * 4),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


BAD_MODELS = {
    "garbage": (b"\x00\x01 this is not a protobuf " * 20, "not an ONNX model"),
    "truncated": (None, "truncated ONNX model"),
    "dynamic_batch": (_dynamic_batch(), "--input-shape input:1,3,16,16"),
    "unsupported_op": (_with_op("Hardmax"), "unsupported ONNX op(s) Hardmax"),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_model_is_one_line_error_and_writes_nothing(case, work, tmp_path, capsys):
    content, match = BAD_MODELS[case]
    path = tmp_path / f"{case}.onnx"
    if content is None:
        raw = (work / "tiny.onnx").read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        onnx.save(content, path)
    before = set(os.listdir(tmp_path))
    rc, _, err = cli(capsys, "compile", path, "-o", tmp_path / "out.so", "--calib", work / "calib.npy",
                     "--method", "exact")
    assert_clean_error(rc, err, match=match)
    assert set(os.listdir(tmp_path)) == before  # no .so, no sidecar, no temporary file


@pytest.mark.parametrize("case", ["no_calib", "calib_missing", "calib_wrong_shape", "no_output_dir", "output_is_dir"])
def test_bad_compile_options(case, work, tmp_path, capsys):
    np.save(tmp_path / "small.npy", tiny_images(2, size=8))
    out = {"no_output_dir": tmp_path / "nodir" / "x.so", "output_is_dir": tmp_path}.get(case, tmp_path / "x.so")
    calib = {"no_calib": [], "calib_missing": ["--calib", tmp_path / "none.npy"],
             "calib_wrong_shape": ["--calib", tmp_path / "small.npy"]}.get(case, ["--calib", work / "calib.npy"])
    match = {"no_calib": "--calib DIR|FILE.npy is required", "calib_missing": "cannot read calibration array",
             "calib_wrong_shape": "does not fit the model input", "no_output_dir": "output directory does not exist",
             "output_is_dir": "is a directory"}[case]
    before = set(os.listdir(tmp_path))
    rc, _, err = cli(capsys, "compile", work / "tiny.onnx", "-o", out, *calib)
    assert_clean_error(rc, err, match=match)
    assert set(os.listdir(tmp_path)) == before


def test_op_we_do_not_quantize_stays_float_and_is_reported(work, tmp_path, capsys):
    model = _with_op("LeakyRelu", alpha=0.1)
    onnx.save(model, tmp_path / "leaky.onnx")
    rc, out, err = cli(capsys, "compile", tmp_path / "leaky.onnx", "-o", tmp_path / "leaky.so",
                       "--calib", work / "calib.npy", "--method", "exact", "-N", "2")
    assert rc == 0, err
    assert "float ops (run in float32, outside the integer region): LeakyRelu x1" in out
    meta = json.loads((tmp_path / "leaky.so.json").read_text())
    assert meta["float_ops"] == {"LeakyRelu": 1}
    assert [r["status"] for r in meta["coverage"]] == ["kernel"] * 3
    # the float op sits between two integer layers: dequantize, LeakyRelu, requantize, and
    # still the same numbers as the numpy reference pipeline
    cm = compile_model(model, config=QuantConfig(method="exact", group_size=2),
                       calib_images=tiny_images(4), progress=False)
    x = tiny_images(2, seed=7)
    np.testing.assert_array_equal(cm.run(x), simulate(cm.plan, x))


def _sidecar_edit(lib, tmp_path, edit):
    """A copy of the library whose sidecar is changed by ``edit(meta) -> meta | None`` (None: removed)."""
    so = tmp_path / "lib.so"
    shutil.copy(lib, so)
    meta = edit(json.loads((lib.parent / "tiny.so.json").read_text()))
    if meta is not None:
        (tmp_path / "lib.so.json").write_text(json.dumps(meta) if isinstance(meta, dict) else meta)
    return so


RUN_CASES = {
    "wrong_shape": (lambda m: m, tiny_images(2, size=8), "does not match the model's (1, 3, 16, 16)"),
    "wrong_rank": (lambda m: m, tiny_images(1)[0], "does not match the model's"),
    "wrong_dtype": (lambda m: m, tiny_images(2).astype(np.float64), "input dtype float64 does not match"),
    "sidecar_missing": (lambda m: None, None, "sidecar missing"),
    "sidecar_mismatch": (lambda m: dict(m, library_sha256="0" * 64), None, "sidecar does not match lib.so"),
    "sidecar_garbage": (lambda m: "{not json", None, "not a readable sidecar JSON"),
    # xop (AMD Bulldozer only): no library built here needs it (amx-int8 did not do: AMX hosts)
    "cpu_feature": (lambda m: dict(m, required_cpu_features=m["required_cpu_features"] + ["xop"]), None,
                    "required_cpu_features: the sidecar adds xop"),  # the library's own record wins
}


@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_bad_run_is_one_line_error_and_writes_nothing(case, library, work, tmp_path, capsys):
    edit, x, match = RUN_CASES[case]
    so = _sidecar_edit(library, tmp_path, edit)
    x_path = work / "x.npy"
    if x is not None:
        x_path = tmp_path / "x.npy"
        np.save(x_path, x)
    rc, _, err = cli(capsys, "run", so, "--input", x_path, "--output", tmp_path / "y.npy")
    assert_clean_error(rc, err, match=match)
    assert not any(p.name.startswith(("y", ".y")) for p in tmp_path.iterdir())


def test_run_bad_output_dir_and_corrupt_library(library, work, tmp_path, capsys):
    rc, _, err = cli(capsys, "run", library, "--input", work / "x.npy", "--output", tmp_path / "no" / "y.npy")
    assert_clean_error(rc, err, match="output directory does not exist")
    # a damaged .so whose sidecar was re-hashed to match: the loader's failure is one line too
    from tvm_ternary.runtime import file_sha256

    so = _sidecar_edit(library, tmp_path, lambda m: m)
    with open(so, "r+b") as f:
        f.write(b"garbage!")
    meta = json.loads((tmp_path / "lib.so.json").read_text())
    (tmp_path / "lib.so.json").write_text(json.dumps(dict(meta, library_sha256=file_sha256(so))))
    rc, _, err = cli(capsys, "run", so, "--input", work / "x.npy", "--output", tmp_path / "y.npy")
    assert_clean_error(rc, err, match="cannot load the library")
    assert not (tmp_path / "y.npy").exists()


def test_good_run_then_edited_features_in_a_fresh_runtime_only_process(library, work, tmp_path, capsys):
    """The runtime-only process reads the library's embedded manifest too (no compiler needed);
    a library really built for a CPU this host is not: tests/test_reliability.py."""
    rc, out, _ = cli(capsys, "run", library, "--input", work / "x.npy", "--output", tmp_path / "y.npy")
    assert rc == 0 and np.load(tmp_path / "y.npy").shape == (2, 10)
    so = _sidecar_edit(library, tmp_path, lambda m: dict(m, required_cpu_features=["xop"]))
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    proc = subprocess.run([sys.executable, "-m", "tvm_ternary", "run", str(so), "--input", str(work / "x.npy"),
                           "--output", str(tmp_path / "y2.npy")], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert_clean_error(proc.returncode, proc.stderr, match="required_cpu_features: the sidecar adds xop")
    assert not (tmp_path / "y2.npy").exists()


def test_sidecar_records_the_calibration_sample(library, work):
    """Which calibration images (of the .npy, seeded sample) planned the library is recorded."""
    meta = json.loads(library.with_name("tiny.so.json").read_text())
    cal = meta["calibration"]
    assert cal["source"] == str(work / "calib.npy") and cal["seed"] == 0
    assert cal["available"] == 4 and cal["images"] == 4 and cal["indices"] == [0, 1, 2, 3]
    assert cal["activation_images"] == 4 and cal["fit_images"] == 4 and cal["method"] == "exact"
