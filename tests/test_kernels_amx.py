"""The AMX form of the VNNI conv kernel (schedules/amx.py): bit-exact against the numpy
reference on a host with amx-int8; elsewhere built for sapphirerapids and its assembly checked
for the tile instructions (never run: it would be a SIGILL)."""

from __future__ import annotations

import pytest

import kernels_harness as kh
from tvm_ternary import tvm_adapter as ta
from tvm_ternary.schedules import ConvSpec, conv2d_kernel
from tvm_ternary.schedules.amx import amx_blocks, amx_form, amx_rows

AMX_HOST = kh.host_runs("amx")

# (in, hw, out, kernel, padding, extra ConvSpec fields): 1x1 reading the input itself, padded
# 3x3 (the pad stage), s8 input (+128 shift and compensation), 1 / 2 / 3 accumulator tiles
# (16 / 32 / 48 outputs; 40 and 1000: the last block padded), 4- and 8-bit weights (8-bit 1x1 with one code per output: no decode,
# the blocked words are B), u4 input, a fused residual, float output, batch 2, cluster codes,
# strides 2 (also only along W)
CASES = [
    (128, 14, 32, 1, 0, {}),
    (512, 13, 1000, 1, 0, {"weight_bits": 8, "group_size": 512, "out": "f32", "relu": False}),
    (128, 7, 40, 1, 0, {}),
    (128, 14, 64, 3, 1, {}),
    (64, 7, 48, 3, 1, {"act": "s8"}),
    (128, 13, 16, 1, 0, {"out": "s8", "relu": False}),
    (128, 8, 48, 1, 0, {"weight_bits": 4, "group_size": 8}),
    (128, 6, 32, 1, 0, {"weight_bits": 8, "group_size": 128, "out": "f32", "relu": False}),
    (64, 10, 32, 3, 1, {"weight_bits": 8, "group_size": 16}),
    (64, 12, 32, 3, 1, {"act": "u4", "out": "u4"}),
    (192, 9, 32, 1, 0, {"residual": "u8", "relu": True}),
    (192, 5, 96, 3, 1, {"group_size": 8, "grouping": "cluster"}),
    (64, 6, 32, 3, 1, {"batch": 2, "x_zero_point": 3}),
    (128, 14, 32, 3, 1, {"stride": 2}),
    (128, 13, 48, 1, 0, {"stride": 2, "act": "s8"}),
    (64, 15, 32, 3, 0, {"stride": (1, 2)}),
]


def _spec(c, hw, k, kernel, padding, extra) -> ConvSpec:
    fields = {"batch": 1, "act": "u8", "out": "u8", "relu": True, **extra}
    return ConvSpec(in_channels=c, height=hw, width=hw, out_channels=k, kernel=kernel,
                    padding=padding, **fields)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-k{c[3]}-{c[5]}")
def test_amx_kernel_bit_exact_or_tile_instructions(case):
    spec = _spec(*case)
    target = ta.make_target("sapphirerapids")
    assert amx_form(spec, "vnni512", target)
    if AMX_HOST:
        kh.run_and_check(spec, "amx", seed=len(CASES))
        return
    asm = ta.build(conv2d_kernel(spec, target=target), target=target).mod.inspect_source("s")
    for op in ("ldtilecfg", "tileloadd", "tdpbusd", "tilestored"):
        assert op in asm, op


@pytest.mark.parametrize("change, reason", [
({"in_channels": 96}, "channels not a multiple of 64"),
    ({"groups": 2, "out_channels": 64}, "grouped"), ({"dilation": 2}, "dilation"),
    ({"kernel": 1, "padding": 0, "in_channels": 64}, "one tile product per call"),
])
def test_amx_form_only_where_the_tiles_fit(change, reason):
    base = {"batch": 1, "in_channels": 128, "height": 14, "width": 14, "out_channels": 64,
            "kernel": 3, "padding": 1}
    target = ta.make_target("sapphirerapids")
    assert amx_form(ConvSpec(**base), "vnni512", target)
    assert not amx_form(ConvSpec(**{**base, **change}), "vnni512", target), reason


def test_amx_form_needs_amx_on_the_target():
    spec = _spec(128, 14, 32, 1, 0, {})
    assert not amx_form(spec, "vnni512", ta.make_target("icelake-server"))
    assert not amx_form(spec, "avx512", ta.make_target("sapphirerapids"))


@pytest.mark.parametrize("width, rows", [(56, 14), (28, 14), (14, 14), (13, 13), (7, 7), (55, 11), (17, 1)])
def test_amx_rows_divide_the_row(width, rows):
    assert amx_rows(width) == rows and width % rows == 0


@pytest.mark.parametrize("k, nk", [(16, 1), (32, 2), (48, 3), (64, 2), (1000, 3), (80, 1), (40, 3)])
def test_amx_blocks_fit_the_eight_tiles(k, nk):
    assert amx_blocks(k) == nk and 2 * nk + 1 <= 8


def test_model_with_amx_kernels_is_bit_exact_and_says_so():
    """A tiny CNN whose 64-channel 3x3 convs (one with a fused residual) take the AMX form:
    the coverage report names the tiles, and on an AMX host the library's output equals the
    numpy reference bit for bit (conv head: no float op after the integer region)."""
    import numpy as np

    from tiny_models import tiny_cnn, tiny_images
    from tvm_ternary.compiler import compile_model
    from tvm_ternary.plan import QuantConfig, simulate

    target = None if AMX_HOST else ta.make_target("sapphirerapids")
    cm = compile_model(tiny_cnn(channels=32, conv_head=True), config=QuantConfig(method="exact"),
                       calib_images=tiny_images(8), target=target, progress=False)
    rows = {r["layer"]: r for r in cm.coverage}
    for layer in ("res_a", "res_b"):  # 64 -> 64 3x3 at 4 x 4
        assert rows[layer]["kernel_format"].endswith("vnni512 + amx tiles)"), rows[layer]
    assert "amx" not in rows["fire_e3"]["kernel_format"]  # 8 input channels: VNNI
    if AMX_HOST:
        x = tiny_images(4, seed=5)
        np.testing.assert_array_equal(cm.run(x), simulate(cm.plan, x))
