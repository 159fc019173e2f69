"""Writers of quantized weights in the formats checkpoints ship, for the tests' tiny checkpoints.

compressed-tensors' and ModelOpt's own packages write their formats (test_compressed_tensors.py,
test_quantized_checkpoints.py). GPTQ and AWQ have no writer that runs here: GPTQModel and AutoAWQ build
from source against CUDA, and AutoGPTQ 0.7.1 and AutoAWQ 0.2.9 (installed without their dependencies)
fail to import under transformers 5 (no_init_weights moved; awq imports datasets at the top). Their
packers are written here from the formats' definitions, and each test decodes what it packed with the
reading side taken from the formats' own code (GPTQModel's dequantize_weight, vLLM's and SGLang's
awq_dequantize_torch oracles), so a packer and localmoe cannot share a mistake.
"""

import torch

from localmoe.kernels.quantized import FP4_VALUES

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: the output each of a word's eight nibbles holds


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., rows, cols] -> blocks [..., rows, cols/32, 16] uint8 and scales [..., rows, cols/32] uint8:
    a power-of-two scale per 32 values, then the nearest FP4 value, two codes per byte, low nibble first."""
    groups = weight.reshape(*weight.shape[:-1], -1, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=1e-8) / 6.0))
    scaled = groups / torch.exp2(exponent).unsqueeze(-1)
    codes = nearest_fp4(scaled)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exponent + 127).to(torch.uint8)


def nearest_fp4(values: torch.Tensor) -> torch.Tensor:
    """The e2m1 code of the FP4 value nearest each of `values` (uint8)."""
    return (values.unsqueeze(-1) - torch.tensor(FP4_VALUES)).abs().argmin(-1).to(torch.uint8)


def quantize_fp8(w: torch.Tensor, block: tuple[int, int], power_of_two: bool = False):
    """w [R, C] -> float8 e4m3 [R, C] and a float32 multiplier per block tile (partial at the edges); with
    `power_of_two` the multipliers are powers of two, as ue8m0 scales store them."""
    rows, columns = w.shape
    tiles = torch.nn.functional.pad(w.float(), (0, -columns % block[1], 0, -rows % block[0]))
    tiles = tiles.unflatten(0, (-1, block[0])).unflatten(2, (-1, block[1]))  # [R/b0, b0, C/b1, b1]
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    if power_of_two:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    full = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :columns]
    return (w.float() / full).to(torch.float8_e4m3fn), scale


def pack_words(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values [..., W * 32 / bits] -> int32 words [..., W], the first value in the lowest bits."""
    per_word = 32 // bits
    grouped = values.long().unflatten(-1, (-1, per_word))
    shifts = torch.arange(per_word) * bits
    return (grouped << shifts).sum(-1).to(torch.int64).bitwise_and(0xFFFFFFFF).to(torch.int32)


def int_groups(w: torch.Tensor, bits: int, group: int, g_idx: torch.Tensor | None = None, symmetric=False):
    """Min-max quantization of w [R, C] by groups of input columns (`g_idx[c]` is column c's group; by
    default c // group): (q [R, C] ints, scale [G, R] float16, zero [G, R] ints), with
    w ~ (q - zero) * scale; `symmetric` as GPTQ's sym: every zero 2^(bits - 1)."""
    rows, columns = w.shape
    g_idx = torch.arange(columns) // group if g_idx is None else g_idx
    groups = int(g_idx.max()) + 1
    levels = 2**bits - 1
    scale, zero = torch.empty(groups, rows), torch.empty(groups, rows)
    for g in range(groups):
        part = w[:, g_idx == g].float()
        low, high = part.amin(1).clamp(max=0), part.amax(1).clamp(min=0)
        if symmetric:
            scale[g] = (2 * torch.maximum(-low, high) / levels).clamp(min=1e-6)
            zero[g] = (levels + 1) // 2
        else:
            scale[g] = ((high - low) / levels).clamp(min=1e-6)
            zero[g] = (-low / scale[g]).round().clamp(0, levels)
    scale = scale.half()
    q = (w.float() / scale.float()[g_idx].T + zero[g_idx].T).round().clamp(0, levels)
    return q.long(), scale, zero.long()


