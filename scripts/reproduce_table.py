#!/usr/bin/env python3
"""Reproduce the papers' accuracy table for any ONNX classifier and a labelled image folder.

    scripts/reproduce_table.py MODEL.onnx --images DIR --preprocess caffe [--out reports/NAME]
                               [--quick] [--max-drop 1 3] [--latency [--threads 1] [--no-peers]]

Rows (the full cross product is ~250 plans; this prunes it to what the papers compare):

* fp32 (ONNX Runtime, the reference);
* ternary, 8-bit activations: method {exact, data-aware, reconstruct} x N {1, 2, 4, 8, 16, 64, C}, fgq;
  twn at N 4 only (it tracks exact); cluster grouping at N 4 for exact and data-aware;
  data-aware N 4 with percentile-clipped 8-bit activations;
* ternary, 4-bit activations at N 4: data-aware with MSE and with percentile clipping, exact
  with MSE clipping;
* 4-bit weights (data-aware, N 4) and 8-bit weights (per channel), 8-bit activations;
  8-bit weights with 4-bit activations: minmax (no clipping), MSE, percentile;
* with ``--max-drop``: the sensitivity policy (ternary / 4-bit / 8-bit per layer) per budget.

``--quick``: N 4 only (exact and data-aware, 8- and 4-bit activations, 8-bit weights).
``--acceptance``: the rows issue 13's acceptance names (the default method at N 2 / 4 / 8, N 4 with
4-bit activations (MSE clipping)) with data-aware, exact and 8-bit weights at N 4 beside them,
and the default method at N 4 with the 1x1 convs at N 2 (``--pointwise-group-size 2``; N column
``4 (1x1: 2)``), 8- and 4-bit activations.
``--core``: the N sweep for exact and data-aware, the 4-bit-activation rows at N 4, 4- and
8-bit weights, the 1x1-at-N-2 rows (no twn / cluster rows; for models whose simulation is slow
on 2 cores).
N = 64 and N = C use min(N, C) per layer (``QuantConfig.clamp_group_size``). Layers the
policy keeps precise (first, last, depthwise) stay 8-bit in every row.

Accuracy comes from ``simulate``: the numpy reference pipeline, bit-exact with the compiled
library's integer layers. Calibration statistics are computed once and shared by every row.
The first ``--calib-limit`` images calibrate and are held out of the evaluation (unless
``--calib DIR``: then ``--calib-limit`` images sampled across it, seed 0). Writes ``table.csv`` (every config column, versions), ``table.md`` and PNG
plots under ``--out``.

``--latency``: every row's plan is compiled to a library, exported and timed by
``tvm_ternary.benchmark.bench_library`` (the code of ``tvm-ternary bench``: runtime-only load,
``--threads`` pool read back, median of the timed calls, batch 1). Rows whose kernels are the same
(same weight bits, group size, grouping and activation bits: the method and the activation
calibration change values, not code) share one build and one measurement. Reference points
measured in the same run, same thread count, same timing loop: fp32 (ONNX Runtime), ONNX Runtime
int8 static QDQ and OpenVINO int8 on that QDQ model (made as ``scripts/compile_and_measure.py``
makes them), with their own top-1 on the same images. Adds ``top1_vs_latency.png`` (Pareto
front) and ``latency.json`` (machine stamp, every measurement).
"""

from __future__ import annotations

import argparse
import csv
import platform
import sys
import time
from pathlib import Path

import numpy as np

from tvm_ternary import __version__, evaluate as ev
from tvm_ternary.benchmark import bench_library, latency_stats, machine_stamp, time_calls
from tvm_ternary.onnx_io import load_model
from tvm_ternary.passes.onnx_normalize import normalize_onnx
from tvm_ternary.plan import QuantConfig, analyse, calibration_stats, make_plan, simulate
from tvm_ternary.plan.config import CALIB_LIMIT
from tvm_ternary.plan.summary import plan_summary
from tvm_ternary.preprocess import PreprocessConfig, load_image_folder, preprocess_images

