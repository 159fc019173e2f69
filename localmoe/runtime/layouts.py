"""Row layouts: one routed expert as one flat row [gate | up | down | biases] ([up | down | biases] for
ungated experts), in the compute dtype or as
typed byte sections (quantized, MXFP4, FP8), and views of a stack of such rows by role. The host store,
the slot pool and the resident experts all hold rows of one layout, so a miss is one row copied and
every kernel reads a slot and a host row alike."""

import math
from dataclasses import dataclass

import torch

from localmoe.kernels.quantized import Fp8Weights, Mxfp4Weights, QuantizedWeights, QuantSpec, quantize
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


@dataclass(frozen=True)
class QuantizedLayout(_ByteRows):
    """One expert as a byte row: gate_up and down quantized group-wise along their input (see
    kernels/quantized.py), each followed by its float16 scales and zero points, then the biases in the
    compute dtype."""

    hidden: int
    intermediate: int
    bias: bool
    spec: QuantSpec
    dtype: torch.dtype  # of the biases, and of the dequantized weights
    gated: bool = True

    def _parts(self):
        h, i, spec, inputs = self.hidden, self.intermediate, self.spec, self.inputs
        return [
            ("gate_up", (inputs, spec.packed_columns(h)), torch.uint8),
            ("gate_up_scale", (inputs, h // spec.group), torch.float16),
            ("gate_up_zero", (inputs, h // spec.group), torch.float16),
            ("down", (h, spec.packed_columns(i)), torch.uint8),
            ("down_scale", (h, i // spec.group), torch.float16),
            ("down_zero", (h, i // spec.group), torch.float16),
            *self._bias_parts(),
        ]

    def _weights(self, rows: torch.Tensor, name: str) -> QuantizedWeights:
        q, scale, zero = (self._view(rows, name + suffix) for suffix in ("", "_scale", "_zero"))
        return QuantizedWeights(q, scale, zero, self.spec, self.dtype)

    def gate_up(self, rows: torch.Tensor) -> QuantizedWeights:
        return self._weights(rows, "gate_up")

    def down(self, rows: torch.Tensor) -> QuantizedWeights:
        return self._weights(rows, "down")

    def pack(self, row: torch.Tensor, roles: dict[str, torch.Tensor]) -> None:
        """Quantize an expert's roles into its byte row [numel]."""
        rows = row[None]
        gate_up = torch.cat([roles[role] for role in input_roles(self.gated)])
        for name, matrix in (("gate_up", gate_up), ("down", roles["down"])):
            for suffix, part in zip(("", "_scale", "_zero"), quantize(matrix, self.spec), strict=True):
                self._view(rows, name + suffix)[0].copy_(part)
        self._pack_biases(rows, roles)


@dataclass(frozen=True)
class Mxfp4Layout(_ByteRows):
    """gpt-oss's MXFP4 experts kept as the checkpoint stores them: FP4 codes (two per byte) and a
    power-of-two exponent per 32 inputs, gate rows first; the biases in the compute dtype."""

    hidden: int
    intermediate: int
    bias: bool
    dtype: torch.dtype

    reads_packed = True

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

    def pack(self, row: torch.Tensor, roles: dict[str, torch.Tensor]) -> None:
        """Copy an expert's stored MXFP4 roles (see `Mxfp4.read_packed`) into its byte row."""
        rows = row[None]
        for name, first, second in (("gate_up", "gate", "up"), ("gate_up_scales", "gate_scales", "up_scales")):
            self._view(rows, name)[0].copy_(torch.cat((roles[first], roles[second])))
        self._view(rows, "down")[0].copy_(roles["down"])
        self._view(rows, "down_scales")[0].copy_(roles["down_scales"])
        self._pack_biases(rows, roles)


@dataclass(frozen=True)
class Fp8Layout(_ByteRows):
    """Block-scaled FP8 experts kept as the checkpoint stores them: each matrix's bits (one byte per
    weight) and a float32 multiplier per `block` x `block` tile, gate rows first."""

    hidden: int
    intermediate: int
    bias: bool
    block: int
    dtype: torch.dtype

    reads_packed = True

    def _parts(self):
        h, i, b = self.hidden, self.intermediate, self.block
        return [
            ("gate_up", (2 * i, h), torch.uint8),
            ("gate_up_scale", (2 * i // b, h // b), torch.float32),
            ("down", (h, i), torch.uint8),
            ("down_scale", (h // b, i // b), torch.float32),
        ]

    def gate_up(self, rows: torch.Tensor) -> Fp8Weights:
        return Fp8Weights(self._view(rows, "gate_up"), self._view(rows, "gate_up_scale"), self.block, self.dtype)

    def down(self, rows: torch.Tensor) -> Fp8Weights:
        return Fp8Weights(self._view(rows, "down"), self._view(rows, "down_scale"), self.block, self.dtype)

    def pack(self, row: torch.Tensor, roles: dict[str, torch.Tensor]) -> None:
        """Copy an expert's stored FP8 roles (see `PerExpert.read_packed`) into its byte row."""
        rows = row[None]
        self._view(rows, "gate_up")[0].copy_(torch.cat((roles["gate"], roles["up"])))
        self._view(rows, "gate_up_scale")[0].copy_(torch.cat((roles["gate_scale"], roles["up_scale"])))
        self._view(rows, "down")[0].copy_(roles["down"])
        self._view(rows, "down_scale")[0].copy_(roles["down_scale"])


def _aligned(nbytes: int, to: int = 16) -> int:
    return (nbytes + to - 1) // to * to


def layout_of(source: ExpertSource, quant: QuantSpec | None = None, dtype: torch.dtype | None = None):
    """The row layout of the source's experts: in the compute dtype; quantized by `quant`; or, for a
    checkpoint whose experts are block-scaled FP8 or MXFP4 (gpt-oss) and no other quantization asked
    for, as stored."""
    block = next(iter(source.blocks.values()))
    if quant is None and (fp8_block := source.fp8_block):
        return Fp8Layout(block.hidden_size, block.intermediate_size, block.expert_bias, fp8_block, dtype)
    if quant is None and source.all_mxfp4:
        return Mxfp4Layout(block.hidden_size, block.intermediate_size, block.expert_bias, dtype)
    if quant is None:
        return ExpertLayout(block.hidden_size, block.intermediate_size, block.expert_bias, block.gated)
    quant.check(block.hidden_size, block.intermediate_size)
    return QuantizedLayout(block.hidden_size, block.intermediate_size, block.expert_bias, quant, dtype, block.gated)
