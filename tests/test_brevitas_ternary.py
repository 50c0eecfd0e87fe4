"""A ternary CNN trained with brevitas (QAT, CPU, a few seconds on generated data), exported as
QCDQ ONNX, compiled without calibration: the library matches ONNX Runtime on the exported model
within one output quantization step, agrees on every top-1, and runs the ternary layers on the
ternary kernels."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
brevitas_nn = pytest.importorskip("brevitas.nn", reason="brevitas is in the test extra")

from tvm_ternary import onnx_io  # noqa: E402
from tvm_ternary.compiler import compile_model  # noqa: E402
from tvm_ternary.plan import QuantConfig, simulate  # noqa: E402
from tvm_ternary.schedules.compute import unpacked_spec  # noqa: E402

SIZE, CLASSES = 12, 4


def _data(n: int, seed: int):
    """Images whose class is which quadrant holds a bright blob (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.3, size=(n, 3, SIZE, SIZE)).astype(np.float32)
    y = rng.integers(0, CLASSES, size=n)
    h = SIZE // 2
    for i, c in enumerate(y):
        r, s = divmod(int(c), 2)
        x[i, :, r * h : r * h + h, s * h : s * h + h] += 1.0
    return x, y


def _model():
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Uint8ActPerTensorFloat

    qnn = brevitas_nn

    class TernaryWeight(Int8WeightPerChannelFloat):
        bit_width = 2  # narrow range: {-1, 0, +1} times one scale per output channel

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True)
            self.c1 = qnn.QuantConv2d(3, 16, 3, padding=1, weight_quant=Int8WeightPerChannelFloat)
            self.r1 = qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat, return_quant_tensor=True)
            self.c2 = qnn.QuantConv2d(16, 32, 3, padding=1, stride=2, weight_quant=TernaryWeight)
            self.r2 = qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat, return_quant_tensor=True)
            self.c3 = qnn.QuantConv2d(32, 32, 3, padding=1, weight_quant=TernaryWeight)
            self.r3 = qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat, return_quant_tensor=True)
            self.pool = torch.nn.AdaptiveAvgPool2d(1)
            self.pq = qnn.QuantIdentity(act_quant=Uint8ActPerTensorFloat, return_quant_tensor=True)
            self.fc = qnn.QuantLinear(32, CLASSES, bias=True, weight_quant=Int8WeightPerChannelFloat)
            self.out = qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat)

        def forward(self, x):
            x = self.r1(self.c1(self.inp(x)))
            x = self.r2(self.c2(x))
            x = self.r3(self.c3(x))
            x = self.pq(torch.flatten(self.pool(x), 1))
            return self.out(self.fc(x))

    return Net()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from brevitas.export import export_onnx_qcdq

    torch.manual_seed(0)
    net = _model()
    x, y = _data(256, seed=0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(xt), yt)
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        train_acc = float((net(xt).argmax(1) == yt).float().mean())
    path = tmp_path_factory.mktemp("brevitas") / "ternary_qcdq.onnx"
    export_onnx_qcdq(net, torch.from_numpy(x[:1]), export_path=str(path), opset_version=18)
    return path, train_acc


