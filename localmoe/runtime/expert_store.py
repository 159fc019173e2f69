"""The host tier: every routed expert, ready to be copied into a device slot.

In RAM, each expert is one contiguous row [gate | up | down | biases] in the compute dtype, so a miss
is one copy; for CUDA the rows are pinned (registered in place, not through PyTorch's pinned
allocator, which rounds each block up to a power of two). When RAM is short the store reads experts
straight from the checkpoint's memory-mapped shards instead, role by role.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from localmoe.loader import ExpertSource
from localmoe.models.expert_tensors import role_shapes
from localmoe.progress import progress

PAGE = 4096


@dataclass(frozen=True)
class ExpertLayout:
    """Where the roles sit in one expert's flat row, and views of a stack of rows [N, numel] by role."""

    hidden: int
    intermediate: int
    bias: bool = False

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return role_shapes(self.hidden, self.intermediate, self.bias)  # in row order

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())

    def gate_up(self, rows: torch.Tensor) -> torch.Tensor:
        """[N, 2I, E], gate rows first."""
        i, h = self.intermediate, self.hidden
        return rows[:, : 2 * i * h].view(-1, 2 * i, h)

    def down(self, rows: torch.Tensor) -> torch.Tensor:
        """[N, E, I]."""
        i, h = self.intermediate, self.hidden
        return rows[:, 2 * i * h : 3 * i * h].view(-1, h, i)

    def biases(self, rows: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """gate_up bias [N, 2I] and down bias [N, E], or (None, None) for experts without biases."""
        if not self.bias:
            return None, None
        start = 3 * self.intermediate * self.hidden
        middle = start + 2 * self.intermediate
        return rows[:, start:middle], rows[:, middle : middle + self.hidden]

    def pack(self, row: torch.Tensor, roles: dict[str, torch.Tensor]) -> None:
        """Copy an expert's roles into its flat row [numel], converting to the row's dtype."""
        offset = 0
        for role, shape in self.shapes.items():
            size = math.prod(shape)
            row[offset : offset + size].view(shape).copy_(roles[role])
            offset += size


def layout_of(source: ExpertSource) -> ExpertLayout:
    block = next(iter(source.blocks.values()))
    return ExpertLayout(block.hidden_size, block.intermediate_size, block.expert_bias)


def packed_layer(source: ExpertSource, layer: int, layout: ExpertLayout, rows: torch.Tensor) -> torch.Tensor:
    """Fill `rows` [E, numel] with the layer's experts, in expert order."""
    for expert in range(rows.shape[0]):
        layout.pack(rows[expert], source.read(layer, expert))
    return rows


class ExpertStore:
    def __init__(self, source: ExpertSource, dtype: torch.dtype, mode: str, device: torch.device):
        """mode "ram": packed rows in host memory, pinned in place for a CUDA `device`; "mmap": read from
        the shards, through a pinned staging row for CUDA."""
        self.source = source
        self.dtype = dtype
        self.layout = layout_of(source)
        self.mode = mode
        self.rows: dict[int, torch.Tensor] = {}
        self.pinned_layers = 0
        cuda = device.type == "cuda"
        if mode == "ram":
            self.pinned_layers = sum(cuda and _pin_in_place(rows) for rows in self._pack_all())
        # Page faults make direct copies from a mapped file to the GPU crawl: a miss gathers its roles
        # in this pinned row first.
        self._staging = (
            torch.empty(self.layout.numel, dtype=dtype, pin_memory=True) if cuda and mode == "mmap" else None
        )

    @property
    def expert_bytes(self) -> int:
        return self.layout.numel * self.dtype.itemsize

    def copy_to(self, row: torch.Tensor, layer: int, expert: int) -> None:
        """Copy one expert into the flat device row `row`, on the current stream."""
        if self.mode == "ram":
            # Asynchronous from pinned rows; from a layer whose pinning was refused it is synchronous.
            row.copy_(self.rows[layer][expert], non_blocking=row.is_cuda)
            return
        roles = self.source.read(layer, expert)
        if row.device.type == "cpu":
            self.layout.pack(row, roles)
            return
        # The copy out of the staging row is synchronous, so the row is free again on return.
        self.layout.pack(self._staging, roles)
        row.copy_(self._staging)

    def _pack_all(self) -> Iterator[torch.Tensor]:
        """Pack each layer's experts into rows [E, numel], yielding each layer's rows once filled."""
        layers = self.source.blocks
        for layer, block in progress(layers.items(), len(layers), "packing experts into host RAM (layers)"):
            rows = _page_aligned_empty(block.num_experts, self.layout.numel, self.dtype)
            self.rows[layer] = packed_layer(self.source, layer, self.layout, rows)
            yield rows


def _page_aligned_empty(rows: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised [rows, numel] CPU tensor starting on a page boundary, as page-locking wants."""
    nbytes = rows * numel * dtype.itemsize
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % PAGE
    return raw[start : start + nbytes].view(dtype).view(rows, numel)


def _pin_in_place(tensor: torch.Tensor) -> bool:
    """Page-lock `tensor`'s memory for fast asynchronous copies; False (and unpinned) where refused.

    The memory stays registered for the life of the process: the store outlives every copy from it.
    """
    if not torch.cuda.is_available():
        return False
    cudart = torch.cuda.cudart()
    # The binding returns the CUDA error code instead of raising.
    code = cudart.cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(), 0)
    if int(code) != 0 and hasattr(cudart, "cudaGetLastError"):
        cudart.cudaGetLastError()  # clear it, so that a later launch check does not report it
    return int(code) == 0