def pack_gptq(w: torch.Tensor, bits: int, group: int, g_idx=None, v1: bool = True, symmetric: bool = False):
    """A linear weight [R, C] as GPTQ stores it: qweight [C * bits / 32, R] (inputs packed along a word),
    qzeros [G, R * bits / 32] (outputs packed, less one in the v1 format), scales [G, R], g_idx [C]; and
    the weight it decodes to."""
    columns = w.shape[1]
    if g_idx is None:
        g_idx = torch.arange(columns) // group if group else torch.zeros(columns, dtype=torch.long)
    q, scale, zero = int_groups(w, bits, group, g_idx, symmetric)
    stored_zero = (zero - 1) & (2**bits - 1) if v1 else zero
    tensors = {
        "qweight": pack_words(q, bits).T.contiguous(),  # word k of output r: inputs k * 32 / bits onwards
        "qzeros": pack_words(stored_zero, bits),
        "scales": scale,
        "g_idx": g_idx.to(torch.int32),
    }
    return tensors, dequantize_gptq(tensors, bits, v1)


def dequantize_gptq(tensors: dict, bits: int, v1: bool) -> torch.Tensor:
    """GPTQModel's dequantize_weight (nn_modules/qlinear/__init__.py) on v2 zero points: unpack qweight
    along its rows and qzeros along its columns with shifts 0, bits, ...; scales[g_idx] * (w - z[g_idx])."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    mask = 2**bits - 1
    zeros = (tensors["qzeros"].unsqueeze(2) >> shifts.view(1, 1, -1)) & mask
    zeros = zeros.reshape(tensors["scales"].shape) + int(v1)
    weight = (tensors["qweight"].unsqueeze(1) >> shifts.view(1, -1, 1)) & mask
    weight = weight.reshape(-1, weight.shape[-1])
    g_idx = tensors["g_idx"].long()
    return (tensors["scales"].float()[g_idx] * (weight - zeros[g_idx]).float()).T


def pack_awq(w: torch.Tensor, group: int):
    """A linear weight [R, C] as AutoAWQ's GEMM kernel stores it: qweight [C, R / 8] and qzeros
    [G, R / 8] with each word's outputs in AWQ's order, scales [G, R]; and the weight it decodes to."""
    q, scale, zero = int_groups(w, 4, group)

    def pack_outputs(values: torch.Tensor) -> torch.Tensor:  # [rows, R] -> [rows, R / 8]
        return pack_words(values.unflatten(-1, (-1, 8))[..., list(AWQ_PACK_ORDER)].flatten(-2), 4)

    tensors = {"qweight": pack_outputs(q.T.contiguous()), "qzeros": pack_outputs(zero), "scales": scale}
    return tensors, dequantize_awq(tensors, group)


def dequantize_awq(tensors: dict, group: int) -> torch.Tensor:
    """vLLM's and SGLang's awq_dequantize_torch: unpack columns with shifts 0, 4, ..., 28, put them back
    in order with AWQ_REVERSE_ORDER [0, 4, 1, 5, 2, 6, 3, 7], (w - z) * s per group of input rows."""
    shifts = torch.arange(0, 32, 4)
    reverse = torch.arange(tensors["qweight"].shape[1] * 8).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].view(-1)

    def unpack(words: torch.Tensor) -> torch.Tensor:
        return ((words[:, :, None] >> shifts[None, None, :]).view(words.shape[0], -1)[:, reverse]) & 0xF

    weights, zeros = unpack(tensors["qweight"]), unpack(tensors["qzeros"]).repeat_interleave(group, 0)
    scales = tensors["scales"].float().repeat_interleave(group, 0)
    return ((weights - zeros).float() * scales).T
