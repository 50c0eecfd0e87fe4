"""scripts/reproduce_table.py --quick on the tiny CNN: CSV, markdown and plots are written."""

import csv
import importlib.util
from pathlib import Path

import onnx
import pytest
from test_eval import _write_folder
from tiny_models import tiny_cnn

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "imagenet"


def _script():
    spec = importlib.util.spec_from_file_location("reproduce_table", REPO / "scripts" / "reproduce_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_table_on_tiny_model(tmp_path):
    pytest.importorskip("matplotlib")
    model = tiny_cnn()
    onnx.save(model, tmp_path / "tiny.onnx")
    images = _write_folder(tmp_path / "images", model)
    out = tmp_path / "report"
    assert _script().main([str(tmp_path / "tiny.onnx"), "--images", str(images), "--preprocess", "unit",
                           "--calib-limit", "16", "--limit", "30", "--quick", "--max-drop", "50",
                           "--out", str(out)]) == 0
    with open(out / "table.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 1 + 8 + 1  # fp32, the quick rows, one policy row
    # labels are the float model's predictions: images and labels stay aligned under --limit
    assert table[0]["weights"] == "fp32" and float(table[0]["top1"]) == 1.0 and table[0]["n_eval"] == "30"
    assert {r["method"] for r in table[1:]} == {"exact", "data-aware", "reconstruct", "sensitivity"}
    for key in ("tvm_ternary", "numpy", "onnx", "group_size", "act_calibration"):
        assert table[1][key] != ""
    md = (out / "table.md").read_text()
    assert "simulate" in md and "| ternary |" in md and "—" in md  # no latency without --latency
    png = out / "top1_vs_mult_removed.png"
    assert png.stat().st_size < 200_000 and (out / "sensitivity.txt").exists()


def test_rows_cover_the_sweep():
    rows = _script().rows(quick=False)
    ternary_fgq8 = {(r["method"], r["N"]) for r in rows if r["weights"] == "ternary" and r["act_bits"] == 8
                    and r["grouping"] == "fgq"}
    for n in (1, 2, 4, 8, 16, 64, "C"):
        assert {("exact", n), ("data-aware", n), ("reconstruct", n)} <= ternary_fgq8
    assert {r["weights"] for r in rows} == {"ternary", "int4", "int8"}
    assert any(r["grouping"] == "cluster" for r in rows) and any(r["act_bits"] == 4 for r in rows)
