"""Run a float32 ONNX CNN in numpy, with hooks on its conv/dense layers.

Calibration, data-aware quantization and the quantized-network simulation all need to run the
float network and look at (or replace) what each conv/dense layer sees. An untuned TVM float
build is ~100x slower than BLAS on 2 cores, and onnxruntime is no runtime dependency of the
compiler, so this small interpreter (im2col + BLAS) does it. It covers the ops of common
ImageNet CNNs; anything else is a clear error naming the op.

The model must be float32 with constant weights (``passes.onnx_normalize.normalize_onnx``).

Example::

    >>> from onnx import TensorProto, helper, numpy_helper
    >>> import numpy as np
    >>> w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    >>> g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c0")], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])], [w])
    >>> NumpyGraph(helper.make_model(g)).run(np.ones((1, 3, 2, 2), np.float32))[0, :, 0, 0].tolist()
    [3.0, 3.0]
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import UserError
from .quant.reference import grouped_conv, im2col

# hook(node, inputs) -> output array, or None to run the op normally
LayerHook = Callable[[onnx.NodeProto, list], "np.ndarray | None"]
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _conv_pads(attrs, x_hw, k_hw, strides, dilations):
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0, 0, 0, 0]
        for i in range(2):
            out = -(-x_hw[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (k_hw[i] - 1) * dilations[i] + 1 - x_hw[i])
            small, big = total // 2, total - total // 2
            pads[i], pads[i + 2] = (small, big) if auto == "SAME_UPPER" else (big, small)
    return pads


def conv_geometry(node: onnx.NodeProto, x_hw, k_hw) -> dict:
    """stride / padding (top, left, bottom, right) / dilation / groups of an ONNX Conv."""
    attrs = _attrs(node)
    strides = list(attrs.get("strides", [1, 1]))
    dilations = list(attrs.get("dilations", [1, 1]))
    pads = _conv_pads(attrs, x_hw, k_hw, strides, dilations)
    return {"stride": tuple(strides), "padding": (pads[0], pads[1], pads[2], pads[3]),
            "dilation": tuple(dilations), "groups": int(attrs.get("group", 1))}


def _conv(node, x, w, b=None):
    geo = conv_geometry(node, x.shape[2:], w.shape[2:])
    cols = im2col(x, kernel_hw=w.shape[2:], stride=geo["stride"], padding=geo["padding"],
                  dilation=geo["dilation"], dtype=np.float32)
    y = grouped_conv(cols, w, geo["groups"])
    return y if b is None else y + b.reshape(1, -1, 1, 1)


def pool_geometry(node: onnx.NodeProto, x_hw) -> tuple[list, list, list]:
    """(kernel, strides, pads (top, left, bottom, right)) of an ONNX MaxPool / AveragePool;
    ``ceil_mode`` becomes extra bottom/right padding so the last window fits."""
    attrs = _attrs(node)
    k = list(attrs["kernel_shape"])
    strides = list(attrs.get("strides", [1, 1]))
    pads = _conv_pads(attrs, x_hw, k, strides, [1, 1])
    if attrs.get("ceil_mode", 0):
        pads = ceil_mode_pads(pads, x_hw, k, strides)
    return k, strides, pads


def ceil_mode_pads(pads, x_hw, kernel, strides) -> list:
    """``pads`` (top, left, bottom, right) with the extra bottom/right padding a ceil-mode
    pool needs for its last window (the integer max-pool of the compiled library uses it too)."""
    pads = list(pads)
    for i, size in enumerate(x_hw):
        pads[i + 2] += (-(size + pads[i] + pads[i + 2] - kernel[i])) % strides[i]
    return pads


def _pool(node, x, reduce):
    attrs = _attrs(node)
    n, c, h, w = x.shape
    k, strides, pads = pool_geometry(node, (h, w))
    fill = -np.inf if reduce == "max" else 0.0
    cols = im2col(x.reshape(n * c, 1, h, w), kernel_hw=k, stride=strides, padding=pads,
                  pad_value=fill, dtype=np.float32)
    cols = cols.reshape(n, c, k[0] * k[1], *cols.shape[-2:])
    if reduce == "max":
        return cols.max(axis=2)
    if attrs.get("count_include_pad", 0):
        return cols.mean(axis=2)
    ones = im2col(np.ones((1, 1, h, w), np.float32), kernel_hw=k, stride=strides, padding=pads)
    return cols.sum(axis=2) / ones.reshape(k[0] * k[1], *cols.shape[-2:]).sum(axis=0)


def _gemm(node, a, b, c=None):
    attrs = _attrs(node)
    a = a.T if attrs.get("transA", 0) else a
    b = b.T if attrs.get("transB", 0) else b
    y = attrs.get("alpha", 1.0) * (a @ b)
    return y if c is None else y + attrs.get("beta", 1.0) * c


def _clip(node, x, lo=None, hi=None):
    attrs = _attrs(node)
    lo = attrs.get("min", -np.inf) if lo is None else lo
    hi = attrs.get("max", np.inf) if hi is None else hi
    return np.clip(x, lo, hi)


def _softmax(node, x, *, opset: int):
    axis = _attrs(node).get("axis", -1 if opset >= 13 else 1)
    if opset < 13:  # before opset 13 Softmax flattens to 2-D at ``axis``
        flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
        e = np.exp(flat - flat.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).reshape(x.shape)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _batchnorm(node, x, scale, bias, mean, var, *_):
    eps = _attrs(node).get("epsilon", 1e-5)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    inv = (scale / np.sqrt(var + eps)).reshape(shape)
    return (x - mean.reshape(shape)) * inv + bias.reshape(shape)


def _reshape(node, x, shape):
    shape = [int(d) for d in shape]
    shape = [x.shape[i] if d == 0 and not _attrs(node).get("allowzero", 0) else d for i, d in enumerate(shape)]
    return x.reshape(shape)


def _lrn(node, x):
    a = _attrs(node)
    size = a["size"]
    sq = np.pad(x * x, [(0, 0), ((size - 1) // 2, size // 2)] + [(0, 0)] * (x.ndim - 2))
    window = sum(sq[:, i : i + x.shape[1]] for i in range(size))  # channels c-(size-1)/2 .. c+size/2
    return x / (a.get("bias", 1.0) + a.get("alpha", 1e-4) / size * window) ** a.get("beta", 0.75)


def _pad(node, x, pads=None, value=None, axes=None):
    a = _attrs(node)
    pads = [int(p) for p in (pads if pads is not None else a["pads"])]
    axes = list(range(x.ndim)) if axes is None else [int(i) % x.ndim for i in axes]
    width = [(0, 0)] * x.ndim
    for i, axis in enumerate(axes):
        width[axis] = (pads[i], pads[i + len(axes)])
    if min(min(w) for w in width) < 0:
        raise UserError(f"Pad {node.name or node.output[0]}: negative pads are not supported")
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "constant":
        fill = a.get("value", 0.0) if value is None else np.asarray(value).item()
        return np.pad(x, width, constant_values=fill)
    return np.pad(x, width, mode={"reflect": "reflect", "edge": "edge", "wrap": "wrap"}[mode])


def _axes(node, extra):
    return tuple(int(a) for a in (extra if extra is not None else _attrs(node).get("axes", [])))


OPS: dict[str, Callable] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda n, a, b: a @ b,
    "Relu": lambda n, x: np.maximum(x, 0),
    "Clip": _clip,
    "Add": lambda n, a, b: a + b,
    "Sub": lambda n, a, b: a - b,
    "Mul": lambda n, a, b: a * b,
    "Div": lambda n, a, b: a / b,
    "Sigmoid": lambda n, x: 1 / (1 + np.exp(-x)),
    "Tanh": lambda n, x: np.tanh(x),
    "LeakyRelu": lambda n, x: np.where(x < 0, _attrs(n).get("alpha", 0.01) * x, x),
    "PRelu": lambda n, x, slope: np.where(x < 0, slope * x, x),
    "Elu": lambda n, x: np.where(x > 0, x, _attrs(n).get("alpha", 1.0) * np.expm1(np.minimum(x, 0))),
    "HardSigmoid": lambda n, x: np.clip(_attrs(n).get("alpha", 0.2) * x + _attrs(n).get("beta", 0.5), 0, 1),
    "HardSwish": lambda n, x: x * np.clip(x / 6 + 0.5, 0, 1),
    "Softplus": lambda n, x: np.logaddexp(0, x),
    "Exp": lambda n, x: np.exp(x),
    "Sqrt": lambda n, x: np.sqrt(x),
    "Neg": lambda n, x: -x,
    "Round": lambda n, x: np.rint(x),  # ONNX Round: half to even
    "Max": lambda n, *xs: np.maximum.reduce(np.broadcast_arrays(*xs)),
    "Min": lambda n, *xs: np.minimum.reduce(np.broadcast_arrays(*xs)),
    "LRN": _lrn,
    "Pad": _pad,
    "MaxPool": lambda n, x: _pool(n, x, "max"),
    "AveragePool": lambda n, x: _pool(n, x, "avg"),
    "GlobalAveragePool": lambda n, x: x.mean(axis=(2, 3), keepdims=True),
    "GlobalMaxPool": lambda n, x: x.max(axis=(2, 3), keepdims=True),
    "Concat": lambda n, *xs: np.concatenate(xs, axis=_attrs(n)["axis"]),
    "Flatten": lambda n, x: x.reshape(int(np.prod(x.shape[: _attrs(n).get("axis", 1)])), -1),
    "Reshape": _reshape,
    "Dropout": lambda n, x, *_: x,
    "Identity": lambda n, x: x,
    "BatchNormalization": _batchnorm,
    "Transpose": lambda n, x: np.transpose(x, _attrs(n).get("perm")),
    "Squeeze": lambda n, x, axes=None: np.squeeze(x, axis=_axes(n, axes) or None),
    "Unsqueeze": lambda n, x, axes=None: np.expand_dims(x, _axes(n, axes)),
    "Shape": lambda n, x: np.array(x.shape, dtype=np.int64),
    "Gather": lambda n, x, i: np.take(x, i, axis=_attrs(n).get("axis", 0)),
    "Cast": lambda n, x: x.astype(onnx.helper.tensor_dtype_to_np_dtype(_attrs(n)["to"])),
    "ReduceMean": lambda n, x, axes=None: x.mean(axis=_axes(n, axes) or None, keepdims=bool(_attrs(n).get("keepdims", 1))),
}


def _quantize_linear(node, x, scale, zero_point=None):
    """Per-tensor QuantizeLinear with the project's rounding (quant.quantize_activation): the
    imported plan keeps a quantized model's roundings on float paths this way."""
    zp = np.zeros((), np.uint8) if zero_point is None else np.asarray(zero_point)
    info = np.iinfo(zp.dtype)
    q = np.rint(np.asarray(x, np.float64) / np.float64(np.asarray(scale).reshape(()))) + int(zp.reshape(()))
    return np.clip(q, info.min, info.max).astype(zp.dtype)


