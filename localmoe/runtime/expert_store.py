"""The host tier: every routed expert, ready to be copied into a device slot or read where it lies.

In RAM, each expert is one contiguous row [gate | up | down | biases] in the compute dtype, so a miss
is one copy; for CUDA the rows are pinned in place through the driver, mapped for the device (not
through PyTorch's pinned allocator, which rounds each block up to a power of two), so that a kernel
can also read them over the bus. When RAM is short the store reads experts straight from the
checkpoint's memory-mapped shards instead, role by role.
"""

import functools
import queue
import threading
from collections.abc import Callable

import torch

from localmoe.kernels.quantized import QuantSpec
from localmoe.kernels.reference import ExpertStack
from localmoe.models.expert_source import ExpertSource
from localmoe.progress import progress
from localmoe.runtime.layouts import ExpertLayout, layout_of
from localmoe.runtime.pinning import Driver, Pinned
from localmoe.runtime.quantized_cache import QuantizedLayers

PAGE = 4096


def quantized_here(source: ExpertSource, layout, layer: int) -> bool:
    """Whether localmoe quantizes the layer's experts into the layout's form: every layer's for
    --expert-bits; where the experts are kept as stored, the MTP layers' stored otherwise (bfloat16)."""
    return layout.row_dtype is not None and not (layout.reads_packed and source.kept_as_stored(layer))


def pack_expert(row: torch.Tensor, source: ExpertSource, layout, layer: int, expert: int) -> None:
    """Fill `row` [numel] with one expert: copied as stored, or decoded and packed (quantized) by `layout`."""
    if layout.reads_packed and source.kept_as_stored(layer):
        layout.pack_stored(row, source.read(layer, expert, packed=True))
    else:
        layout.pack(row, source.read(layer, expert))


def packed_layer(source: ExpertSource, layer: int, layout: ExpertLayout, rows: torch.Tensor) -> torch.Tensor:
    """Fill `rows` [E, numel] with the layer's experts, in expert order."""
    for expert in range(rows.shape[0]):
        pack_expert(rows[expert], source, layout, layer, expert)
    return rows


