"""The public Python API (``tvm_ternary.compile`` / ``load`` / ``QuantConfig``): its docstring
examples run here on a tiny model, the compiled and the loaded library agree bit for bit,
arguments are validated before any work, and ``import tvm_ternary`` stays light."""

import doctest
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from tiny_models import tiny_cnn, tiny_images

import tvm_ternary as tt
from tvm_ternary import api
from tvm_ternary.errors import OptionError, UserError


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """model.onnx, calib.npy and model.so (compiled once) in a folder, as the examples assume."""
    d = tmp_path_factory.mktemp("api")
    onnx.save(tiny_cnn(), d / "model.onnx")
    np.save(d / "calib.npy", tiny_images(4))
    tt.compile(d / "model.onnx", calib=d / "calib.npy", config=tt.QuantConfig(method="exact"),
               progress=False).export(d / "model.so")
    return d


def test_docstring_examples_run(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    result = doctest.testmod(api, globs={**vars(api), "x": tiny_images(2, seed=3)})
    assert result.attempted >= 10 and result.failed == 0
    assert (workdir / "exported.so").is_file() and (workdir / "exported.so.json").is_file()


def test_compiled_and_loaded_agree_and_metadata(workdir):
    x = tiny_images(3, seed=5)
    m = tt.compile(str(workdir / "model.onnx"), calib=np.load(workdir / "calib.npy"),
                   config=tt.QuantConfig(method="exact"), preprocess="caffe", progress=False)
    meta = m.export(workdir / "again.so")
    loaded = tt.load(workdir / "again.so")
    np.testing.assert_array_equal(m.run(x), loaded.run(x))  # same integer code, same numbers
    assert loaded.metadata == json.loads(json.dumps(meta)) and meta["preprocess"]["name"] == "caffe"
    assert [r["layer"] for r in m.coverage] == [r["layer"] for r in meta["coverage"]]
    assert all(r["status"] == "kernel" for r in m.coverage)


BAD = {
    "config_dict": (dict(config={"group_size": 4}), OptionError, "config must be a tvm_ternary.QuantConfig"),
    "model_int": (dict(model=3), OptionError, "model must be an ONNX file path"),
    "calib_list": (dict(calib=[1, 2]), OptionError, "calib must be an image array"),
    "calib_missing": (dict(calib="nowhere.npy"), UserError, "cannot read calibration array"),
    "folder_no_preprocess": (dict(calib="."), OptionError, "need preprocess="),
    "preprocess_unknown": (dict(preprocess="imagenet"), OptionError, "preprocess must be one of"),
    "calib_limit": (dict(calib_limit=0), OptionError, "calib_limit must be a positive integer"),
    "target": (dict(target="no-such-cpu"), OptionError, "not a CPU LLVM knows"),
    "calib_shape": (dict(calib=tiny_images(2, size=8)), UserError, "does not fit the model input"),
    "max_drop_negative": (dict(max_drop=-1), OptionError, "max_drop must be a number of points"),
    "max_drop_bits": (dict(max_drop=1, config=tt.QuantConfig(weight_bits=4)), OptionError,
                      "leave weight_bits at 2"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arguments_raise_before_work(case, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    kwargs, error, match = BAD[case]
    kwargs = {"model": "model.onnx", "calib": "calib.npy", **kwargs}
    with pytest.raises(error, match=match):
        tt.compile(kwargs.pop("model"), **kwargs, progress=False)


def test_max_drop_compiles_the_policy_plan(workdir):
    """An unbounded budget makes every eligible layer ternary; a zero one may keep none. The
    library runs the policy's plan (its per-layer overrides are in the config it records)."""
    from tvm_ternary.plan import simulate

    calib = tiny_images(32, seed=4)
    m = tt.compile(workdir / "model.onnx", calib=calib, config=tt.QuantConfig(method="exact"),
                   max_drop=100, progress=False)
    eligible = {"fire_squeeze", "fire_e1", "fire_e3", "res_a", "res_b"}
    assert {n for n, lp in m.plan.layers.items() if lp.weights.bits == 2} == eligible
    assert dict(m.plan.config.overrides).keys() >= eligible
    x = tiny_images(2, seed=6)
    # float tolerance: the model's global average pool and fc run in float after the integer
    # region, and TVM sums the pool in another order than numpy
    np.testing.assert_allclose(m.run(x), simulate(m.plan, x), rtol=1e-4, atol=1e-4)


def test_keyword_only_and_run_checks_shape(workdir):
    with pytest.raises(TypeError):
        tt.compile(workdir / "model.onnx", workdir / "calib.npy")  # calib is keyword-only
    with pytest.raises(UserError, match="does not match the model's"):
        tt.load(workdir / "model.so").run(tiny_images(1, size=8))


def test_import_is_light():
    code = "import sys, tvm_ternary as tt; print('tvm' in sys.modules, 'onnx' in sys.modules, callable(tt.load))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "True"]


def test_a_bad_model_is_refused_before_tvm_is_imported(tmp_path):
    """The model and the policy are checked before the target (whose check imports TVM, 5-8 s
    on 2 cores): a wrong file is a quick one-line error."""
    bad = tmp_path / "notes.onnx"
    bad.write_text("not a model")
    code = ("import sys, tvm_ternary as tt\n"
            "from tvm_ternary.errors import UserError\n"
            "try:\n    tt.compile(sys.argv[1], calib=None)\n"
            "except UserError as e:\n    print('tvm' in sys.modules, 'not an ONNX model' in str(e))\n")
    out = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"], out.stdout + out.stderr
