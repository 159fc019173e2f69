"""Row layouts: one routed expert as one flat row [gate | up | down | biases] ([up | down | biases] for
ungated experts), in the compute dtype or as typed byte sections (quantized integers, MXFP4, NVFP4, FP8),
and views of a stack of such rows by role. The host store,
the slot pool and the resident experts all hold rows of one layout, so a miss is one row copied and
every kernel reads a slot and a host row alike. A byte layout packs an expert as the checkpoint stores it
(`pack_stored`) or quantizes its decoded weights into its form (`pack`): localmoe's own quantization, and
the MTP layers' experts a release keeps unquantized beside the model's quantized ones."""

import math
from dataclasses import dataclass

import torch

from localmoe.kernels.quantized import (
    MXFP4,
    MXFP8,
    Fp8Weights,
    Mxfp4Weights,
    Nvfp4Weights,
    QuantizedWeights,
    QuantSpec,
    StoredFormat,
    quantize,
    quantize_fp8_blocks,
    quantize_mxfp4,
    quantize_nvfp4,
)
from localmoe.models.expert_source import ExpertSource
from localmoe.models.expert_tensors import input_roles, role_shapes


@dataclass(frozen=True)
class ExpertLayout:
    """Where the roles sit in one expert's flat row, and views of a stack of rows [N, numel] by role."""

    hidden: int
    intermediate: int
    bias: bool = False
    gated: bool = True

    row_dtype = None  # rows are in the compute dtype
    reads_packed = False
    format = None  # what the kernels read: weights in the compute dtype

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return role_shapes(self.hidden, self.intermediate, self.bias, self.gated)  # in row order

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())

    @property
    def inputs(self) -> int:
        """The rows of the input projection: 2I (gate and up), or I (up alone) for ungated experts."""
        return len(input_roles(self.gated)) * self.intermediate

    def gate_up(self, rows: torch.Tensor) -> torch.Tensor:
        """[N, 2I, E], gate rows first ([N, I, E] for ungated experts)."""
        return rows[:, : self.inputs * self.hidden].view(-1, self.inputs, self.hidden)

    def down(self, rows: torch.Tensor) -> torch.Tensor:
        """[N, E, I]."""
        i, h = self.intermediate, self.hidden
        start = self.inputs * h
        return rows[:, start : start + h * i].view(-1, h, i)

    def biases(self, rows: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """gate_up bias [N, 2I] and down bias [N, E], or (None, None) for experts without biases."""
        if not self.bias:
            return None, None
        start = (self.inputs + self.intermediate) * self.hidden
        middle = start + self.inputs
        return rows[:, start:middle], rows[:, middle : middle + self.hidden]

    def pack(self, row: torch.Tensor, roles: dict[str, torch.Tensor]) -> None:
        """Copy an expert's roles into its flat row [numel], converting to the row's dtype."""
        offset = 0
        for role, shape in self.shapes.items():
            size = math.prod(shape)
            row[offset : offset + size].view(shape).copy_(roles[role])
            offset += size


class _ByteRows:
    """A layout whose expert row is bytes cut into typed sections, each starting on a 16-byte boundary
    so that typed views of it line up. Subclasses list the sections in `_parts`."""

    row_dtype = torch.uint8
    reads_packed = False  # whether `pack` takes the checkpoint's stored form rather than decoded weights
    gated = True  # the experts have gate projections (MXFP4 and FP8 experts as stored all do)

    def _parts(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        raise NotImplementedError

    @property
    def _sections(self) -> dict[str, tuple[int, tuple[int, ...], torch.dtype]]:
        """name -> (byte offset, shape, dtype)."""
        sections, offset = {}, 0
        for name, shape, dtype in self._parts():
            sections[name] = (offset, shape, dtype)
            offset += _aligned(math.prod(shape) * dtype.itemsize)
        return sections

    @property
    def numel(self) -> int:
        """Bytes per expert."""
        offset, shape, dtype = list(self._sections.values())[-1]
        return offset + _aligned(math.prod(shape) * dtype.itemsize)

    def _view(self, rows: torch.Tensor, name: str) -> torch.Tensor:
        offset, shape, dtype = self._sections[name]
        size = math.prod(shape) * dtype.itemsize
        return rows[:, offset : offset + size].view(dtype).view(rows.shape[0], *shape)

    @property
    def inputs(self) -> int:
        """The rows of the input projection: 2I (gate and up), or I (up alone) for ungated experts."""
        return len(input_roles(self.gated)) * self.intermediate

    def _bias_parts(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return (
            [("gate_up_bias", (self.inputs,), self.dtype), ("down_bias", (self.hidden,), self.dtype)]
            if self.bias
            else []
        )

    def biases(self, rows: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.bias:
            return None, None
        return self._view(rows, "gate_up_bias"), self._view(rows, "down_bias")

    def _pack_biases(self, rows: torch.Tensor, roles: dict[str, torch.Tensor]) -> None:
        if self.bias:
            inputs = input_roles(self.gated)
            self._view(rows, "gate_up_bias")[0].copy_(torch.cat([roles[f"{role}_bias"] for role in inputs]))
            self._view(rows, "down_bias")[0].copy_(roles["down_bias"])

    def _encoded(self, w: torch.Tensor):
        """A decoded matrix [R, C] quantized into the layout's form, as a stack of one (kernels/quantized.py)."""
        raise NotImplementedError

    def pack(self, row: torch.Tensor, roles: dict[str, torch.Tensor]) -> None:
        """Quantize an expert's decoded roles into its byte row [numel], then pack them as stored."""
        encoded = {role: w if role.endswith("_bias") else self._encoded(w) for role, w in roles.items()}
        self.pack_stored(row, encoded)

    def pack_stored(self, row: torch.Tensor, roles: dict) -> None:
        """Copy an expert as stored (its roles each a stack of one matrix, see `ExpertSource.read` with
        `packed`) into its byte row: gate and up stacked along the rows of every part (and along the parts
        of per-part tables: act-order groups, NVFP4's global scales), then down, then the biases."""
        rows = row[None]
        inputs = [roles[role].parts() for role in input_roles(self.gated)]
        gate_up = {suffix: torch.cat([parts[suffix] for parts in inputs], dim=1) for suffix in inputs[0]}
        for name, parts in (("gate_up", gate_up), ("down", roles["down"].parts())):
            for suffix, tensor in parts.items():
                self._view(rows, name + suffix)[0].copy_(tensor[0])
        self._pack_biases(rows, roles)


@dataclass(frozen=True)
class QuantizedLayout(_ByteRows):
    """One expert as a byte row: gate_up and down quantized group-wise along their input (see
    kernels/quantized.py), each followed by its scales, zero points (unless symmetric) and act-order
    groups (where the spec has them), then the biases in the compute dtype. Quantized by localmoe from
    decoded weights, or (`stored`) repacked from a checkpoint's own integers."""

    hidden: int
    intermediate: int
    bias: bool
    spec: QuantSpec
    dtype: torch.dtype  # of the biases, and of the dequantized weights
    gated: bool = True
    stored: bool = False  # the checkpoint's own integers, copied as stored rather than quantized here

    @property
    def reads_packed(self) -> bool:
        return self.stored

    @property
    def format(self) -> QuantSpec:
        return self.spec

    def _parts(self):
        h, i, pieces = self.hidden, self.intermediate, len(input_roles(self.gated))
        return [*self._matrix("gate_up", self.inputs, h, pieces), *self._matrix("down", h, i, 1), *self._bias_parts()]

    def _matrix(self, name: str, rows: int, columns: int, pieces: int):
        spec, groups = self.spec, self.spec.groups(columns)
        parts = [
            (name, (rows, spec.packed_columns(columns)), torch.uint8),
            (f"{name}_scale", (rows, groups), spec.scale_dtype),
        ]
        if not spec.symmetric:
            parts.append((f"{name}_zero", (rows, groups), torch.float16))
        if spec.act_order:
            parts.append((f"{name}_g_idx", (pieces, columns), torch.int32))
        return parts

    def _weights(self, rows: torch.Tensor, name: str) -> QuantizedWeights:
        q, scale = self._view(rows, name), self._view(rows, f"{name}_scale")
        zero = None if self.spec.symmetric else self._view(rows, f"{name}_zero")
        g_idx = self._view(rows, f"{name}_g_idx") if self.spec.act_order else None
        return QuantizedWeights(q, scale, zero, self.spec, self.dtype, g_idx)

    def gate_up(self, rows: torch.Tensor) -> QuantizedWeights:
        return self._weights(rows, "gate_up")

    def down(self, rows: torch.Tensor) -> QuantizedWeights:
        return self._weights(rows, "down")

    def _encoded(self, w: torch.Tensor) -> QuantizedWeights:
        """Groups by position: with act order, each column's group is its position's."""
        q, scale, zero = quantize(w, self.spec)
        columns = w.shape[1]
        g_idx = (
            (torch.arange(columns) // (self.spec.group or columns)).int()[None, None] if self.spec.act_order else None
        )
        zero = None if zero is None else zero[None]
        return QuantizedWeights(q[None], scale[None], zero, self.spec, self.dtype, g_idx)


@dataclass(frozen=True)
class Mxfp4Layout(_ByteRows):
    """MXFP4 experts kept as the checkpoint stores them (gpt-oss, DeepSeek-V4, compressed-tensors'
    mxfp4-pack-quantized): FP4 codes (two per byte) and a power-of-two exponent per 32 inputs, gate rows
    first; the biases in the compute dtype."""

    hidden: int
    intermediate: int
    bias: bool
    dtype: torch.dtype

    reads_packed = True
    format = MXFP4

    def _parts(self):
        h, i = self.hidden, self.intermediate
        return [
            ("gate_up", (2 * i, h // 2), torch.uint8),
            ("gate_up_scales", (2 * i, h // 32), torch.uint8),
            ("down", (h, i // 2), torch.uint8),
            ("down_scales", (h, i // 32), torch.uint8),
            *self._bias_parts(),
        ]

    def gate_up(self, rows: torch.Tensor) -> Mxfp4Weights:
        return Mxfp4Weights(self._view(rows, "gate_up"), self._view(rows, "gate_up_scales"), self.dtype)

    def down(self, rows: torch.Tensor) -> Mxfp4Weights:
        return Mxfp4Weights(self._view(rows, "down"), self._view(rows, "down_scales"), self.dtype)

    def _encoded(self, w: torch.Tensor) -> Mxfp4Weights:
        codes, exponents = quantize_mxfp4(w)
        return Mxfp4Weights(codes[None], exponents[None], self.dtype)


@dataclass(frozen=True)
class Nvfp4Layout(_ByteRows):
    """NVFP4 experts kept as the checkpoint stores them (ModelOpt, compressed-tensors): FP4 codes, an e4m3
    scale per 16 inputs, and the float32 scale of each matrix (gate's and up's, then down's), which
    multiplies or `divides`; the biases in the compute dtype."""

    hidden: int
    intermediate: int
    bias: bool
    divides: bool
    dtype: torch.dtype

    reads_packed = True

    @property
    def format(self) -> StoredFormat:
        return StoredFormat("nvfp4", 16, self.divides)

    def _parts(self):
        h, i = self.hidden, self.intermediate
        return [
            ("gate_up", (2 * i, h // 2), torch.uint8),
            ("gate_up_scales", (2 * i, h // 16), torch.uint8),
            ("gate_up_global", (2,), torch.float32),
            ("down", (h, i // 2), torch.uint8),
            ("down_scales", (h, i // 16), torch.uint8),
            ("down_global", (1,), torch.float32),
            *self._bias_parts(),
        ]

    def _weights(self, rows: torch.Tensor, name: str) -> Nvfp4Weights:
        parts = (self._view(rows, name + suffix) for suffix in ("", "_scales", "_global"))
        return Nvfp4Weights(*parts, self.divides, self.dtype)

    def gate_up(self, rows: torch.Tensor) -> Nvfp4Weights:
        return self._weights(rows, "gate_up")

    def down(self, rows: torch.Tensor) -> Nvfp4Weights:
        return self._weights(rows, "down")

    def _encoded(self, w: torch.Tensor) -> Nvfp4Weights:
        codes, scales, global_scale = quantize_nvfp4(w, self.divides)
        return Nvfp4Weights(codes[None], scales[None], global_scale[None], self.divides, self.dtype)


@dataclass(frozen=True)
class Fp8Layout(_ByteRows):
    """Block-scaled FP8 experts kept as the checkpoint stores them: each matrix's bits (one byte per
    weight) and a float32 multiplier per `block` x `block` tile, or per (rows, columns) tile where 0
    spans the whole width (one per row: (1, 0)), gate rows first; or (`exponents`, MXFP8) an exponent
    byte per 1 x 32 tile."""

    hidden: int
    intermediate: int
    bias: bool
    block: int | tuple[int, int]
    dtype: torch.dtype
    exponents: bool = False

    reads_packed = True

    @property
    def format(self) -> StoredFormat:
        return MXFP8 if self.exponents else StoredFormat("fp8", self.block)

    def _parts(self):
        h, i = self.hidden, self.intermediate
        scale = torch.uint8 if self.exponents else torch.float32
        return [
            ("gate_up", (2 * i, h), torch.uint8),
            ("gate_up_scale", _grid(self.block, 2 * i, h), scale),
            ("down", (h, i), torch.uint8),
            ("down_scale", _grid(self.block, h, i), scale),
        ]

    def gate_up(self, rows: torch.Tensor) -> Fp8Weights:
        return Fp8Weights(self._view(rows, "gate_up"), self._view(rows, "gate_up_scale"), self.block, self.dtype)

    def down(self, rows: torch.Tensor) -> Fp8Weights:
        return Fp8Weights(self._view(rows, "down"), self._view(rows, "down_scale"), self.block, self.dtype)

    def _encoded(self, w: torch.Tensor) -> Fp8Weights:
        bits, scale = quantize_fp8_blocks(w, _tile(self.block, *w.shape), self.exponents)
        return Fp8Weights(bits[None], scale[None], self.block, self.dtype)


def _tile(block: int | tuple[int, int], rows: int, columns: int) -> tuple[int, int]:
    """An FP8 scale's tile in a matrix [rows, columns] (0 spans the whole width)."""
    tile = (block, block) if isinstance(block, int) else block
    return tile[0] or rows, tile[1] or columns


def _grid(block: int | tuple[int, int], rows: int, columns: int) -> tuple[int, int]:
    tile = _tile(block, rows, columns)
    return rows // tile[0], columns // tile[1]


def _tiles(block: int | tuple[int, int], hidden: int, intermediate: int) -> bool:
    """Whether FP8 scale tiles tile the gate and up [I, E] and down [E, I] matrices exactly, so that the
    experts' stored scales fit one row layout."""
    return all(
        rows % tile[0] == 0 and columns % tile[1] == 0
        for rows, columns in ((intermediate, hidden), (hidden, intermediate))
        for tile in [_tile(block, rows, columns)]
    )


def _aligned(nbytes: int, to: int = 16) -> int:
    return (nbytes + to - 1) // to * to


def layout_of(source: ExpertSource, quant: QuantSpec | None = None, dtype: torch.dtype | None = None):
    """The row layout of the source's experts: in the compute dtype; quantized by `quant`; or, where no
    other quantization is asked for and the checkpoint stores every expert in one form a layout holds,
    as stored (repacked without loss where the checkpoint packs its integers otherwise)."""
    block = next(iter(source.blocks.values()))
    h, i, bias = block.hidden_size, block.intermediate_size, block.expert_bias
    form = source.stored_form if quant is None else None
    if isinstance(form, QuantSpec):
        return QuantizedLayout(h, i, bias, form, dtype, block.gated, stored=True)
    if not block.gated:  # the other stored forms' rows hold gate and up: ungated experts are decoded
        form = None
    if form == MXFP4:
        return Mxfp4Layout(h, i, bias, dtype)
    if isinstance(form, StoredFormat) and form.kind == "nvfp4":
        return Nvfp4Layout(h, i, bias, form.divides, dtype)
    if form == MXFP8 and not bias:  # whole tiles: the checkpoint's layout checks its widths
        return Fp8Layout(h, i, bias, (1, 32), dtype, exponents=True)
    if isinstance(form, StoredFormat) and form.kind == "fp8" and not bias and _tiles(form.block, h, i):
        return Fp8Layout(h, i, bias, form.block, dtype)
    if quant is None:
        return ExpertLayout(h, i, bias, block.gated)
    quant.check(h, i)
    return QuantizedLayout(h, i, bias, quant, dtype, block.gated)
