"""The host tier: every routed expert, ready to be copied into a device slot.

In RAM, each expert is one contiguous row [gate | up | down | biases] in the compute dtype, so a miss
is one copy; for CUDA the rows are pinned (registered in place, not through PyTorch's pinned
allocator, which rounds each block up to a power of two). When RAM is short the store reads experts
straight from the checkpoint's memory-mapped shards instead, role by role.
"""

import functools

import torch

from localmoe.kernels.quantized import QuantSpec
from localmoe.kernels.reference import ExpertStack
from localmoe.models.expert_source import ExpertSource
from localmoe.progress import progress
from localmoe.runtime.layouts import ExpertLayout, layout_of
from localmoe.runtime.quantized_cache import QuantizedLayers

PAGE = 4096


def packed_layer(source: ExpertSource, layer: int, layout: ExpertLayout, rows: torch.Tensor) -> torch.Tensor:
    """Fill `rows` [E, numel] with the layer's experts, in expert order."""
    for expert in range(rows.shape[0]):
        layout.pack(rows[expert], source.read(layer, expert, packed=layout.reads_packed))
    return rows


def host_rows(source: ExpertSource, layout, dtype: torch.dtype, quantized: QuantizedLayers | None, mapped=False):
    """Each MoE layer's experts as host rows [E, numel], in layer order: (layer, rows). Packed from the
    checkpoint in the compute dtype; or, for a quantized layout, through the on-disk cache of quantized
    rows (read into RAM, or `mapped` from its files), quantizing the layers it lacks."""
    row_dtype = layout.row_dtype or dtype
    layers = source.blocks
    what = "reading quantized experts" if quantized and quantized.complete(layers) else "quantizing experts"
    label = f"{what} (layers)" if quantized else "packing experts into host RAM (layers)"
    for layer, block in progress(layers.items(), len(layers), label):
        shape = (block.num_experts, layout.numel)
        if quantized is None:
            yield layer, packed_layer(source, layer, layout, _page_aligned_empty(*shape, row_dtype))
            continue
        build = functools.partial(packed_layer, source, layer, layout)
        yield layer, quantized.rows(layer, shape, lambda shape: _page_aligned_empty(*shape, row_dtype), build, mapped)


class ExpertStore:
    def __init__(
        self,
        source: ExpertSource,
        dtype: torch.dtype,
        mode: str,
        device: torch.device,
        quant: QuantSpec | None = None,
        quantized: QuantizedLayers | None = None,
    ):
        """mode "ram": packed rows in host memory, pinned in place for a CUDA `device`; "mmap": read from
        the shards, through a pinned staging row for CUDA. With `quant`, experts are kept quantized, their
        rows coming from (and going to) the on-disk cache `quantized`: "mmap" then maps its files."""
        self.source = source
        self.dtype = dtype
        self.layout = layout_of(source, quant, dtype)
        self.row_dtype = self.layout.row_dtype or dtype
        self.mode = mode
        self.rows: dict[int, torch.Tensor] = {}
        self.pinned: set[int] = set()  # layers whose rows are page-locked (and mapped for the device)
        self.cuda = cuda = device.type == "cuda"
        if mode == "ram" or quant is not None:
            for layer, rows in host_rows(source, self.layout, dtype, quantized, mapped=mode == "mmap"):
                self.rows[layer] = rows
                if cuda and mode == "ram" and _pin_in_place(rows):
                    self.pinned.add(layer)
        # Page faults make direct copies from a mapped file to the GPU crawl: a miss gathers its roles
        # in this pinned row first.
        self._staging = (
            torch.empty(self.layout.numel, dtype=self.row_dtype, pin_memory=True) if cuda and mode == "mmap" else None
        )

    @property
    def expert_bytes(self) -> int:
        return self.layout.numel * self.row_dtype.itemsize

    @property
    def readable_in_place(self) -> bool:
        return self.not_in_place() is None

    def not_in_place(self) -> str | None:
        """Why a kernel cannot read every layer's experts where they lie, or None when it can: rows in
        memory (RAM, or mapped quantized files on the CPU), pinned for CUDA, whose device reads them over
        the bus."""
        layers = set(self.source.blocks)
        if set(self.rows) != layers:
            return "the experts are read from the checkpoint files (mmap), RAM being short"
        if self.cuda and self.mode == "mmap":
            return "the quantized experts are mapped from their files, whose pages are not pinned"
        if self.cuda and self.pinned != layers:
            return f"pinning the experts' host copy was refused for {len(layers - self.pinned)} layers"
        return None

    def in_place(self, layer: int) -> ExpertStack:
        """The layer's experts as a kernel reads them where they lie, indexed by expert id."""
        rows = self.rows[layer]
        return ExpertStack(self.layout.gate_up(rows), self.layout.down(rows), *self.layout.biases(rows))

    def copy_to(self, row: torch.Tensor, layer: int, expert: int) -> None:
        """Copy one expert into the flat device row `row`, on the current stream."""
        if self.mode == "ram":
            # Asynchronous from pinned rows; from a layer whose pinning was refused it is synchronous.
            row.copy_(self.rows[layer][expert], non_blocking=row.is_cuda)
            return
        staging = row if row.device.type == "cpu" else self._staging
        if layer in self.rows:  # mapped quantized rows
            staging.copy_(self.rows[layer][expert])
        else:
            self.layout.pack(staging, self.source.read(layer, expert, packed=self.layout.reads_packed))
        if staging is not row:
            row.copy_(staging)  # synchronous, so the staging row is free again on return


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