def _dequantize_linear_op(node, q, scale, zero_point=None):
    from .onnx_io import _dequantize_linear

    attrs = _attrs(node)
    return _dequantize_linear(np.asarray(q), np.asarray(scale), None if zero_point is None else np.asarray(zero_point),
                              axis=int(attrs.get("axis", 1)), block_size=int(attrs.get("block_size", 0)))


OPS["QuantizeLinear"] = _quantize_linear
OPS["DequantizeLinear"] = _dequantize_linear_op


class NumpyGraph:
    """A float32 ONNX graph, ready to run in numpy (see the module docstring)."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                self.constants[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
        self.nodes = [n for n in graph.node if n.op_type != "Constant"]
        unsupported = sorted({n.op_type for n in self.nodes} - OPS.keys() - {"Softmax"})
        if unsupported:
            # calibration and the reference pipeline run the float graph here: without an op
            # nothing can be calibrated, so this is an error, not a silent float fallback
            raise UserError(f"unsupported ONNX op(s) {', '.join(unsupported)}: tvm_ternary's "
                            f"calibration executor cannot run them (supported: "
                            f"{', '.join(sorted(OPS.keys() | {'Softmax'}))})")
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.input_names = [i.name for i in graph.input if i.name not in self.constants]
        self.output_names = [o.name for o in graph.output]

    def evaluate(self, node: onnx.NodeProto, inputs: list) -> np.ndarray:
        """Run one node on its input arrays (trailing optional inputs may be None)."""
        inputs = list(inputs)
        while inputs and inputs[-1] is None:
            inputs.pop()
        if node.op_type == "Softmax":
            out = _softmax(node, *inputs, opset=self.opset)
        else:
            out = OPS[node.op_type](node, *inputs)
        out = np.asarray(out)
        return out if out.dtype.kind in "iub" else out.astype(np.float32, copy=False)

    def last_uses(self) -> dict[str, int]:
        """Index of the last node that reads each tensor (graph outputs: never freed)."""
        last = {}
        for i, node in enumerate(self.nodes):
            for name in node.input:
                last[name] = i
        for name in self.output_names:
            last[name] = len(self.nodes)
        return last

    def run(self, x: np.ndarray, *, hook: LayerHook | None = None, keep: set[str] | None = None):
        """Run on the one graph input ``x``; return the first output, or with ``keep`` a dict
        of the output and every kept tensor by name."""
        if len(self.input_names) != 1:
            raise UserError(f"expected a model with one input, found {self.input_names}")
        env = dict(self.constants)
        env[self.input_names[0]] = np.asarray(x, dtype=np.float32)
        kept = {}
        last = self.last_uses()
        for i, node in enumerate(self.nodes):
            inputs = [env[name] if name else None for name in node.input]
            out = hook(node, inputs) if hook is not None and node.op_type in WEIGHTED_OPS else None
            env[node.output[0]] = self.evaluate(node, inputs) if out is None else out
            if keep and node.output[0] in keep:
                kept[node.output[0]] = env[node.output[0]]
            for name in node.input:  # free what no later node reads (keeps memory at one frontier)
                if last.get(name) == i and name not in self.constants:
                    env.pop(name, None)
        result = env[self.output_names[0]]
        if keep is not None:
            kept[self.output_names[0]] = result
            return kept
        return result
