"""localmoe's quantizers into the floating-point forms checkpoints ship (kernels/quantized.py), which the MTP
layers' unquantized experts are quantized into beside a model's quantized ones: each decodes to what the
format's own writer gives (compressed-tensors' and ModelOpt's NVFP4 packages; for MXFP4 and FP8, the
tests' writers from the formats' definitions), and the byte layouts pack them as the stored experts."""

import pytest
import torch
from packers import quantize_fp8
from packers import quantize_mxfp4 as written_mxfp4
from test_compressed_tensors import compress, groups

from localmoe.kernels.quantized import (
    dequantize_fp8_blocks,
    dequantize_mxfp4,
    dequantize_nvfp4,
    quantize_fp8_blocks,
    quantize_mxfp4,
    quantize_nvfp4,
)
from localmoe.runtime.layouts import Fp8Layout, Mxfp4Layout, Nvfp4Layout


def weight(rows: int = 64, columns: int = 96, seed: int = 0) -> torch.Tensor:
    """A matrix with an outlier row (a wide range of block scales) and an all-zero block."""
    w = 0.05 * torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))
    w[5] *= 40
    w[3, :32] = 0
    return w


def test_nvfp4_dividing_is_compressed_tensors():
    w = weight()
    written = compress(w, groups(("NVFP4A16", ["Linear"], {}))["group_0"], "nvfp4-pack-quantized", None)
    codes, scales, global_scale = quantize_nvfp4(w, divides=True)
    assert torch.equal(dequantize_nvfp4(codes, scales, global_scale, True), written["decoded"])
    assert torch.equal(global_scale, written["weight_global_scale"])


def test_nvfp4_multiplying_is_modelopt():
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    w = weight()
    packed, scale, scale_2 = NVFP4QTensor.quantize(w, 16)
    decoded = packed.dequantize(torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: 16})
    codes, scales, global_scale = quantize_nvfp4(w, divides=False)
    assert torch.equal(dequantize_nvfp4(codes, scales, global_scale, False), decoded)
    assert torch.equal(global_scale, scale_2.reshape(1))


def test_mxfp4_is_the_formats_definition():
    """The same values; an all-zero block's exponent is any (the writer's is 2^-29, localmoe's the least)."""
    w = weight()
    blocks, exponents = written_mxfp4(w)
    codes, mine = quantize_mxfp4(w)
    assert torch.equal(dequantize_mxfp4(codes.view(64, -1, 16), mine), dequantize_mxfp4(blocks, exponents))
    assert mine[3, 0] == 0 and torch.equal(mine[4:], exponents[4:])


@pytest.mark.parametrize(
    "block, exponents",
    [((32, 32), False), ((1, 0), False), ((64, 96), False), ((1, 32), True)],
    ids=["blocks", "per-row", "one-tile", "mxfp8"],
)
def test_fp8_is_the_formats_definition(block, exponents):
    w = weight()
    tile = (block[0] or w.shape[0], block[1] or w.shape[1])
    written, multipliers = quantize_fp8(w, tile, power_of_two=exponents)
    bits, scales = quantize_fp8_blocks(w, block, exponents)
    assert torch.equal(bits, written.view(torch.uint8))
    assert torch.equal(dequantize_fp8_blocks(bits, scales, block), dequantize_fp8_blocks(written, multipliers, tile))


@pytest.mark.parametrize(
    "layout",
    [
        Nvfp4Layout(96, 64, False, True, torch.float32),
        Nvfp4Layout(96, 64, False, False, torch.float32),
        Mxfp4Layout(96, 64, False, torch.float32),
        Fp8Layout(96, 64, False, 32, torch.float32),
        Fp8Layout(96, 64, False, (1, 32), torch.float32, exponents=True),
    ],
    ids=["nvfp4-ct", "nvfp4-modelopt", "mxfp4", "fp8", "mxfp8"],
)
def test_a_byte_layout_packs_decoded_weights_as_each_quantized_alone(layout):
    """gate and up quantized one by one (NVFP4: a global scale each), down alone: each role's rows read
    back as its quantizer decodes it."""
    roles = {"gate": weight(64, 96, 1), "up": weight(64, 96, 2), "down": weight(96, 64, 3)}
    row = torch.zeros(layout.numel, dtype=torch.uint8)
    layout.pack(row, roles)
    encoded = {role: layout._encoded(w)[0] for role, w in roles.items()}
    assert torch.equal(layout.gate_up(row[None])[0], torch.cat([encoded["gate"], encoded["up"]]))
    assert torch.equal(layout.down(row[None])[0], encoded["down"])
    assert (layout.down(row[None])[0] - roles["down"]).abs().max() < 0.2 * roles["down"].abs().max()
