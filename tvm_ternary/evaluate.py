"""Accuracy check: class scores of a float and a quantized model on labelled images.

Shared by ``tvm-ternary eval``, the sensitivity policy and ``scripts/reproduce_table.py``.
Outputs may be logits or probabilities (a model ending in Softmax), ``[N, C]`` or
``[N, C, 1, 1]``; a 1001-class model (class 0 = background) is scored with ``label_offset=1``.

Example::

    >>> import numpy as np
    >>> ref = np.array([[0.1, 0.9], [0.8, 0.2]]); quant = np.array([[0.3, 0.7], [0.4, 0.6]])
    >>> m = compare(ref, quant, labels=[1, 0])
    >>> m["float"]["top1"], m["quantized"]["top1"], m["agreement_top1"]
    (1.0, 0.5, 0.5)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from .errors import UserError
from .progress import progress as progress_bar

# Guard: with this many labelled images, a float top-1 under this is no model's real accuracy.
# (SqueezeNet fed torchvision-normalised input scores 0.3%; any real ImageNet model scores >50%.)
WRONG_PREPROCESS_TOP1 = 0.05
WRONG_PREPROCESS_MIN_IMAGES = 50


def class_scores(outputs: np.ndarray) -> np.ndarray:
    """``[N, C]`` float64 from ``[N, C]`` / ``[N, C, 1, 1]`` model outputs."""
    y = np.asarray(outputs)
    if y.ndim < 2 or int(np.prod(y.shape[2:], dtype=np.int64)) != 1:
        raise UserError(f"expected class scores [N, C] or [N, C, 1, 1], the model outputs {list(y.shape)}")
    return y.reshape(y.shape[0], y.shape[1]).astype(np.float64)


def is_probability(scores: np.ndarray) -> bool:
    """Whether rows already are a distribution (the model ends in Softmax)."""
    s = np.asarray(scores, np.float64)
    return bool(s.size) and bool(np.all(s >= -1e-6)) and bool(np.allclose(s.sum(axis=1), 1.0, atol=1e-2))


def probabilities(scores: np.ndarray, *, already: bool | None = None) -> np.ndarray:
    """Softmax of logits; probabilities are renormalised only (a quantized softmax drifts)."""
    s = np.asarray(scores, np.float64)
    if already if already is not None else is_probability(s):
        s = np.clip(s, 0.0, None)
        return s / np.maximum(s.sum(axis=1, keepdims=True), 1e-300)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def default_label_offset(num_classes: int) -> int:
    """1 for 1001-class models (TF-slim style, class 0 = background), else 0."""
    return 1 if num_classes == 1001 else 0


def topk(scores: np.ndarray, k: int, *, label_offset: int = 0) -> np.ndarray:
    """``[N, k]`` predicted labels, best first (class index minus ``label_offset``)."""
    s = np.asarray(scores)
    k = min(k, s.shape[1])
    idx = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, idx, axis=1), axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1) - label_offset


def accuracy(scores: np.ndarray, labels: Sequence[int], *, label_offset: int = 0) -> dict:
    """top-1 / top-5 as fractions."""
    lab = np.asarray(labels)[:, None]
    top = topk(scores, 5, label_offset=label_offset)
    return {"top1": float(np.mean(top[:, :1] == lab)), "top5": float(np.mean(np.any(top == lab, axis=1)))}


def compare(float_scores: np.ndarray, quant_scores: np.ndarray, *, labels: Sequence[int] | None,
            label_offset: int = 0) -> dict:
    """Accuracy of both (None without labels), top-1 agreement and mean KL(float || quant)."""
    f, q = class_scores(float_scores), class_scores(quant_scores)
    if f.shape != q.shape:
        raise UserError(f"float and quantized outputs differ in shape: {f.shape} vs {q.shape}")
    pf, pq = probabilities(f), probabilities(q)
    kl = np.sum(pf * (np.log(pf + 1e-12) - np.log(pq + 1e-12)), axis=1)
    out = {
        "float": None if labels is None else accuracy(f, labels, label_offset=label_offset),
        "quantized": None if labels is None else accuracy(q, labels, label_offset=label_offset),
        "agreement_top1": float(np.mean(f.argmax(1) == q.argmax(1))),
        "kl_divergence": float(np.mean(kl)),
        "n_images": int(len(f)),
    }
    return out


def preprocessing_warning(metrics: dict, *, preprocess_name: str, label_offset: int) -> str | None:
    """The wrong-preprocessing guard: a float top-1 no real classifier scores."""
    acc = metrics.get("float")
    if acc is None or metrics["n_images"] < WRONG_PREPROCESS_MIN_IMAGES or acc["top1"] >= WRONG_PREPROCESS_TOP1:
        return None
    return (f"float top-1 is {acc['top1']:.1%} on {metrics['n_images']} images: the float model "
            f"itself is wrong, so the inputs likely are. Check --preprocess (used: {preprocess_name}; "
            "Caffe-trained models such as SqueezeNet 1.1 want 'caffe' = BGR 0-255 minus mean, "
            "PyTorch models 'torchvision'), --bgr, and the label offset (used: "
            f"{label_offset}; 1001-class models need --label-offset 1)")


def overlap_warning(calib_paths: Sequence, eval_paths: Sequence) -> str | None:
    """Calibration images among the evaluated ones flatter the quantized model."""
    from pathlib import Path

    def key(p):
        return Path(p).resolve()

    shared = {key(p) for p in calib_paths} & {key(p) for p in eval_paths}
    if not shared:
        return None
    return (f"{len(shared)} of the {len(eval_paths)} evaluated images are also calibration images "
            "(the quantized model was fitted on them): its accuracy is optimistic; calibrate on a "
            "separate folder (--calib DIR) or let eval hold the first --calib-limit images out")


def run_batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, *, batch: int, label: str,
                progress: bool = True) -> tuple[np.ndarray, float]:
    """``fn`` over ``x`` in batches with a progress bar; (stacked outputs, images per second)."""
    outs = []
    start = time.perf_counter()
    with progress_bar(len(x), desc=label, unit="images", enabled=progress) as bar:
        for i in range(0, len(x), batch):
            outs.append(class_scores(fn(x[i : i + batch])))
            bar.update(len(outs[-1]))
    seconds = time.perf_counter() - start
    return np.concatenate(outs) if outs else np.zeros((0, 0)), len(x) / max(seconds, 1e-9)


def onnxruntime_runner(model) -> Callable[[np.ndarray], np.ndarray]:
    """fp32 ONNX Runtime (the independent float reference) on a float32 ``onnx.ModelProto``.

    A batch-1 model is run image by image. ONNX Runtime is imported here, lazily: it is only
    needed to evaluate.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("the float reference needs ONNX Runtime: pip install onnxruntime "
                        "(or pip install 'tvm_ternary[test]')") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if fixed_batch is None or fixed_batch == len(x):
            return session.run(None, {inp.name: x})[0]
        if fixed_batch != 1:
            raise UserError(f"the model's batch is fixed at {fixed_batch}; cannot run {len(x)} images")
        return np.concatenate([session.run(None, {inp.name: x[i : i + 1]})[0] for i in range(len(x))])

    return run
