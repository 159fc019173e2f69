"""Quantized expert weights as the kernels read them, and their plain-PyTorch dequantization (the CPU path
and the oracle of the Triton kernels' quantized variants).

Group-wise integers (localmoe's own quantization, and GPTQ, AWQ and compressed-tensors checkpoints
repacked into the same form): a matrix [R, C] is cut into groups of `group` consecutive columns per row;
each group keeps a scale and a zero point, and its values as unsigned `bits`-bit integers:
w = (q - zero) * scale. localmoe's own groups keep float16 scales and zero points, and the range of a
group always includes 0, so the zero point lies within [0, 2^bits - 1]. At 4 bits two values share a
byte along the row, the even column in the low nibble. Checkpoints add variants (`QuantSpec`): scales in
their own dtype, no zero points (symmetric: zero = 2^(bits - 1)), one group per row, and act-order
(GPTQ's desc_act): each column's group read from a table rather than from its position.

Floating-point formats kept as checkpoints ship them: MXFP4 (e2m1 codes, a power-of-two exponent per
32 columns), NVFP4 (e2m1 codes, an FP8 e4m3 scale per 16 columns and a float32 scale per matrix),
block-scaled FP8, and MXFP8 (FP8 e4m3 with a power-of-two exponent per 32 columns). A stack of matrices
[N, R, C] in any of these forms dequantizes one matrix at a time on indexing, so the reference kernel
runs on them unchanged. Each form also has a quantizer (round to nearest, scales from each block's largest
magnitude), for the MTP layers' experts a release keeps unquantized beside the model's quantized ones.
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
    group: int  # columns per scale and zero point; 0 (checkpoints only): one group per row
    symmetric: bool = False  # no zero points stored: each is 2^(bits - 1)
    scale_dtype: torch.dtype = torch.float16
    act_order: bool = False  # each column's group read from a table per matrix (GPTQ's g_idx)

    def groups(self, columns: int) -> int:
        """Groups per row of a matrix with `columns` columns."""
        return columns // self.group if self.group else 1

    @property
    def words(self) -> str:
        """The form in a few words, for messages."""
        scale = str(self.scale_dtype).removeprefix("torch.")
        traits = [f"{scale} scales", f"groups of {self.group}" if self.group else "one group per row"]
        traits += ["symmetric"] * self.symmetric + ["act order"] * self.act_order
        return f"int{self.bits} ({', '.join(traits)})"

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


def quantize(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w [R, C] -> (packed uint8 [R, C * bits / 8], scale [R, C / group] in the spec's scale dtype, zero
    float16 [R, C / group], or None for a symmetric spec). Groups by position (no act order)."""
    rows, columns = w.shape
    groups = w.float().reshape(rows, spec.groups(columns), -1)
    levels = 2**spec.bits - 1
    if spec.symmetric:  # [-2^(bits-1) + 1, 2^(bits-1) - 1] around the implied zero
        scale = (groups.abs().amax(-1) / (levels // 2)).to(spec.scale_dtype)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = None
        offset = torch.full_like(scale, 2 ** (spec.bits - 1), dtype=torch.float32)
    else:
        low = groups.amin(-1).clamp(max=0)
        high = groups.amax(-1).clamp(min=0)
        scale = ((high - low) / levels).to(spec.scale_dtype)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group
        zero = (-low / scale.float()).round().clamp(0, levels).to(torch.float16)
        offset = zero.float()
    q = (groups / scale.float()[..., None] + offset[..., None]).round().clamp(0, levels).to(torch.uint8)
    q = q.reshape(rows, columns)
    if spec.bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)
    return q, scale, zero


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    spec: QuantSpec,
    dtype: torch.dtype,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """The inverse of `quantize`, in `dtype`: [..., R, C] from q [..., R, C * bits / 8] and scale, zero
    [..., R, G] (zero None for a symmetric spec). With act order, `g_idx` [..., P, C] gives each
    column's group, for each of P equal parts of the rows (gate and up: 2)."""
    if spec.bits == 4:
        q = torch.stack((q & 0xF, q >> 4), dim=-1).flatten(-2)
    rows, columns = q.shape[-2:]
    zero = torch.full_like(scale, 2 ** (spec.bits - 1), dtype=torch.float32) if zero is None else zero.float()
    if g_idx is None:
        group = spec.group or columns
        full_scale = scale.float().repeat_interleave(group, dim=-1)
        full_zero = zero.repeat_interleave(group, dim=-1)
    else:
        index = g_idx.long().repeat_interleave(rows // g_idx.shape[-2], dim=-2)  # [..., R, C]
        full_scale, full_zero = scale.float().gather(-1, index), zero.gather(-1, index)
    return ((q.float() - full_zero) * full_scale).to(dtype)


@dataclass(frozen=True)
class QuantizedWeights:
    """A stack of quantized matrices [N, R, C] that dequantizes one at a time on indexing, so the reference
    kernel (which indexes weights by slot) runs on it unchanged; the fused kernels read its parts."""

    q: torch.Tensor  # [N, R, C * bits / 8] uint8
    scale: torch.Tensor  # [N, R, G] in spec.scale_dtype
    zero: torch.Tensor | None  # [N, R, G] float16, None for a symmetric spec
    spec: QuantSpec
    dtype: torch.dtype  # what indexing dequantizes to
    g_idx: torch.Tensor | None = None  # [N, P, C] int32: each column's group, per part of the rows (act order)

    @property
    def shape(self) -> tuple[int, int, int]:
        n, rows, packed = self.q.shape
        return n, rows, packed * 8 // self.spec.bits

    def __getitem__(self, index: int) -> torch.Tensor:
        zero = None if self.zero is None else self.zero[index]
        g_idx = None if self.g_idx is None else self.g_idx[index]
        return dequantize(self.q[index], self.scale[index], zero, self.spec, self.dtype, g_idx)

    def parts(self) -> dict[str, torch.Tensor]:
        """Its tensors by the suffix of their section in an expert's row (see runtime/layouts.py)."""
        parts = {"": self.q, "_scale": self.scale, "_zero": self.zero, "_g_idx": self.g_idx}
        return {suffix: tensor for suffix, tensor in parts.items() if tensor is not None}


def quantized_stack(weights: torch.Tensor, spec: QuantSpec) -> QuantizedWeights:
    """Matrices [N, R, C] quantized one by one, as QuantizedWeights dequantizing to their dtype."""
    q, scale, zero = zip(*(quantize(matrix, spec) for matrix in weights), strict=True)
    zero = None if spec.symmetric else torch.stack(zero)
    return QuantizedWeights(torch.stack(q), torch.stack(scale), zero, spec, weights.dtype)


# FP4 (e2m1) values by their 4-bit code
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class StoredFormat:
    """A checkpoint's own floating-point format, kept as stored: "mxfp4" (32 columns per exponent),
    "nvfp4" (16 columns per e4m3 scale, and a float32 scale per matrix that multiplies, as ModelOpt
    stores it, or `divides`, as compressed-tensors does), "fp8" (a multiplier per `block` x `block`
    tile, or per (rows, columns) tile where 0 stands for the whole width: (1, 0) is one per row) or
    "mxfp8" (FP8 with a power-of-two exponent per 32 columns: Fp8Weights in 1 x 32 tiles whose scales are
    the exponent bytes)."""

    kind: str
    block: int | tuple[int, int]
    divides: bool = False

    @property
    def words(self) -> str:
        """The form in a few words, for messages."""
        if self.kind == "fp8":
            rows, columns = (self.block, self.block) if isinstance(self.block, int) else self.block
            return "FP8 scaled per row" if (rows, columns) == (1, 0) else f"FP8 in {rows}x{columns} blocks"
        return self.kind.upper()


MXFP4 = StoredFormat("mxfp4", 32)
MXFP8 = StoredFormat("mxfp8", 32)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[rows, G, 16] bytes of two FP4 codes each (low nibble first) and [rows, G] power-of-two
    exponents (biased by 127) -> [rows, G * 32] float32."""
    table = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).reshape(*blocks.shape[:-1], 32)
    values = table[codes.long()] * torch.exp2(scales.float() - 127).unsqueeze(-1)
    return values.reshape(blocks.shape[0], -1)


def nearest_fp4(x: torch.Tensor) -> torch.Tensor:
    """The e2m1 code of the FP4 value nearest each of x (beyond +-6: +-6), as int64 in [0, 16)."""
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=x.device)  # of FP4_VALUES[:8]
    return torch.bucketize(x.abs(), midpoints) | (torch.signbit(x).long() << 3)


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes [R, C] in [0, 16) -> bytes [R, C / 2], the even column in the low nibble."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def _exponents(amax: torch.Tensor, largest: float) -> torch.Tensor:
    """The least power-of-two exponent (within the e8m0 range) that scales `amax` to `largest` or less."""
    return torch.ceil(torch.log2(amax / largest)).clamp(-127, 127)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, C] -> (codes [R, C / 2] uint8, exponents [R, C / 32] uint8, biased by 127): `dequantize_mxfp4`'s
    input, each 32 columns scaled by the least power of two that brings them within +-6."""
    rows, columns = w.shape
    groups = w.float().reshape(rows, -1, 32)
    exponent = _exponents(groups.abs().amax(-1), 6.0)
    codes = nearest_fp4(groups / torch.exp2(exponent)[..., None]).reshape(rows, columns)
    return _nibbles(codes), (exponent + 127).to(torch.uint8)


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

    def parts(self) -> dict[str, torch.Tensor]:
        return {"": self.blocks, "_scales": self.scales}


def dequantize_nvfp4(
    codes: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor, divides: bool
) -> torch.Tensor:
    """[R, C / 2] bytes of two FP4 codes each (low nibble first), [R, C / 16] FP8 e4m3 scales (their bits
    as uint8) and a float32 scale per part of the rows [P] -> [R, C] float32: code x scale, times the
    part's scale (ModelOpt's weight_scale_2), or divided by it (compressed-tensors' weight_global_scale)."""
    table = torch.tensor(FP4_VALUES, dtype=torch.float32, device=codes.device)
    values = table[torch.stack((codes & 0x0F, codes >> 4), dim=-1).flatten(-2).long()]
    block = scales.view(torch.float8_e4m3fn).float()
    rows = global_scale.float().repeat_interleave(codes.shape[0] // global_scale.shape[0])[:, None]
    block = block / rows if divides else block * rows
    return values * block.repeat_interleave(16, dim=-1)


def quantize_nvfp4(w: torch.Tensor, divides: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [R, C] -> `dequantize_nvfp4`'s input for one part: codes [R, C / 2], e4m3 scales [R, C / 16] (bits as
    uint8) and the matrix's float32 scale [1] (ModelOpt's and compressed-tensors' recipe: the largest
    magnitude maps to 6 x 448, the largest FP4 value times the largest e4m3 one)."""
    rows, columns = w.shape
    groups = w.float().reshape(rows, -1, 16)
    per_matrix = (groups.abs().amax() / (6 * 448)).clamp(min=torch.finfo(torch.float32).tiny)
    stored = (1 / per_matrix if divides else per_matrix).reshape(1)
    scales = (groups.abs().amax(-1) / 6 / per_matrix).clamp(max=448).to(torch.float8_e4m3fn)
    block = scales.float() / stored if divides else scales.float() * stored  # as `dequantize_nvfp4` reads it
    scaled = torch.where(block[..., None] > 0, groups / block[..., None], 0.0)  # an all-zero block: codes 0
    return _nibbles(nearest_fp4(scaled).reshape(rows, columns)), scales.view(torch.uint8), stored


@dataclass(frozen=True)
class Nvfp4Weights:
    """A stack of NVFP4 matrices [N, R, C]: codes [N, R, C / 2], e4m3 scales [N, R, C / 16] (uint8 bits) and
    a float32 scale per part of the rows [N, P] (gate and up: 2), dequantized one at a time on indexing."""

    codes: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor
    divides: bool
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int, int]:
        n, rows, packed = self.codes.shape
        return n, rows, packed * 2

    def __getitem__(self, index: int) -> torch.Tensor:
        decoded = dequantize_nvfp4(self.codes[index], self.scales[index], self.global_scale[index], self.divides)
        return decoded.to(self.dtype)

    def parts(self) -> dict[str, torch.Tensor]:
        return {"": self.codes, "_scales": self.scales, "_global": self.global_scale}


def dequantize_fp8_blocks(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Block-scaled FP8 (as DeepSeek, Kimi, MiniMax and Qwen ship FP8 checkpoints): w [R, C] float8
    (or its bits as uint8), scale [ceil(R / b0), ceil(C / b1)] float32 multipliers, or uint8 exponent
    bytes 2^(b - 127) (MXFP8) -> float32 [R, C]. A block size of 0 spans the whole dimension ((1, 0): a
    multiplier per row)."""
    if w.dtype == torch.uint8:
        w = w.view(torch.float8_e4m3fn)
    rows, columns = w.shape
    block = (block[0] or rows, block[1] or columns)
    scale = torch.exp2(scale.float() - 127) if scale.dtype == torch.uint8 else scale
    full = scale.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :columns]
    return w.float() * full


def quantize_fp8_blocks(
    w: torch.Tensor, block: tuple[int, int], exponents: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, C] -> `dequantize_fp8_blocks`' input: bits [R, C] uint8 and a scale per tile, that maps its
    largest magnitude to 448 (the largest e4m3 value): float32, or (`exponents`, MXFP8) the least power of
    two that does so, as an exponent byte. The tiles divide the matrix (0: the whole dimension)."""
    rows, columns = w.shape
    tile = (block[0] or rows, block[1] or columns)
    tiles = w.float().reshape(rows // tile[0], tile[0], columns // tile[1], tile[1])
    amax = tiles.abs().amax(dim=(1, 3))
    if exponents:
        exponent = _exponents(amax, 448.0)
        scale, stored = torch.exp2(exponent), (exponent + 127).to(torch.uint8)
    else:
        scale = stored = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    scaled = (tiles / scale[:, None, :, None]).clamp(-448, 448)
    return scaled.to(torch.float8_e4m3fn).reshape(rows, columns).view(torch.uint8), stored


@dataclass(frozen=True)
class Fp8Weights:
    """A stack of block-scaled FP8 matrices [N, R, C]: bits [N, R, C] uint8 and scales, float32 multipliers
    or (MXFP8) uint8 exponent bytes, one per `block` x `block` tile [N, R / b, C / b], or per (rows,
    columns) tile for a tuple (0: the whole width, (1, 0): [N, R, 1]), dequantized one at a time on
    indexing (see QuantizedWeights)."""

    bits: torch.Tensor
    scales: torch.Tensor
    block: int | tuple[int, int]
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.bits.shape)

    def __getitem__(self, index: int) -> torch.Tensor:
        block = (self.block, self.block) if isinstance(self.block, int) else self.block
        return dequantize_fp8_blocks(self.bits[index], self.scales[index], block).to(self.dtype)

    def parts(self) -> dict[str, torch.Tensor]:
        return {"": self.bits, "_scale": self.scales}