def host_rows(
    source: ExpertSource,
    layout,
    dtype: torch.dtype,
    quantized: QuantizedLayers | None,
    mapped=False,
    layers: list[int] | None = None,
):
    """The experts of `layers` (default: every MoE layer) as host rows [E, numel], in layer order: (layer,
    rows). Packed from the checkpoint; those localmoe quantizes (`quantized_here`) through the on-disk cache
    of quantized rows `quantized` where given (read into RAM, or `mapped` from its files), quantizing the
    layers it lacks."""
    row_dtype = layout.row_dtype or dtype
    layers = {layer: source.blocks[layer] for layer in (source.layers if layers is None else layers)}
    cached = [layer for layer in layers if quantized is not None and quantized_here(source, layout, layer)]
    what = "reading quantized experts" if quantized and quantized.complete(cached) else "quantizing experts"
    label = f"{what} (layers)" if cached else "packing experts into host RAM (layers)"
    for layer, block in progress(layers.items(), len(layers), label):
        shape = (block.num_experts, layout.numel)
        if layer not in cached:
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
        driver: Driver | None = None,
    ):
        """mode "ram": packed rows in host memory, pinned in place for a CUDA `device`; "mmap": read from
        the shards, through a pinned staging row for CUDA. With `quant`, experts are kept quantized, their
        rows coming from (and going to) the on-disk cache `quantized`: "mmap" then maps its files; so are
        the MTP layers' experts that localmoe quantizes into the form the model's are kept in as stored.
        `driver`: what pins RAM rows: for CUDA, the CUDA driver unless given; given, even for the CPU
        device (tests give a stand-in)."""
        self.source = source
        self.dtype = dtype
        self.layout = layout_of(source, quant, dtype)
        self.row_dtype = self.layout.row_dtype or dtype
        self.mode = mode
        self.rows: dict[int, torch.Tensor] = {}
        self.pinned: set[int] = set()  # layers whose rows are page-locked (and mapped for the device)
        self.cuda = cuda = device.type == "cuda"
        self._pins = Pinned(driver)
        # "mmap" reads the experts kept as stored from the shards; what localmoe quantizes, from its files
        held = source.layers if mode == "ram" else [i for i in source.layers if quantized_here(source, self.layout, i)]
        if held:
            for layer, rows in host_rows(source, self.layout, dtype, quantized, mode == "mmap", held):
                self.rows[layer] = rows
                if (cuda or driver is not None) and mode == "ram" and self._pins.add(rows):
                    self.pinned.add(layer)
        # Page faults make direct copies from a mapped file to the GPU crawl, and a copy from pageable
        # memory is synchronous: a reader thread gathers each miss in pinned staging rows first.
        self._reader = StagedReader(self, device) if cuda and mode == "mmap" else None

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
            refused = len(layers - self.pinned)
            return f"pinning the experts' host copy was refused for {refused} layers ({self._pins.refused})"
        return None

    def close(self) -> None:
        """Unpin the rows (also done when the store is collected), stop the reader; not used after."""
        self._pins.close()
        if self._reader is not None:
            self._reader.close()

    def in_place(self, layer: int) -> ExpertStack:
        """The layer's experts as a kernel reads them where they lie, indexed by expert id."""
        rows = self.rows[layer]
        return ExpertStack(self.layout.gate_up(rows), self.layout.down(rows), *self.layout.biases(rows))

    def copy_to(
        self, row: torch.Tensor, layer: int, expert: int, then: Callable[[], None] | None = None
    ) -> threading.Event | None:
        """Copy one expert into the flat device row `row`, on the current stream, then run `then` (on the
        same stream, once the copy is queued). From the mapped shards to CUDA, the copy is queued later by
        the reader thread: the returned event is set once it is (None: it is queued on return)."""
        if self._reader is not None:
            return self._reader.submit(row, layer, expert, torch.cuda.current_stream(row.device), then)
        if self.mode == "ram":
            # Asynchronous from pinned rows; from a layer whose pinning was refused it is synchronous.
            row.copy_(self.rows[layer][expert], non_blocking=row.is_cuda)
        else:
            self.read_into(row, layer, expert)
        if then is not None:
            then()
        return None

    def read_into(self, row: torch.Tensor, layer: int, expert: int) -> None:
        """Fill a host row with one expert from the mapped files (quantized rows, or the shards packed)."""
        if layer in self.rows:
            row.copy_(self.rows[layer][expert])
        else:
            pack_expert(row, self.source, self.layout, layer, expert)


class StagedReader:
    """Copies from mapped files to a CUDA device, off the caller's thread: a reader thread reads each
    expert into the next of a ring of pinned staging rows (disk reads and page faults happen there),
    then queues its copy to the device on the stream the request came from, and records the staging
    row's event after it: a row is filled again only once its last copy has passed. Requests run in the
    order they came."""

    RING = 2

    def __init__(self, store: ExpertStore, device: torch.device, ring: int = RING):
        self.store, self.device = store, device
        self.rows = [torch.empty(store.layout.numel, dtype=store.row_dtype, pin_memory=True) for _ in range(ring)]
        self.events = [torch.cuda.Event() for _ in range(ring)]
        self.requests: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True, name="localmoe-expert-reader")
        self.thread.start()

    def submit(self, row, layer: int, expert: int, stream, then: Callable[[], None] | None) -> threading.Event:
        queued = threading.Event()
        self.requests.put((row, layer, expert, stream, then, queued))
        return queued

    def close(self) -> None:
        self.requests.put(None)

    def _read(self) -> None:
        torch.cuda.set_device(self.device)  # the current device is per thread
        served = 0
        while (request := self.requests.get()) is not None:
            row, layer, expert, stream, then, queued = request
            staging, event = self.rows[served % len(self.rows)], self.events[served % len(self.rows)]
            event.synchronize()  # its last copy has passed
            self.store.read_into(staging, layer, expert)
            with torch.cuda.stream(stream):
                row.copy_(staging, non_blocking=True)
                event.record(stream)
                if then is not None:
                    then()
            queued.set()
            served += 1


def _page_aligned_empty(rows: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised [rows, numel] CPU tensor starting on a page boundary, as page-locking wants."""
    nbytes = rows * numel * dtype.itemsize
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % PAGE
    return raw[start : start + nbytes].view(dtype).view(rows, numel)
