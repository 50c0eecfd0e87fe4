#!/usr/bin/env python3
"""Reproduce the papers' accuracy table for any ONNX classifier and a labelled image folder.

    scripts/reproduce_table.py MODEL.onnx --images DIR --preprocess caffe [--out reports/NAME]
                               [--quick] [--max-drop 1 3] [--latency]

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
``--core``: the N sweep for exact and data-aware, the 4-bit-activation rows at N 4, 4- and
8-bit weights (no twn / cluster rows; for models whose simulation is slow on 2 cores).
N = 64 and N = C use min(N, C) per layer (``QuantConfig.clamp_group_size``). Layers the
policy keeps precise (first, last, depthwise) stay 8-bit in every row.

Accuracy comes from ``simulate``: the numpy reference pipeline, bit-exact with the compiled
library's integer layers. Calibration statistics are computed once and shared by every row.
The first ``--calib-limit`` images calibrate and are held out of the evaluation (unless
``--calib DIR``: then ``--calib-limit`` images sampled across it, seed 0). Writes ``table.csv`` (every config column, versions), ``table.md`` and PNG
plots under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from tvm_ternary import __version__, evaluate as ev
from tvm_ternary.numpy_graph import NumpyGraph
from tvm_ternary.onnx_io import load_model
from tvm_ternary.passes.onnx_normalize import normalize_onnx
from tvm_ternary.plan import QuantConfig, analyse, calibration_stats, make_plan, simulate
from tvm_ternary.plan.summary import plan_summary
from tvm_ternary.preprocess import PreprocessConfig, load_image_folder, preprocess_images

NS = (1, 2, 4, 8, 16, 64, "C")
COLUMNS = ["row", "weights", "method", "grouping", "N", "group_size", "act_bits", "act_calibration",
           "policy_budget", "top1", "top5", "drop_top1_points", "agreement_top1", "kl_divergence",
           "ternary_mac_share", "int4_mac_share", "multiplications_removed", "weight_bytes",
           "latency_ms", "plan_seconds", "n_eval", "n_calib", "model", "tvm_ternary", "tvm", "numpy",
           "onnx", "onnxruntime", "python"]


def rows(quick: bool, core: bool = False) -> list[dict]:
    """The pruned sweep (see the module docstring)."""
    def r(weights, method="data-aware", n=4, grouping="fgq", act=8, calib=None):
        return dict(weights=weights, method=method, N=n, grouping=grouping, act_bits=act, act_calibration=calib)

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
    return out


def to_config(row: dict, max_channels: int) -> QuantConfig:
    n = row["N"]
    size = max_channels if n == "C" else n
    return QuantConfig(weight_bits={"ternary": 2, "int4": 4, "int8": 8}[row["weights"]], group_size=size,
                       grouping=row["grouping"], method=row["method"], act_bits=row["act_bits"],
                       act_calibration=row["act_calibration"], clamp_group_size=True)


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


def measure_latency(onnx_model, plan, x_one: np.ndarray, repeats: int = 20) -> float:
    """Median ms of one compiled batch-1 run (compile_model with this plan)."""
    from tvm_ternary.compiler import compile_model

    compiled = compile_model(onnx_model, config=plan.config, calib_images=x_one, plan=plan, progress=False)
    compiled.run(x_one)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        compiled.run(x_one)
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def markdown(results: list[dict], header: list[str]) -> str:
    cols = ["weights", "acts", "N", "grouping", "method", "top-1", "top-5", "Δ top-1", "% MACs ternary",
            "% mult. removed", "weights MB", "latency ms"]
    lines = header + ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        acts = "fp32" if r["act_bits"] == "" else f"{r['act_bits']}-bit" + (f" ({r['act_calibration']})" if r["act_calibration"] else "")
        weights = r["weights"] + (f" ≤{r['policy_budget']:g} pt" if r["policy_budget"] != "" else "")
        per_channel = r["weights"] == "int8"
        cells = [weights, acts, "—" if per_channel else str(r["N"]), "per channel" if per_channel else r["grouping"],
                 r["method"], f"{100 * r['top1']:.1f}", f"{100 * r['top5']:.1f}",
                 f"{0.0 - r['drop_top1_points']:+.1f}" if r["row"] else "—",
                 f"{100 * r['ternary_mac_share']:.1f}", f"{100 * r['multiplications_removed']:.1f}",
                 f"{r['weight_bytes'] / 1e6:.2f}", "—" if r["latency_ms"] == "" else f"{r['latency_ms']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plots(results: list[dict], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = {"exact": "tab:red", "twn": "tab:orange", "data-aware": "tab:blue", "fp32": "black",
              "sensitivity": "tab:green"}
    markers = {8: "o", 4: "s", "": "*"}
    for key, xlabel, name in (("multiplications_removed", "% multiplications removed", "top1_vs_mult_removed.png"),
                              ("latency_ms", "latency, ms (batch 1)", "top1_vs_latency.png")):
        pts = [r for r in results if r[key] != ""]
        if key == "latency_ms" and len(pts) < 2:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=90)
        seen = set()
        for r in pts:
            label = f"{r['method']}, {r['act_bits'] or 'fp32'}-bit acts" if r["act_bits"] != "" else "fp32"
            x = 100 * r[key] if key == "multiplications_removed" else r[key]
            ax.scatter(x, 100 * r["top1"], c=colors.get(r["method"], "gray"), marker=markers[r["act_bits"]],
                       label=None if label in seen else label, alpha=0.8)
            seen.add(label)
            if r["weights"] == "ternary" and r["grouping"] == "fgq" and r["act_bits"] == 8:
                ax.annotate(f"N={r['N']}", (x, 100 * r["top1"]), fontsize=7, alpha=0.7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 %")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
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
    p.add_argument("--calib-limit", type=int, default=64)
    p.add_argument("--limit", type=int, help="evaluate at most N images")
    p.add_argument("--out", type=Path, help="report directory (default reports/<model name>)")
    p.add_argument("--quick", action="store_true", help="a small subset of rows")
    p.add_argument("--core", action="store_true", help="the N sweep and the main rows only")
    p.add_argument("--max-drop", type=float, nargs="*", default=(), metavar="P",
                   help="also the sensitivity policy at these budgets (points)")
    p.add_argument("--latency", action="store_true", help="compile the N=4 ternary and int8 rows and time them")
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
    results = [{**common, "row": 0, "weights": "fp32", "method": "fp32", "grouping": "", "N": "", "group_size": "",
                "act_bits": "", "act_calibration": "", "policy_budget": "", **fp32, "drop_top1_points": 0.0,
                "agreement_top1": 1.0, "kl_divergence": 0.0, "ternary_mac_share": 0.0, "int4_mac_share": 0.0,
                "multiplications_removed": 0.0, "weight_bytes": plan_summary_float(prep.model),
                "latency_ms": "", "plan_seconds": 0.0}]

    def record(row, plan, seconds, budget=""):
        q, _ = ev.run_batched(lambda b: simulate(plan, b), x_eval, batch=16, label=f"row {len(results)}")
        m = ev.compare(float_eval, q, labels=labels, label_offset=offset)
        s = plan_summary(plan)
        latency = ""
        if args.latency and row.get("time"):
            try:
                latency = measure_latency(onnx_model, plan, x_eval[:1])
            except Exception as error:  # reported, the row keeps its accuracy
                print(f"latency of row {len(results)} not measured: {type(error).__name__}: {error}", file=sys.stderr)
        res = {**common, **{k: row[k] for k in ("weights", "method", "grouping", "N", "act_bits")},
               "row": len(results), "act_calibration": plan.config.act_calibration_method,
               "group_size": plan.config.group_size, "policy_budget": budget, **m["quantized"],
               "drop_top1_points": 100 * (fp32["top1"] - m["quantized"]["top1"]),
               "agreement_top1": m["agreement_top1"], "kl_divergence": m["kl_divergence"],
               "ternary_mac_share": s["ternary_mac_share"], "int4_mac_share": s["int4_mac_share"],
               "multiplications_removed": s["multiplications_removed"], "weight_bytes": s["weight_bytes"],
               "latency_ms": latency, "plan_seconds": round(seconds, 1)}
        results.append(res)
        print(f"[{res['row']}] {row['weights']} {row['method']} N={row['N']} {row['grouping']} act{row['act_bits']} "
              f"{res['act_calibration']}{' budget ' + str(budget) if budget != '' else ''}: top-1 {res['top1']:.1%} "
              f"(drop {res['drop_top1_points']:.1f}), agreement {res['agreement_top1']:.1%}, "
              f"{res['ternary_mac_share']:.0%} MACs ternary, {seconds:.0f} s", flush=True)
        write(results, out, name, fp32_all, fp32, args)

    for row in rows(args.quick, args.core):
        row["time"] = row["N"] == 4 and row["act_bits"] == 8 and row["method"] in ("reconstruct",) and row["grouping"] == "fgq"
        start = time.perf_counter()
        plan = make_plan(prep.model, x_calib, config=to_config(row, max_c), stats=stats, progress=False)
        record(row, plan, time.perf_counter() - start)
    if args.max_drop:
        from tvm_ternary.plan.sensitivity import choose_precision

        start = time.perf_counter()
        # no shared stats: the policy calibrates on the images it does not hold out for its check
        result = choose_precision(prep.model, x_calib, config=QuantConfig(group_size=4), max_drops=tuple(args.max_drop))
        (out / "sensitivity.txt").write_text(result.table() + "\n")
        for choice in result.choices:
            row = dict(weights="mixed", method="sensitivity", N=4, grouping="fgq", act_bits=8)
            record(row, choice.plan, time.perf_counter() - start, budget=choice.max_drop)
    print(f"wrote {out}/table.csv, table.md and plots")
    return 0


def plan_summary_float(model) -> int:
    return int(sum(4 * l.weight.weight.size + 4 * l.weight.weight.shape[0] for l in analyse(model).layers))


def write(results, out: Path, name: str, fp32_all: dict, fp32: dict, args) -> None:
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    r0 = results[0]
    header = [
        f"# {name}: accuracy vs multiplications removed",
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
    (out / "table.md").write_text(markdown(results, header))
    plots(results, out, f"{name}: top-1 on {r0['n_eval']} images")


if __name__ == "__main__":
    sys.exit(main())
