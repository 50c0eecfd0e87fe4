"""End-to-end distillation of a fitted plan against the float model's logits.

The layer-by-layer fit (:mod:`..quant.reconstruct`) makes each layer's output close to the
float one; what it cannot see is how the errors of many layers add up at the logits. This step
keeps every ternary / 4 / 8-bit value ``v`` the fit chose and tunes, through the whole
quantized network at once, what is cheap to change and exactly representable by the kernels:

- each group's integer code ``q_g`` (a float latent rounded with a straight-through gradient,
  clipped to ``[0, qmax]``),
- each output channel's float scale ``s_k`` (a log-scale multiplier),
- each output channel's bias,

minimising the KL divergence between the float and the quantized network's class
distributions on the calibration images (activation quantization in the loop, with the plan's
scales). The result is written back as integer codes, scales and integer biases: a plan like
any other, which ``simulate`` and the kernels execute bit-exactly. torch is imported here only
(``make_plan`` imports this module only when asked to distill).

Example::

    >>> plan = distill_plan(plan, calib_images, epochs=4)  # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from ..progress import progress as progress_bar
from ..quant import relative_error
from ..quant.intscales import code_max
from .layer import LayerPlan, integer_params
from .torch_graph import TorchGraph, UnsupportedOp, conv2d, fake_quant, round_ste

DISTILL_EPOCHS = 6
DISTILL_BATCH = 16
LR_CODE = 0.05  # codes move in units of one code step
LR_LOG_SCALE = 2e-3
LR_BIAS = 0.02  # in units of the layer's output step (or of its bias spread for a float exit)
TEMPERATURE = 1.0
SHIFT = 16  # pixels an augmented view may move


def distill_plan(plan, images: np.ndarray, *, epochs: int = DISTILL_EPOCHS, batch: int = DISTILL_BATCH,
                 seed: int = 0, progress: bool = True, threads: int | None = None,
                 tune_codes: bool = True, augment: bool = True):
    """``plan`` with group codes, channel scales and biases tuned end to end on ``images``.

    Returns ``(new_plan, info)``; ``info`` records what was done (for the sidecar) or, when the
    graph has an op without torch semantics, why nothing was (the plan is then returned as is).
    """
    start = time.perf_counter()
    try:
        graph = TorchGraph(plan.model, plan.analysis)
    except UnsupportedOp as why:
        return plan, {"distilled": False, "why": str(why)}
    if threads:
        torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))

    layers = {name: _Layer(lp, tune_codes=tune_codes) for name, lp in plan.layers.items()}
    groups = [
        {"params": [l.code for l in layers.values() if l.code.requires_grad], "lr": LR_CODE},
        {"params": [l.log_scale for l in layers.values()], "lr": LR_LOG_SCALE},
        {"params": [l.bias_steps for l in layers.values()], "lr": LR_BIAS},
    ]
    opt = torch.optim.Adam([g for g in groups if g["params"]])
    steps = epochs * -(-len(x_all) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    bar = progress_bar(steps, desc="distilling", unit="steps", enabled=progress)
    calls = {name: l.forward for name, l in layers.items()}
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=gen)
        for i in range(0, len(x_all), batch):
            idx = order[i : i + batch]
            x = _augment(x_all[idx], gen) if augment else x_all[idx]
            with torch.no_grad():
                teacher = torch.log_softmax(graph.run(x).reshape(len(idx), -1) / TEMPERATURE, dim=1)
            student = graph.run(x, calls).reshape(len(idx), -1)
            log_p = torch.log_softmax(student / TEMPERATURE, dim=1)
            loss = torch.nn.functional.kl_div(log_p, teacher, log_target=True, reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
    bar.close()
    new_layers = {name: l.export() for name, l in layers.items()}
    per_epoch = max(1, len(losses) // max(epochs, 1))
    info = {"distilled": True, "epochs": epochs, "images": len(x_all), "steps": steps,
            "kl_first_epoch": float(np.mean(losses[:per_epoch])), "kl_last_epoch": float(np.mean(losses[-per_epoch:])),
            "seconds": round(time.perf_counter() - start, 1)}
    return replace(plan, layers=new_layers, calibration={**plan.calibration, "distill": info}), info


def _augment(x, gen):
    """A random horizontal flip and a shift of up to SHIFT pixels (edge-replicated) per image:
    the teacher labels each new view, so a few hundred images give many distinct targets."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = torch.nn.functional.pad(x, (SHIFT, SHIFT, SHIFT, SHIFT), mode="replicate")
    dy, dx = torch.randint(0, 2 * SHIFT + 1, (2, n), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


class _Layer:
    """The trainable view of one LayerPlan."""

    def __init__(self, lp: LayerPlan, *, tune_codes: bool):
        self.lp = lp
        iw = lp.weights
        self.qmax = code_max(bits=iw.bits, code_bits=iw.code_bits)
        index = iw.layout.broadcast_to_weights(np.arange(iw.layout.total_groups).reshape(iw.layout.scale_shape))
        self.index = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64))
        self.values = torch.from_numpy(iw.values.astype(np.float32))
        self.scale0 = torch.from_numpy(iw.channel_scales.astype(np.float32))
        self.code = torch.tensor(iw.group_codes.astype(np.float32).reshape(-1),
                                 requires_grad=tune_codes and self.qmax > 1)
        self.log_scale = torch.zeros(len(iw.channel_scales), requires_grad=True)
        bias = lp.bias_int.astype(np.float64) * lp.dequant_scale.astype(np.float64)
        self.bias0 = torch.from_numpy(bias.astype(np.float32))
        if lp.output_quant is not None:
            unit = np.full(len(bias), lp.output_quant.scale, np.float32)
        else:
            unit = np.full(len(bias), max(float(np.std(bias)), 1e-3) * 0.1, np.float32)
        self.unit = torch.from_numpy(unit)
        self.bias_steps = torch.zeros(len(bias), requires_grad=True)

    def codes(self):
        return round_ste(torch.clamp(self.code, 0, self.qmax))

    def weight(self):
        scale = self.scale0 * torch.exp(self.log_scale)
        w = self.codes()[self.index] * self.values
        return w * scale.reshape((-1,) + (1,) * (w.ndim - 1))

    def bias(self):
        return self.bias0 + self.bias_steps * self.unit

    def forward(self, x, residual):
        lp = self.lp
        x = fake_quant(x, lp.input_quant)
        if lp.is_dense:
            y = x.reshape(x.shape[0], -1) @ self.weight().T + self.bias()
        else:
            y = conv2d(x, self.weight(), self.bias(), lp.geometry)
        if residual is not None:
            y = y + fake_quant(residual, lp.residual_quant)
        if lp.fused.relu:
            y = torch.relu(y)
        return y if lp.output_quant is None else fake_quant(y, lp.output_quant)

    def export(self) -> LayerPlan:
        """The tuned values on the kernels' integer grid, as a new LayerPlan."""
        lp = self.lp
        with torch.no_grad():
            codes = self.codes().numpy().astype(np.uint8).reshape(lp.weights.layout.scale_shape)
            scales = (self.scale0 * torch.exp(self.log_scale)).numpy().astype(np.float32)
            bias = self.bias().numpy().astype(np.float64)
        iw = replace(lp.weights, group_codes=codes, channel_scales=scales, lossless=False)
        bias_int, dequant, mult, shift, res_mult = integer_params(
            iw, bias, input_quant=lp.input_quant, output_quant=lp.output_quant,
            residual_quant=lp.residual_quant)
        return replace(lp, weights=iw, bias_int=bias_int, dequant_scale=dequant, multiplier=mult,
                       shift=shift, residual_multiplier=res_mult,
                       weight_error=relative_error(lp.fused.weight.weight, iw.dequantize()))
