"""Small random-weight ONNX CNNs with the structures the compiler must handle.

``tiny_cnn``: conv-relu-maxpool, a SqueezeNet fire module (concat), a ResNet residual
(conv-add-relu with an identity shortcut), a depthwise conv, global average pool, flatten and a
Gemm classifier: every fusion and scale-sharing case in one graph that runs in milliseconds.
"""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def tiny_cnn(seed: int = 0, *, channels: int = 16, size: int = 16, classes: int = 10,
             conv_head: bool = False, head_pool: bool = False):
    """``conv_head=True`` ends in a 1x1 conv classifier read straight from the integer region
    (no float op before the output), so the compiled output is comparable bit for bit;
    ``head_pool=True`` adds a GlobalAveragePool after it (SqueezeNet's head)."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def const(name, shape, scale=None):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        arr = rng.normal(size=shape) * (scale if scale is not None else np.sqrt(2.0 / fan_in))
        inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        return name

    def conv(name, x, cin, cout, k, *, stride=1, group=1, relu=True):
        w = const(name + "_w", (cout, cin // group, k, k))
        b = const(name + "_b", (cout,), 0.1)
        nodes.append(helper.make_node("Conv", [x, w, b], [name], name=name, kernel_shape=[k, k],
                                      pads=[k // 2] * 4, strides=[stride] * 2, group=group))
        if not relu:
            return name
        nodes.append(helper.make_node("Relu", [name], [name + "_relu"], name=name + "_relu"))
        return name + "_relu"

    c = channels
    x = conv("conv1", "input", 3, c, 3, stride=2)
    nodes.append(helper.make_node("MaxPool", [x], ["pool1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]))
    s = conv("fire_squeeze", "pool1", c, c // 2, 1)
    e1 = conv("fire_e1", s, c // 2, c, 1)
    e3 = conv("fire_e3", s, c // 2, c, 3)
    nodes.append(helper.make_node("Concat", [e1, e3], ["fire_cat"], name="fire_cat", axis=1))
    r = conv("res_a", "fire_cat", 2 * c, 2 * c, 3)
    rb = conv("res_b", r, 2 * c, 2 * c, 3, relu=False)
    nodes.append(helper.make_node("Add", [rb, "fire_cat"], ["res_add"], name="res_add"))
    nodes.append(helper.make_node("Relu", ["res_add"], ["res_out"], name="res_out"))
    dw = conv("dw", "res_out", 2 * c, 2 * c, 3, group=2 * c)
    if conv_head:
        head = conv("head", dw, 2 * c, classes, 1, relu=head_pool)
        out_shape = [1, classes, size // 4, size // 4]
        if head_pool:
            nodes.append(helper.make_node("GlobalAveragePool", [head], ["head_gap"], name="head_gap"))
            head, out_shape = "head_gap", [1, classes, 1, 1]
        graph = helper.make_graph(
            nodes, "tiny_cnn_conv_head",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
            [helper.make_tensor_value_info(head, TensorProto.FLOAT, out_shape)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        return model
    nodes.append(helper.make_node("GlobalAveragePool", [dw], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flat", axis=1))
    fc_w = const("fc_w", (classes, 2 * c))
    fc_b = const("fc_b", (classes,), 0.1)
    nodes.append(helper.make_node("Gemm", ["flat", fc_w, fc_b], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def tiny_images(n: int, *, size: int = 16, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


def ort_qdq(model, images: np.ndarray, *, per_channel: bool = True, **extra):
    """``model`` quantized by onnxruntime.quantization.quantize_static: QDQ, u8 activations
    (asymmetric), s8 weights, calibrated (min-max) on ``images``."""
    import tempfile
    from pathlib import Path

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{model.graph.input[0].name: images[i : i + 1]} for i in range(len(images))])

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "qdq.onnx"
        onnx.save(model, src)
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=per_channel, **extra)
        return onnx.load(str(dst))
