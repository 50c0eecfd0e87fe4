"""The plan's graph in torch: the float network and the quantized one, differentiable.

The distillation (:mod:`.distill`) needs gradients through the whole quantized network. This
module runs the same normalised ONNX graph that :func:`plan.simulate` runs in numpy, op by op,
with torch ops of the same semantics; a fused quantized layer runs as *fake quantization*
(float values on the integer grid, rounding with a straight-through gradient), which equals
the integer pipeline up to the fixed-point requantizer's last-bit ties.

Only what the planner needs is here; an op without torch semantics raises
:class:`UnsupportedOp`, so the caller can say so and keep the plan as it is.

torch is imported by the caller (the distillation) only: the compiler's other paths and the
runtime never import it.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F

# ops whose numpy semantics need nothing but .T, @, * and .reshape run on torch tensors as is
from ..numpy_graph import NumpyGraph, _attrs, _gemm, _reshape, conv_geometry, pool_geometry
from ..quant import ActivationQuant
from .graph import node_key

__all__ = ["UnsupportedOp", "unsupported_ops", "fake_quant", "round_ste", "TorchGraph"]


class UnsupportedOp(Exception):
    """The graph holds an op this module has no torch semantics for."""


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even (as ``np.rint``), gradient of the identity."""
    return x + (torch.round(x) - x).detach()


def fake_quant(x: torch.Tensor, quant: ActivationQuant) -> torch.Tensor:
    """``dequantize(quantize(x))`` with a straight-through gradient inside the clipping range
    (zero outside it: the clipped values do not move with x)."""
    s, z = float(quant.scale), int(quant.zero_point)
    lo, hi = (quant.qmin - z) * s, (quant.qmax - z) * s
    x = torch.clamp(x, lo, hi)
    return x + ((torch.clamp(torch.round(x / s) + z, quant.qmin, quant.qmax) - z) * s - x).detach()


def _pads4(pads):  # ONNX (top, left, bottom, right) -> F.pad's (left, right, top, bottom)
    return (pads[1], pads[3], pads[0], pads[2])


def conv2d(x, w, b, geometry: dict):
    x = F.pad(x, _pads4(geometry["padding"]))
    return F.conv2d(x, w, b, stride=geometry["stride"], dilation=geometry["dilation"],
                    groups=geometry["groups"])


def _conv(node, x, w, b=None):
    return conv2d(x, w, b, conv_geometry(node, tuple(x.shape[2:]), tuple(w.shape[2:])))


def _pool(node, x, reduce):
    attrs = _attrs(node)
    k, strides, pads = pool_geometry(node, tuple(x.shape[2:]))
    if reduce == "max":
        return F.max_pool2d(F.pad(x, _pads4(pads), value=float("-inf")), k, strides)
    total = F.avg_pool2d(F.pad(x, _pads4(pads)), k, strides) * (k[0] * k[1])
    if attrs.get("count_include_pad", 0):
        return total / (k[0] * k[1])
    ones = F.pad(torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype), _pads4(pads))
    return total / (F.avg_pool2d(ones, k, strides) * (k[0] * k[1]))


def _clip(node, x, lo=None, hi=None):
    attrs = _attrs(node)
    lo = attrs.get("min", -np.inf) if lo is None else float(lo)
    hi = attrs.get("max", np.inf) if hi is None else float(hi)
    return torch.clamp(x, lo, hi)


def _axes(node, extra):
    return tuple(int(a) for a in (extra.tolist() if extra is not None else _attrs(node).get("axes", [])))