NS = (1, 2, 4, 8, 16, 64, "C")
COLUMNS = ["row", "weights", "method", "grouping", "N", "group_size", "pointwise_group_size", "act_bits",
           "act_calibration", "policy_budget", "peer", "top1", "top5", "drop_top1_points", "agreement_top1",
           "kl_divergence", "ternary_mac_share", "int4_mac_share", "multiplications_removed", "weight_bytes",
           "latency_ms", "plan_seconds", "n_eval", "n_calib", "model", "tvm_ternary", "tvm", "numpy",
           "onnx", "onnxruntime", "python"]


def rows(quick: bool, core: bool = False, acceptance: bool = False) -> list[dict]:
    """The pruned sweep (see the module docstring)."""
    def r(weights, method="data-aware", n=4, grouping="fgq", act=8, calib=None, pointwise=None):
        return dict(weights=weights, method=method, N=n, grouping=grouping, act_bits=act, act_calibration=calib,
                    pointwise_group_size=pointwise)

    # N 4 with the 1x1 convs at N 2 (where compact CNNs lose the most), 8- and 4-bit activations
    pointwise = [r("ternary", "reconstruct", pointwise=2), r("ternary", "reconstruct", act=4, calib="mse", pointwise=2)]
    if acceptance:
        return [r("ternary", "reconstruct", n) for n in (2, 4, 8)] + [
            r("ternary", "reconstruct", act=4, calib="mse"), r("ternary"), r("ternary", "exact"),
            r("int8", "exact")] + pointwise

    if quick:
        return [r("ternary", "exact"), r("ternary"), r("ternary", "reconstruct"), r("ternary", act=4, calib="mse"),
                r("ternary", "reconstruct", act=4, calib="mse"), r("ternary", "exact", act=4, calib="mse"),
                r("int8", "exact"), r("int8", "exact", act=4, calib="mse")]
    out = [r("ternary", m, n) for m in ("exact", "data-aware", "reconstruct") for n in NS]
    if not core:
        out += [r("ternary", "twn", 4), r("ternary", "data-aware", 4, calib="percentile")]
        out += [r("ternary", m, 4, "cluster") for m in ("exact", "data-aware", "reconstruct")]
    out += [r("ternary", m, 4, act=4, calib=c) for m in ("data-aware", "reconstruct") for c in ("mse", "percentile")]
    out += [r("ternary", "exact", 4, act=4, calib="mse"), r("int4", "data-aware", 4), r("int8", "exact")]
    out += [r("int8", "exact", act=4, calib=c) for c in (("mse",) if core else ("minmax", "mse", "percentile"))]
    return out + pointwise


def to_config(row: dict, max_channels: int) -> QuantConfig:
    n = row["N"]
    size = max_channels if n == "C" else n
    return QuantConfig(weight_bits={"ternary": 2, "int4": 4, "int8": 8}[row["weights"]], group_size=size,
                       grouping=row["grouping"], method=row["method"], act_bits=row["act_bits"],
                       act_calibration=row["act_calibration"], clamp_group_size=True,
                       pointwise_group_size=row.get("pointwise_group_size"))


def pointwise_of(row: dict):
    """The row's 1x1-conv N, or None (a sweep row holds None, a results row "" when unset)."""
    pointwise = row.get("pointwise_group_size")
    return None if pointwise in (None, "") else pointwise


def n_label(row: dict) -> str:
    """The N column: ``4``, or ``4 (1x1: 2)`` with the 1x1 convs at another N."""
    pointwise = pointwise_of(row)
    return f"{row['N']}" + ("" if pointwise is None else f" (1x1: {pointwise})")


