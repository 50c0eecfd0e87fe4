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


@pytest.mark.parametrize("kind", ["full", "core", "acceptance"])
def test_rows_with_the_1x1_convs_at_n2(kind):
    """The sweeps a report is made of carry N 4 with the 1x1 convs at N 2, 8- and 4-bit activations;
    its config, N column and kernel key say so (a row at uniform N 4 builds other kernels)."""
    script = _script()
    rows = script.rows(quick=False, core=kind == "core", acceptance=kind == "acceptance")
    pw = [r for r in rows if r.get("pointwise_group_size") == 2]
    assert {(r["method"], r["N"], r["act_bits"]) for r in pw} == {("reconstruct", 4, 8), ("reconstruct", 4, 4)}
    config = script.to_config(pw[0], max_channels=64)
    assert config.group_size_of("x", pointwise=True) == 2 and config.group_size_of("x") == 4
    assert script.n_label(pw[0]) == "4 (1x1: 2)" and script.n_label(dict(pw[0], pointwise_group_size=None)) == "4"
    uniform = script.to_config(dict(pw[0], pointwise_group_size=None), max_channels=64)
    assert script.kernel_key(config) != script.kernel_key(uniform)
    assert script.short_label(dict(pw[0], policy_budget="")) == "T N4/1x1 N2 reconstruct a8"


def test_latency_column_peers_and_pareto_plot(tmp_path):
    """--latency: every row's library is built and timed by the bench code, rows with the same
    kernels share a build, and fp32 / ORT int8 / OpenVINO int8 are measured in the same run."""
    pytest.importorskip("matplotlib")
    import json

    model = tiny_cnn()
    onnx.save(model, tmp_path / "tiny.onnx")
    images = _write_folder(tmp_path / "images", model)
    out = tmp_path / "report"
    assert _script().main([str(tmp_path / "tiny.onnx"), "--images", str(images), "--preprocess", "unit",
                           "--calib-limit", "16", "--limit", "20", "--quick", "--latency",
                           "--latency-seconds", "0.05", "--out", str(out)]) == 0
    with open(out / "table.csv") as f:
        table = list(csv.DictReader(f))
    assert all(float(r["latency_ms"]) > 0 for r in table), [r["latency_ms"] for r in table]
    peers = [r["peer"] for r in table if r["peer"]]
    try:
        import openvino  # noqa: F401

        assert peers == ["fp32 (ORT)", "ORT int8 QDQ", "OpenVINO int8"]
    except ImportError:
        assert peers == ["fp32 (ORT)", "ORT int8 QDQ"]
    ours = [r for r in table if not r["peer"]]
    assert len(ours) == 8
    info = json.loads((out / "latency.json").read_text())
    # exact / data-aware / reconstruct at the same bits and N share the kernels: 4 builds for
    # the 8 quick rows
    assert len(info["libraries"]) == 4 and all(lib["threads"] == 1 for lib in info["libraries"])
    assert info["stamp"]["cpu"] and "loadavg_after" in info["stamp"]
    md = (out / "table.md").read_text()
    assert "top1_vs_latency.png" in md and "ORT int8 QDQ (peer)" in md
    assert (out / "top1_vs_latency.png").stat().st_size < 300_000


def test_labels_do_not_overlap_and_pareto_front():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    script = _script()
    assert script.pareto_front([(1, 50), (2, 60), (2, 40), (3, 55), (4, 70)]) == [(1, 50), (2, 60), (4, 70)]
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [(1.0, 50 + 0.2 * i) for i in range(8)] + [(1.05, 50.5), (2.0, 60.0)]  # a dense column
    ax.scatter(*zip(*pts))
    ax.margins(0.3)
    script.place_labels(ax, pts, [f"T N{i} da a8" for i in range(len(pts))])
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    boxes = []
    for t in ax.texts:
        t.update_positions(renderer)
        boxes.append(Text.get_window_extent(t, renderer))  # the text itself, not its leader line
    assert len(boxes) == len(pts)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)