def test_brevitas_ternary_qcdq_compiles_without_calibration_and_matches_ort(exported):
    path, train_acc = exported
    assert train_acc > 0.9  # the QAT model learned the task: its top-1 is not noise
    model = onnx_io.load_model(path)
    cm = compile_model(model, config=QuantConfig(), progress=False)
    coverage = {row["layer"]: row for row in cm.plan.coverage()}
    ternary = [name for name, row in coverage.items() if row["weights"] == "ternary"]
    assert len(ternary) == 2, coverage
    for name in ternary:
        assert coverage[name]["reason"] == "model: ternary N=" + str(
            cm.plan.layers[name].weights.group_size) + ", exact"
        kernel = cm.rewrite.layer_kernels[name]
        spec, weights = cm.rewrite.specs[kernel], cm.plan.layers[name].weights
        if cm.rewrite.forms.get(kernel) == "unpacked":
            # a 3x3 on a small map on vnni512: the 8-bit words of the same integers
            packed = replace(spec, weight_bits=2, group_size=weights.group_size,
                             grouping=weights.layout.grouping)
            assert unpacked_spec(packed, cm.isa) == spec
        else:
            assert spec.weight_bits == 2  # on the ternary (2-bit packed) kernel
    assert [r["weights"] for r in coverage.values()].count("int8") == 2
    assert not cm.rewrite.left_float

    x, _ = _data(200, seed=1)
    ours = cm.run(x)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the export lists its constants as graph inputs too: ORT warns
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    theirs = np.concatenate([sess.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])
    step = cm.plan.layers[list(coverage)[-1]].output_quant.scale
    assert np.abs(ours - theirs).max() <= step * (1 + 1e-5)
    assert np.array_equal(ours.argmax(1), theirs.argmax(1))
    # and the library is its numpy reference, bit for bit (every layer is integer)
    # (one image at a time: the export fixes the batch to 1 in a Reshape)
    want = np.concatenate([simulate(cm.plan, x[i : i + 1]) for i in range(16)])
    np.testing.assert_array_equal(ours[:16], want)


def test_brevitas_qonnx_export_with_4bit_activations_matches_brevitas(exported):
    """QONNX ``Quant`` nodes (brevitas export_qonnx): our own converter; 4-bit activations run on
    the u4 kernels. ORT cannot run QONNX custom ops: the reference is brevitas itself."""
    from brevitas.export import export_qonnx
    from brevitas.quant import Uint8ActPerTensorFloat

    class Uint4Act(Uint8ActPerTensorFloat):
        bit_width = 4

    torch.manual_seed(1)
    net = _model()
    net.r3 = brevitas_nn.QuantReLU(act_quant=Uint4Act, return_quant_tensor=True)
    x, y = _data(256, seed=0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    net.eval()
    path = exported[0].with_name("ternary_qonnx.onnx")
    export_qonnx(net, torch.from_numpy(x[:1]), export_path=str(path))
    cm = compile_model(onnx_io.load_model(path), config=QuantConfig(), progress=False)
    coverage = {row["layer"]: row for row in cm.plan.coverage()}
    assert [r["weights"] for r in coverage.values()] == ["int8", "ternary", "ternary", "int8"]
    c3 = next(name for name in coverage if "c3" in name or name.endswith("conv2d_2"))
    assert cm.plan.layers[c3].output_quant.bits == 4  # the 4-bit ReLU's format, from the model
    assert not cm.rewrite.left_float
    xv, _ = _data(64, seed=2)
    ours = cm.run(xv)
    with torch.no_grad():
        theirs = net(torch.from_numpy(xv)).numpy()
    step = cm.plan.layers[list(coverage)[-1]].output_quant.scale
    # brevitas rounds its 4-bit activations from float32 torch convs: a value within float
    # error of a rounding tie can land one 4-bit step away from our exact integer sum, and
    # that step, carried through the last layer, moves an output by up to 2 of its steps
    # (seen on a Zen 4: 2 of 256 outputs at exactly 2 steps, the trained net depending on the
    # host's torch numerics). So: nearly all outputs within one step, none beyond two.
    d = np.abs(ours - theirs) / step
    assert d.max() <= 2 * (1 + 1e-4), d.max()
    assert (d > 1 + 1e-4).mean() <= 0.02, (d > 1 + 1e-4).sum()
    assert np.array_equal(ours.argmax(1), theirs.argmax(1))
    # and the library is its numpy reference, bit for bit (one image at a time: the export
    # fixes the batch to 1 in a Reshape)
    want = np.concatenate([simulate(cm.plan, xv[i : i + 1]) for i in range(16)])
    np.testing.assert_array_equal(ours[:16], want)