def versions() -> dict:
    import onnx
    import onnxruntime

    try:
        from importlib.metadata import version

        tvm_v = version("apache-tvm")
    except Exception:  # a source build of TVM has no distribution metadata
        tvm_v = "unknown"
    return {"tvm_ternary": __version__, "tvm": tvm_v, "numpy": np.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def kernel_key(config: QuantConfig) -> tuple:
    """What decides the generated code of a plan (not the method or the activation calibration)."""
    return (config.weight_bits, config.group_size, config.pointwise_group_size, config.grouping, config.act_bits,
            config.code_bits, tuple(config.overrides), tuple(config.group_overrides))


class LatencyMeter:
    """Builds a row's library, exports it and times it as ``tvm-ternary bench`` does; one build
    and one measurement per :func:`kernel_key`."""

    def __init__(self, onnx_model, work: Path, *, threads: int, seconds: float):
        self.onnx_model, self.work, self.threads, self.seconds = onnx_model, work, threads, seconds
        self.cache: dict[tuple, dict] = {}
        self.records: list[dict] = []

    def __call__(self, plan, x_one: np.ndarray, name: str) -> dict:
        key = kernel_key(plan.config)
        if key not in self.cache:
            from tvm_ternary.compiler import compile_model

            compiled = compile_model(self.onnx_model, config=plan.config, calib_images=x_one, plan=plan,
                                     progress=False)
            path = self.work / f"{len(self.cache)}.so"
            compiled.export(path)
            result = bench_library(path, threads=self.threads, seconds=self.seconds)
            result.pop("stamp")
            self.cache[key] = dict(result, row=name, library_bytes=path.stat().st_size)
            self.records.append(self.cache[key])
        return self.cache[key]


def peer_rows(prep, x_calib: np.ndarray, x_eval: np.ndarray, labels, *, offset: int, float_eval: np.ndarray,
              threads: int, seconds: float, work: Path) -> tuple[dict, list[dict], list[str]]:
    """fp32 ORT latency, and the int8 peers' top-1 and latency: ``(fp32 latency, rows, notes)``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _bench_common import ort_int8_qdq
    from compile_and_measure import float_model, openvino_runner, ort_session

    import onnx

    fp32_path = work / "fp32.onnx"
    onnx.save(float_model(prep), str(fp32_path))
    name_in, x_one = prep.input_name, x_eval[:1]
    int8_path = ort_int8_qdq(fp32_path, work / "int8.onnx", input_name=name_in, images=x_calib)

    def timed(fn) -> dict:
        return latency_stats(time_calls(lambda: fn(x_one), warmup=10, seconds=seconds), batch=1)

    def ort_fn(path):
        sess = ort_session(path, threads)
        return lambda x: sess.run(None, {name_in: x})[0]

    fp32_latency = timed(ort_fn(fp32_path))
    runners = {"ORT int8 QDQ": ("onnxruntime", ort_fn(int8_path))}
    notes = []
    try:
        ov = openvino_runner(int8_path, threads)
        runners["OpenVINO int8"] = ("openvino", lambda x: next(iter(ov(x).values())))
    except ImportError:
        notes.append("OpenVINO int8 not measured: openvino not installed (pip install -e '.[openvino]')")
    rows = []
    for label, (method, fn) in runners.items():
        scores, _ = ev.run_batched(lambda b: np.concatenate([fn(b[i : i + 1]) for i in range(len(b))]),
                                   x_eval, batch=16, label=label)
        m = ev.compare(float_eval, scores, labels=labels, label_offset=offset)
        rows.append({"label": label, "method": method, **m["quantized"], "agreement_top1": m["agreement_top1"],
                     "kl_divergence": m["kl_divergence"], "latency": timed(fn),
                     "model_bytes": int8_path.stat().st_size})
    return fp32_latency, rows, notes


def markdown(results: list[dict], header: list[str]) -> str:
    cols = ["weights", "acts", "N", "grouping", "method", "top-1", "top-5", "Δ top-1", "% MACs ternary",
            "% mult. removed", "weights MB", "latency ms"]
    lines = header + ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        acts = "fp32" if r["act_bits"] == "" else f"{r['act_bits']}-bit" + (f" ({r['act_calibration']})" if r["act_calibration"] else "")
        weights = r["weights"] + (f" ≤{r['policy_budget']:g} pt" if r["policy_budget"] != "" else "")
        if r.get("peer"):
            weights = f"{r['peer']} (peer)"
        per_channel = r["weights"] == "int8"
        cells = [weights, acts, "—" if per_channel else n_label(r), "per channel" if per_channel else r["grouping"],
                 r["method"], f"{100 * r['top1']:.1f}", f"{100 * r['top5']:.1f}",
                 f"{0.0 - r['drop_top1_points']:+.1f}" if r["row"] else "—",
                 f"{100 * r['ternary_mac_share']:.1f}", f"{100 * r['multiplications_removed']:.1f}",
                 f"{r['weight_bytes'] / 1e6:.2f}", "—" if r["latency_ms"] == "" else f"{r['latency_ms']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def short_label(r: dict) -> str:
    """A point's setting in a few characters: ``T N4 da a8``, ``int8 a4 mse``, ``mixed ≤1``."""
    if r.get("peer"):
        return r["peer"]
    if r["weights"] == "fp32":
        return "fp32"
    method = {"data-aware": "da", "exact": "ex", "twn": "twn", "sensitivity": "sens"}.get(r["method"], r["method"])
    weights = {"ternary": "T", "int4": "W4", "int8": "W8", "mixed": "mixed"}.get(r["weights"], r["weights"])
    parts = [weights]
    if r["weights"] == "mixed":
        parts.append(f"≤{r['policy_budget']:g}pt")
    elif r["weights"] != "int8":
        pointwise = pointwise_of(r)
        parts.append(f"N{r['N']}" + ("c" if r["grouping"] == "cluster" else "")
                     + ("" if pointwise is None else f"/1x1 N{pointwise}"))
    parts += [method, f"a{r['act_bits']}"]
    calib = r["act_calibration"]
    if calib and calib != ("minmax" if r["act_bits"] == 8 else "mse"):
        parts.append({"percentile": "pct", "minmax": "minmax"}.get(calib, calib))
    return " ".join(parts)


def place_labels(ax, points: list[tuple[float, float]], texts: list[str], *, fontsize: float = 6.5) -> None:
    """Annotate each point with its text where it overlaps no other label, no marker and stays
    inside the axes: candidate offsets in 8 directions at growing distances, first free one wins
    (far ones get a leader line). Greedy, in order of the points' y so dense columns fan out."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    markers = [ax.transData.transform(pt) for pt in points]
    r_px = 4.0
    taken = []
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    for mx, my in markers:
        taken.append(Bbox([[mx - r_px, my - r_px], [mx + r_px, my + r_px]]))
    if ax.get_legend() is not None:
        taken.append(ax.get_legend().get_window_extent(renderer))
    directions = [(1, 0), (1, 1), (1, -1), (-1, 0), (-1, 1), (-1, -1), (0, 1), (0, -1)]
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    for i in order:
        placed = None
        for dist in (5, 10, 16, 24, 34, 46, 60, 80, 100, 130):
            for dx, dy in directions:
                ha = "left" if dx > 0 else "right" if dx < 0 else "center"
                va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
                ann = ax.annotate(texts[i], points[i], xytext=(dx * dist, dy * dist * 0.7), textcoords="offset points",
                                  fontsize=fontsize, ha=ha, va=va, alpha=0.85,
                                  arrowprops=dict(arrowstyle="-", lw=0.4, alpha=0.5) if dist > 10 else None)
                ann.update_positions(renderer)
                box = Text.get_window_extent(ann, renderer).expanded(1.04, 1.15)  # the text, not its leader
                inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
                if inside and not any(box.overlaps(t) for t in taken):
                    placed = box
                    break
                ann.remove()
            if placed is not None:
                break
        if placed is None:  # nowhere free: the nearest place, still labelled
            ann = ax.annotate(texts[i], points[i], xytext=(5, 0), textcoords="offset points", fontsize=fontsize,
                              va="center", alpha=0.85)
            ann.update_positions(renderer)
            placed = Text.get_window_extent(ann, renderer)
        taken.append(placed)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both lower latency and higher top-1, by latency."""
    front, best = [], -float("inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def plots(results: list[dict], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = {"exact": "tab:red", "twn": "tab:orange", "data-aware": "tab:blue", "fp32": "black",
              "sensitivity": "tab:green", "onnxruntime": "tab:purple", "openvino": "tab:brown"}
    markers = {8: "o", 4: "s", "": "*"}
    for key, xlabel, name in (("multiplications_removed", "% multiplications removed", "top1_vs_mult_removed.png"),
                              ("latency_ms", "latency, ms (batch 1; lower is better)", "top1_vs_latency.png")):
        pts = [r for r in results if r[key] != ""]
        if key == "latency_ms" and len(pts) < 2:
            continue
        fig, ax = plt.subplots(figsize=(9, 6), dpi=100)
        seen = set()
        xy, texts = [], []
        for r in pts:
            if r.get("peer"):
                label = r["peer"]
            else:
                label = f"{r['method']}, {r['act_bits']}-bit acts" if r["act_bits"] != "" else "fp32"
            x = 100 * r[key] if key == "multiplications_removed" else r[key]
            marker = "D" if r.get("peer") and r["weights"] != "fp32" else markers[r["act_bits"]]
            size = 90 if r["weights"] == "fp32" or r.get("peer") else 30
            ax.scatter(x, 100 * r["top1"], c=colors.get(r["method"], "gray"), marker=marker, s=size,
                       label=None if label in seen else label, alpha=0.85, zorder=3)
            seen.add(label)
            xy.append((x, 100 * r["top1"]))
            texts.append(short_label(r))
        if key == "latency_ms":
            front = pareto_front(xy)
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", ls="--", lw=0.8, c="gray",
                    alpha=0.7, label="Pareto front", zorder=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 %")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.margins(x=0.12, y=0.08)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        place_labels(ax, xy, texts)
        fig.savefig(out / name)
        plt.close(fig)
        written.append(out / name)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--images", required=True)
    p.add_argument("--preprocess", choices=("torchvision", "caffe", "unit"))
    p.add_argument("--mean", type=lambda s: tuple(float(v) for v in s.split(",")))
    p.add_argument("--std", type=lambda s: tuple(float(v) for v in s.split(",")))
    p.add_argument("--bgr", action="store_true", default=None)
    p.add_argument("--calib", help="calibration folder (default: held-out head of --images)")
    p.add_argument("--calib-limit", type=int, default=CALIB_LIMIT,
                   help=f"calibration images (default {CALIB_LIMIT}, the compiler's default)")
    p.add_argument("--limit", type=int, help="evaluate at most N images")
    p.add_argument("--out", type=Path, help="report directory (default reports/<model name>)")
    p.add_argument("--quick", action="store_true", help="a small subset of rows")
    p.add_argument("--core", action="store_true", help="the N sweep and the main rows only")
    p.add_argument("--acceptance", action="store_true",
                   help="reconstruct at N 2/4/8 and with 4-bit activations, data-aware, exact and int8 at N 4")
    p.add_argument("--max-drop", type=float, nargs="*", default=(), metavar="P",
                   help="also the sensitivity policy at these budgets (points)")
    p.add_argument("--latency", action="store_true",
                   help="build every row's library and time it (the code of tvm-ternary bench), with fp32 and "
                        "the int8 peers (ONNX Runtime QDQ, OpenVINO) as reference points")
    p.add_argument("--threads", type=int, default=1, help="thread count of every latency measurement (default 1)")
    p.add_argument("--latency-seconds", type=float, default=2.0, metavar="S",
                   help="time each library / peer for S seconds (default 2)")
    p.add_argument("--no-peers", action="store_true", help="with --latency: skip the ORT / OpenVINO int8 points")
    args = p.parse_args(argv)
    if args.preprocess is None and args.mean is None and args.std is None and args.bgr is None:
        p.error("say how to preprocess: --preprocess torchvision|caffe|unit or --mean/--std/--bgr")

    name = Path(args.model).stem
    out = args.out or Path("reports") / name
    out.mkdir(parents=True, exist_ok=True)
    onnx_model = load_model(args.model)
    prep = normalize_onnx(onnx_model)
    pre = PreprocessConfig.from_options(preset=args.preprocess, mean=args.mean, std=args.std, bgr=args.bgr)
    all_paths, all_labels = load_image_folder(args.images)
    if all_labels is None:
        p.error(f"{args.images} has no labels.txt")
    if args.calib:
        calib_paths, _ = load_image_folder(args.calib, limit=args.calib_limit, sample_seed=0)
        eval_paths, labels = all_paths, all_labels
    else:
        calib_paths = all_paths[: args.calib_limit]
        eval_paths, labels = all_paths[args.calib_limit :], all_labels[args.calib_limit :]
    eval_paths, labels = eval_paths[: args.limit], labels[: args.limit]
    load = lambda paths: preprocess_images(paths, config=pre, input_shape=prep.input_shape)  # noqa: E731
    x_all, x_calib = load(all_paths), load(calib_paths)
    first = 0 if args.calib else len(calib_paths)  # where the evaluated images start in x_all
    x_eval = x_all[first : first + len(eval_paths)]

    float_all, _ = ev.run_batched(ev.onnxruntime_runner(prep.model), x_all, batch=16, label="fp32 (ORT)")
    offset = ev.default_label_offset(float_all.shape[1])
    float_eval = float_all[first : first + len(eval_paths)]
    fp32_all = ev.accuracy(float_all, all_labels, label_offset=offset)
    fp32 = ev.accuracy(float_eval, labels, label_offset=offset)
    max_c = max(l.weight.in_channels_per_group for l in analyse(prep.model).layers)
    stats = calibration_stats(prep.model, x_calib)
    ver = versions()
    common = {"n_eval": len(eval_paths), "n_calib": len(calib_paths), "model": name, **ver}
    meter = peers = None
    if args.latency:
        import tempfile

        work = Path(tempfile.mkdtemp(prefix="reproduce_table_"))
        stamp = machine_stamp(args.threads)
        meter = LatencyMeter(onnx_model, work, threads=args.threads, seconds=args.latency_seconds)
        if args.no_peers:
            fp32_run = ev.onnxruntime_runner(prep.model)
            peers = (latency_stats(time_calls(lambda: fp32_run(x_eval[:1]), seconds=args.latency_seconds), batch=1),
                     [], ["int8 peers not measured (--no-peers)"])
        else:
            peers = peer_rows(prep, x_calib, x_eval, labels, offset=offset, float_eval=float_eval,
                              threads=args.threads, seconds=args.latency_seconds, work=work)
    results = [{**common, "row": 0, "weights": "fp32", "method": "fp32", "grouping": "", "N": "", "group_size": "",
                "pointwise_group_size": "", "act_bits": "", "act_calibration": "", "policy_budget": "", "peer": "fp32 (ORT)" if peers else "", **fp32, "drop_top1_points": 0.0,
                "agreement_top1": 1.0, "kl_divergence": 0.0, "ternary_mac_share": 0.0, "int4_mac_share": 0.0,
                "multiplications_removed": 0.0, "weight_bytes": plan_summary_float(prep.model),
                "latency_ms": peers[0]["median_ms"] if peers else "", "plan_seconds": 0.0}]
    for peer in (peers[1] if peers else []):
        results.append({**common, "row": len(results), "weights": "int8", "method": peer["method"],
                        "grouping": "per channel", "N": "", "group_size": "", "pointwise_group_size": "", "act_bits": 8,
                        "act_calibration": "minmax", "policy_budget": "", "top1": peer["top1"], "top5": peer["top5"],
                        "drop_top1_points": 100 * (fp32["top1"] - peer["top1"]),
                        "agreement_top1": peer["agreement_top1"], "kl_divergence": peer["kl_divergence"],
                        "ternary_mac_share": 0.0, "int4_mac_share": 0.0, "multiplications_removed": 0.0,
                        "weight_bytes": plan_summary_float(prep.model) // 4,
                        "latency_ms": peer["latency"]["median_ms"], "plan_seconds": 0.0, "peer": peer["label"]})
        print(f"[{len(results) - 1}] {peer['label']}: top-1 {peer['top1']:.1%}, "
              f"{peer['latency']['median_ms']:.2f} ms", flush=True)

    def record(row, plan, seconds, budget=""):
        q, _ = ev.run_batched(lambda b: simulate(plan, b), x_eval, batch=16, label=f"row {len(results)}")
        m = ev.compare(float_eval, q, labels=labels, label_offset=offset)
        s = plan_summary(plan)
        latency = ""
        if meter is not None:
            try:
                latency = meter(plan, x_eval[:1], name=f"row {len(results)}")["median_ms"]
            except Exception as error:  # reported, the row keeps its accuracy
                print(f"latency of row {len(results)} not measured: {type(error).__name__}: {error}", file=sys.stderr)
        res = {**common, **{k: row[k] for k in ("weights", "method", "grouping", "N", "act_bits")},
               "row": len(results), "act_calibration": plan.config.act_calibration_method,
               "group_size": plan.config.group_size, "policy_budget": budget,
               "pointwise_group_size": "" if plan.config.pointwise_group_size is None
               else plan.config.pointwise_group_size, **m["quantized"],
               "drop_top1_points": 100 * (fp32["top1"] - m["quantized"]["top1"]),
               "agreement_top1": m["agreement_top1"], "kl_divergence": m["kl_divergence"],
               "ternary_mac_share": s["ternary_mac_share"], "int4_mac_share": s["int4_mac_share"],
               "multiplications_removed": s["multiplications_removed"], "weight_bytes": s["weight_bytes"],
               "latency_ms": latency, "plan_seconds": round(seconds, 1)}
        results.append(res)
        print(f"[{res['row']}] {row['weights']} {row['method']} N={n_label(row)} {row['grouping']} act{row['act_bits']} "
              f"{res['act_calibration']}{' budget ' + str(budget) if budget != '' else ''}: top-1 {res['top1']:.1%} "
              f"(drop {res['drop_top1_points']:.1f}), agreement {res['agreement_top1']:.1%}, "
              f"{res['ternary_mac_share']:.0%} MACs ternary, {seconds:.0f} s"
              + (f", {latency:.2f} ms" if latency != "" else ""), flush=True)
        write(results, out, name, fp32_all, fp32, args, latency_info)

    latency_info = None
    if meter is not None:
        latency_info = {"stamp": stamp, "threads": args.threads, "seconds_per_point": args.latency_seconds,
                        "fp32_ort": peers[0], "peers": peers[1], "notes": peers[2], "libraries": meter.records,
                        "command": " ".join(sys.argv)}
    for row in rows(args.quick, args.core, args.acceptance):
        start = time.perf_counter()
        plan = make_plan(prep.model, x_calib, config=to_config(row, max_c), stats=stats, progress=False)
        record(row, plan, time.perf_counter() - start)
    if args.max_drop:
        from tvm_ternary.plan.sensitivity import choose_precision

        start = time.perf_counter()
        from tvm_ternary.inputs import policy_check_set
        from tvm_ternary.plan.sensitivity import CHECK_IMAGES

        # as compile/eval --max-drop: checked on --calib images calibration did not take
        # (labelled when the folder is); without --calib the policy holds some out itself
        check = None if not args.calib else policy_check_set(
            Path(args.calib), calibration={"files": [p.name for p in calib_paths]}, preprocess=pre,
            input_shape=prep.input_shape, limit=CHECK_IMAGES, seed=0)
        result = choose_precision(prep.model, x_calib, config=QuantConfig(group_size=4),
                                  max_drops=tuple(args.max_drop), check=check, stats=stats if check else None)
        (out / "sensitivity.txt").write_text(result.table() + "\n")
        for choice in result.choices:
            row = dict(weights="mixed", method="sensitivity", N=4, grouping="fgq", act_bits=8)
            record(row, choice.plan, time.perf_counter() - start, budget=choice.max_drop)
    if latency_info is not None:
        import json

        latency_info["stamp"]["loadavg_after"] = [round(v, 2) for v in __import__("os").getloadavg()]
        (out / "latency.json").write_text(json.dumps(latency_info, indent=1, default=str))
        write(results, out, name, fp32_all, fp32, args, latency_info)
    print(f"wrote {out}/table.csv, table.md and plots")
    return 0


def plan_summary_float(model) -> int:
    return int(sum(4 * l.weight.weight.size + 4 * l.weight.weight.shape[0] for l in analyse(model).layers))


def write(results, out: Path, name: str, fp32_all: dict, fp32: dict, args, latency_info=None) -> None:
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    r0 = results[0]
    header = [
        f"# {name}: accuracy vs multiplications removed" + (" and latency" if latency_info else ""),
        "",
        f"Images: `{args.images}`; {r0['n_eval']} evaluated, {r0['n_calib']} calibration images "
        f"({'from ' + args.calib if args.calib else 'the first ' + str(r0['n_calib']) + ', held out'}).",
        f"fp32 (ONNX Runtime) top-1 {100 * fp32['top1']:.1f}% / top-5 {100 * fp32['top5']:.1f}% on the evaluated "
        f"images; {100 * fp32_all['top1']:.1f}% / {100 * fp32_all['top5']:.1f}% on all of them.",
        "Quantized accuracy from `simulate`, the numpy reference pipeline that is bit-exact with the "
        "compiled library's integer layers. First conv, classifier and depthwise convs stay 8-bit in every "
        "row; 'N = C' and N larger than a layer's channels mean one group per kernel position.",
        f"Versions: tvm_ternary {r0['tvm_ternary']}, TVM {r0['tvm']}, numpy {r0['numpy']}, onnx {r0['onnx']}, "
        f"onnxruntime {r0['onnxruntime']}, Python {r0['python']}.",
    ]
    if latency_info is not None:
        st = latency_info["stamp"]
        header += [
            f"Latency: batch 1, {latency_info['threads']} thread(s), median over {latency_info['seconds_per_point']:g} s "
            "of calls per library, timed by `tvm_ternary.benchmark.bench_library` (what `tvm-ternary bench` runs) "
            "on the exported library; fp32 and the int8 peers (ONNX Runtime static QDQ, u8 activations / s8 "
            "per-channel weights; OpenVINO on that QDQ model) with the same loop in the same run. Rows with the "
            "same kernels (weight bits, N, grouping, activation bits) share one build and measurement. "
            f"Host: {st['cpu']} ({st['llvm_cpu']}), {st['cores']} logical CPUs, {' '.join(st['isa_flags'])}; "
            f"load average {st['loadavg']} before" + (f", {st['loadavg_after']} after" if "loadavg_after" in st else "")
            + " (a shared machine: read the latencies with the load).",
        ]
        header += [f"Note: {n}" for n in latency_info["notes"]]
        header += ["", "![top-1 vs latency](top1_vs_latency.png)"]
    (out / "table.md").write_text(markdown(results, header))
    plots(results, out, f"{name}: top-1 on {r0['n_eval']} images"
          + (f"; latency batch 1, {latency_info['threads']} thread(s)" if latency_info else ""))


if __name__ == "__main__":
    sys.exit(main())
