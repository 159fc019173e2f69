"""The host tier: every routed expert, ready to be copied into a device slot.

In RAM, each expert is one contiguous row [gate | up | down] in the compute dtype, so a miss is one
copy; for CUDA the rows are pinned (registered in place, not through PyTorch's pinned allocator,
which rounds each block up to a power of two). When RAM is short the store reads experts straight
from the checkpoint's memory-mapped shards instead, role by role.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from localmoe.loader import ExpertSource
from localmoe.progress import progress

PAGE = 4096


@dataclass(frozen=True)
class ExpertLayout:
    """Where the roles sit in one expert's flat row, and how to view a stack of rows."""

    hidden: int
    intermediate: int

    @property
    def numel(self) -> int:
        return 3 * self.intermediate * self.hidden

    def gate_up(self, rows: torch.Tensor) -> torch.Tensor:
        """[N, 2I, E] view of rows [N, numel]."""
        return rows[:, : 2 * self.intermediate * self.hidden].view(-1, 2 * self.intermediate, self.hidden)

    def down(self, rows: torch.Tensor) -> torch.Tensor:
        """[N, E, I] view of rows [N, numel]."""
        return rows[:, 2 * self.intermediate * self.hidden :].view(-1, self.hidden, self.intermediate)

    def roles(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of one flat row [numel] as gate, up [I, E] and down [E, I]."""
        rows = row.view(1, -1)
        gate_up = self.gate_up(rows)[0]
        return {"gate": gate_up[: self.intermediate], "up": gate_up[self.intermediate :], "down": self.down(rows)[0]}


class ExpertStore:
    def __init__(self, source: ExpertSource, dtype: torch.dtype, mode: str, device: torch.device):
        """mode "ram": packed rows in host memory, pinned in place for a CUDA `device`; "mmap": read from
        the shards, through a pinned staging row for CUDA."""
        block = next(iter(source.blocks.values()))
        self.source = source
        self.dtype = dtype
        self.layout = ExpertLayout(block.hidden_size, block.intermediate_size)
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
            for role, view in self.layout.roles(row).items():
                view.copy_(roles[role])
            return
        # The copy out of the staging row is synchronous, so the row is free again on return.
        for role, view in self.layout.roles(self._staging).items():
            view.copy_(roles[role])
        row.copy_(self._staging)

    def _pack_all(self) -> Iterator[torch.Tensor]:
        """Pack each layer's experts into rows [E, numel], yielding each layer's rows once filled."""
        layers = self.source.blocks
        for layer, block in progress(layers.items(), len(layers), "packing experts into host RAM (layers)"):
            rows = _page_aligned_empty(block.num_experts, self.layout.numel, self.dtype)
            for expert in range(block.num_experts):
                roles = self.source.read(layer, expert)
                for role, view in self.layout.roles(rows[expert]).items():
                    view.copy_(roles[role])
            self.rows[layer] = rows
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
