"""Group-wise affine quantization of expert weights, and its plain-PyTorch dequantization (the CPU path
and the oracle of the Triton kernels' quantized variants).

A matrix [R, C] is cut into groups of `group` consecutive columns per row; each group keeps a float16
scale and zero point, and its values as unsigned `bits`-bit integers: w = (q - zero) * scale. The
range of a group always includes 0, so the zero point lies within [0, 2^bits - 1]. At 4 bits two
values share a byte along the row, the even column in the low nibble.
"""

import math
from dataclasses import dataclass

import torch

from localmoe.errors import LocalMoEError, setting

DEFAULT_GROUP = 64  # columns per scale by default, where the experts' widths allow it


def fitting_groups(*columns: int) -> list[int]:
    """The even group sizes up to DEFAULT_GROUP that divide every one of `columns`, largest first."""
    common = math.gcd(*columns)
    return [group for group in range(DEFAULT_GROUP, 1, -2) if common % group == 0]


@dataclass(frozen=True)
class QuantSpec:
    bits: int  # 8 or 4
    group: int  # columns per scale and zero point

    @classmethod
    def fitting(cls, bits: int, group: int | None, *columns: int) -> "QuantSpec":
        """`bits` with `group` columns per scale, or by default the largest that divides every one of
        `columns` (the experts' widths), checked."""
        fits = fitting_groups(*columns)
        if group is None and not fits:
            raise LocalMoEError(
                f"the experts' widths ({', '.join(map(str, columns))}) have no even common divisor to group their "
                f"columns by: they cannot be quantized; keep {setting('expert_bits')} 16"
            )
        spec = cls(bits, fits[0] if group is None else group)
        spec.check(*columns)
        return spec

    def check(self, *columns: int) -> None:
        if self.bits not in (4, 8):
            raise LocalMoEError(f"{setting('expert_bits')} {self.bits} is not supported: use 16, 8 or 4")
        if self.group < 2 or self.group % 2 or any(c % self.group for c in columns):
            fits = fitting_groups(*columns)
            hint = f"try {fits[0]}" if fits else "none does, so they cannot be quantized"
            raise LocalMoEError(
                f"{setting('expert_group_size')} {self.group} must be even and divide the experts' widths "
                f"({', '.join(map(str, columns))}): {hint}"
            )

    def packed_columns(self, columns: int) -> int:
        return columns * self.bits // 8


def quantize(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [R, C] -> (packed uint8 [R, C * bits / 8], scale and zero float16 [R, C / group])."""
    rows, columns = w.shape
    groups = w.float().reshape(rows, columns // spec.group, spec.group)
    low = groups.amin(-1).clamp(max=0)
    high = groups.amax(-1).clamp(min=0)
    levels = 2**spec.bits - 1
    scale = ((high - low) / levels).to(torch.float16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group
    zero = (-low / scale.float()).round().clamp(0, levels).to(torch.float16)
    q = (groups / scale.float()[..., None] + zero.float()[..., None]).round().clamp(0, levels).to(torch.uint8)
    q = q.reshape(rows, columns)
    if spec.bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)
    return q, scale, zero


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, dtype: torch.dtype
) -> torch.Tensor:
    """The inverse of `quantize`, in `dtype`: [..., R, C] from q [..., R, C * bits / 8] and scale, zero
    [..., R, C / group]."""
    if spec.bits == 4:
        q = torch.stack((q & 0xF, q >> 4), dim=-1).flatten(-2)
    values = q.float().unflatten(-1, (-1, spec.group))
    return ((values - zero.float()[..., None]) * scale.float()[..., None]).flatten(-2).to(dtype)


@dataclass(frozen=True)
class QuantizedWeights:
    """A stack of quantized matrices [N, R, C] that dequantizes one at a time on indexing, so the reference
    kernel (which indexes weights by slot) runs on it unchanged; the fused kernels read its parts."""

    q: torch.Tensor  # [N, R, C * bits / 8] uint8
    scale: torch.Tensor  # [N, R, C / group] float16
    zero: torch.Tensor
    spec: QuantSpec
    dtype: torch.dtype  # what indexing dequantizes to

    @property
    def shape(self) -> tuple[int, int, int]:
        n, rows, packed = self.q.shape
        return n, rows, packed * 8 // self.spec.bits

    def __getitem__(self, index: int) -> torch.Tensor:
        return dequantize(self.q[index], self.scale[index], self.zero[index], self.spec, self.dtype)


def quantized_stack(weights: torch.Tensor, spec: QuantSpec) -> QuantizedWeights:
    """Matrices [N, R, C] quantized one by one, as QuantizedWeights dequantizing to their dtype."""
    parts = [quantize(matrix, spec) for matrix in weights]
    return QuantizedWeights(*(torch.stack(part) for part in zip(*parts, strict=True)), spec, weights.dtype)


# FP4 (e2m1) values by their 4-bit code
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class StoredFormat:
    """A checkpoint's own quantized format, kept as stored: "mxfp4" (32 columns per exponent) or "fp8"
    (`block` x `block` tiles per multiplier)."""

    kind: str
    block: int


MXFP4 = StoredFormat("mxfp4", 32)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[rows, G, 16] bytes of two FP4 codes each (low nibble first) and [rows, G] power-of-two
    exponents (biased by 127) -> [rows, G * 32] float32."""
    table = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).reshape(*blocks.shape[:-1], 32)
    values = table[codes.long()] * torch.exp2(scales.float() - 127).unsqueeze(-1)
    return values.reshape(blocks.shape[0], -1)


@dataclass(frozen=True)
class Mxfp4Weights:
    """A stack of MXFP4 matrices [N, R, C]: codes [N, R, C / 2] and exponents [N, R, C / 32], dequantized
    one at a time on indexing (see QuantizedWeights)."""

    blocks: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int, int]:
        n, rows, packed = self.blocks.shape
        return n, rows, packed * 2

    def __getitem__(self, index: int) -> torch.Tensor:
        blocks = self.blocks[index]
        return dequantize_mxfp4(blocks.reshape(blocks.shape[0], -1, 16), self.scales[index]).to(self.dtype)


def dequantize_fp8_blocks(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Block-scaled FP8 (as DeepSeek, Kimi, MiniMax and Qwen ship FP8 checkpoints): w [R, C] float8
    (or its bits as uint8), scale [ceil(R / b0), ceil(C / b1)] float32 multipliers -> float32 [R, C]."""
    if w.dtype == torch.uint8:
        w = w.view(torch.float8_e4m3fn)
    rows, columns = w.shape
    full = scale.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :columns]
    return w.float() * full


@dataclass(frozen=True)
class Fp8Weights:
    """A stack of block-scaled FP8 matrices [N, R, C]: bits [N, R, C] uint8 and scales [N, R / b, C / b]
    float32, dequantized one at a time on indexing (see QuantizedWeights)."""

    bits: torch.Tensor
    scales: torch.Tensor
    block: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.bits.shape)

    def __getitem__(self, index: int) -> torch.Tensor:
        return dequantize_fp8_blocks(self.bits[index], self.scales[index], (self.block, self.block)).to(self.dtype)