def _squeeze(node, x, axes=None):
    axes = _axes(node, axes) or tuple(i for i, d in enumerate(x.shape) if d == 1)
    for a in sorted((a % x.ndim for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def _unsqueeze(node, x, axes=None):
    for a in sorted(_axes(node, axes)):
        x = x.unsqueeze(a)
    return x


OPS = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda n, a, b: a @ b,
    "Relu": lambda n, x: F.relu(x),
    "Clip": _clip,
    "Add": lambda n, a, b: a + b,
    "Sub": lambda n, a, b: a - b,
    "Mul": lambda n, a, b: a * b,
    "Div": lambda n, a, b: a / b,
    "Sigmoid": lambda n, x: torch.sigmoid(x),
    "Tanh": lambda n, x: torch.tanh(x),
    "LeakyRelu": lambda n, x: F.leaky_relu(x, _attrs(n).get("alpha", 0.01)),
    "HardSigmoid": lambda n, x: torch.clamp(_attrs(n).get("alpha", 0.2) * x + _attrs(n).get("beta", 0.5), 0, 1),
    "HardSwish": lambda n, x: x * torch.clamp(x / 6 + 0.5, 0, 1),
    "MaxPool": lambda n, x: _pool(n, x, "max"),
    "AveragePool": lambda n, x: _pool(n, x, "avg"),
    "GlobalAveragePool": lambda n, x: x.mean(dim=(2, 3), keepdim=True),
    "GlobalMaxPool": lambda n, x: x.amax(dim=(2, 3), keepdim=True),
    "Concat": lambda n, *xs: torch.cat(xs, dim=_attrs(n)["axis"]),
    "Flatten": lambda n, x: x.reshape(int(np.prod(x.shape[: _attrs(n).get("axis", 1)])), -1),
    "Reshape": _reshape,
    "Dropout": lambda n, x, *_: x,
    "Identity": lambda n, x: x,
    "Transpose": lambda n, x: x.permute(*_attrs(n).get("perm", list(range(x.ndim))[::-1])),
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "ReduceMean": lambda n, x, axes=None: x.mean(dim=_axes(n, axes) or None,
                                                 keepdim=bool(_attrs(n).get("keepdims", 1))),
}
# Softmax is not run: the distillation compares logits (see TorchGraph.run).
SHAPE_ARGS = {"Reshape": 1, "Squeeze": 1, "Unsqueeze": 1, "ReduceMean": 1}  # integer shape inputs stay numpy


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Op types of ``model`` this module cannot run (sorted; empty when it runs them all)."""
    return sorted({n.op_type for n in model.graph.node} - OPS.keys() - {"Softmax", "Constant"})


class TorchGraph:
    """Runs ``model`` (normalised float32 ONNX) in torch; ``layers`` maps a fused layer's root
    node to a callable ``(x, residual) -> y`` that replaces the fused chain (the quantized
    layer); without ``layers`` the float network runs. ``run`` returns the logits: a trailing
    Softmax is left out (``ends_in_softmax`` says whether there was one)."""

    def __init__(self, model: onnx.ModelProto, analysis):
        graph = NumpyGraph(model)
        unknown = unsupported_ops(model)
        if unknown:
            raise UnsupportedOp(f"no torch semantics for {', '.join(unknown)}")
        self.nodes = graph.nodes
        self.input_name = graph.input_names[0]
        self.output_name = graph.output_names[0]
        self.numpy_constants = graph.constants
        self.constants = {k: torch.from_numpy(np.array(v)) if v.dtype.kind == "f" else v
                          for k, v in graph.constants.items()}
        self.analysis = analysis
        self.ends_in_softmax = any(n.op_type == "Softmax" for n in self.nodes)

    def run(self, x: torch.Tensor, layers: dict | None = None) -> torch.Tensor:
        fused_at_root = {l.root: l for l in self.analysis.layers if layers and l.name in layers}
        skipped = {n for l in fused_at_root.values() for n in l.skipped}
        env = dict(self.constants)
        env[self.input_name] = x
        for node in self.nodes:
            key = node_key(node)
            if key in skipped:
                continue
            fused = fused_at_root.get(key)
            if fused is not None:
                env[fused.output] = layers[fused.name](
                    env[fused.input], env[fused.residual] if fused.residual else None)
                continue
            if node.op_type == "Softmax":  # logits, not probabilities
                env[node.output[0]] = env[node.input[0]]
                continue
            args = [env[n] if n else None for n in node.input]
            k = SHAPE_ARGS.get(node.op_type)
            if k is not None and len(args) > k and isinstance(args[k], torch.Tensor):
                args[k] = self.numpy_constants.get(node.input[k], args[k].numpy())
            env[node.output[0]] = OPS[node.op_type](node, *args)
        return env[self.output_name]
