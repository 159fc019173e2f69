"""Cold experts computed where they live, in the host store, by the CPU: the alternative to copying them
to the device (`--miss-policy`), the cost model that chooses between the two for each miss, and the
calibration that gives it its two bandwidths.

For one token, computing an expert reads its bytes once from host RAM and moves only activations over
the bus; copying it moves all its bytes over the bus. Which is faster depends on the machine, the
dtype and how many tokens the expert serves, so it is decided per miss from measured rates.
"""

import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from localmoe.files import locked, write_atomic
from localmoe.kernels.reference import expert_pair_outputs
from localmoe.models.moe import MoESpec
from localmoe.paths import cache_dir
from localmoe.runtime.expert_store import ExpertStore, pack_expert

CALIBRATION_FILE = "calibration.json"
FAR = 2.0  # a start's check this many times off the kept calibration, either way, has it measured again


class HostExperts:
    """Runs experts of the host store on the CPU with `kernel` (see localmoe.kernels.host_kernel): on the
    rows in place (RAM store, or quantized rows however kept), or on rows packed from the checkpoint's
    mapped shards first, a few experts at a time through one reused buffer (mmap store, where RAM is
    short)."""

    MMAP_GROUP = 4  # experts packed at once from the mapped shards

    def __init__(self, store: ExpertStore, kernel=expert_pair_outputs):
        self.store = store
        self.kernel = kernel
        self._scratch: torch.Tensor | None = None

    def compute(
        self,
        spec: MoESpec,
        x: torch.Tensor,
        ids: torch.Tensor,
        scale: torch.Tensor | None,
        experts: list[int],
        out: torch.Tensor,
    ) -> None:
        """out[p] for each (token, choice) pair p routed to one of `experts`; other rows untouched.
        All on the CPU: x [T, E], ids [T, k], scale [T*k] or None, out [T*k, E]."""
        layer = spec.layer
        if layer in self.store.rows:  # packed in RAM, or quantized and mapped
            self._run(spec, x, ids, scale, self.store.rows[layer], experts, experts, out)
            return
        for start in range(0, len(experts), self.MMAP_GROUP):
            group = experts[start : start + self.MMAP_GROUP]
            rows = self._rows(len(group))
            for row, expert in zip(rows, group, strict=True):
                pack_expert(row, self.store.source, self.store.layout, layer, expert)
            self._run(spec, x, ids, scale, rows, group, list(range(len(group))), out)

    def _run(self, spec, x, ids, scale, rows: torch.Tensor, experts: list[int], indices: list[int], out) -> None:
        """The kernel over `rows`, where expert experts[i] is row indices[i]."""
        layout = self.store.layout
        table = torch.full((spec.experts + 1,), -1, dtype=torch.int64)  # the last for id -1, no expert
        table[experts] = torch.tensor(indices)
        gate_up, down = layout.gate_up(rows), layout.down(rows)
        self.kernel(out, x, gate_up, down, table[ids], spec.act, *layout.biases(rows), scale)

    def _rows(self, count: int) -> torch.Tensor:
        if self._scratch is None:  # allocated once: fresh memory would page-fault on every call
            with torch.inference_mode(False):  # a normal tensor, writable in and out of inference mode
                self._scratch = torch.empty(self.MMAP_GROUP, self.store.layout.numel, dtype=self.store.row_dtype)
        return self._scratch[:count]


@dataclass(frozen=True)
class Bandwidths:
    """Bytes of expert weights per second: copied from the host store into a device slot, and run
    through the CPU for one token."""

    copy: float
    cpu: float


def experts_for_cpu(misses: dict[int, int], expert_bytes: int, bandwidths: Bandwidths) -> set[int]:
    """Of a layer's misses (expert -> tokens routed to it), those the CPU should compute.

    Each goes where it would be done first: the copy queue (copies run one after another) or the CPU
    (experts one after another, each costing its tokens times a one-token pass), those with the most
    tokens placed first. Both run while the device computes the cached experts.
    """
    copy_done = cpu_done = 0.0
    chosen = set()
    for expert, tokens in sorted(misses.items(), key=lambda item: (-item[1], item[0])):
        by_copy = copy_done + expert_bytes / bandwidths.copy
        by_cpu = cpu_done + tokens * expert_bytes / bandwidths.cpu
        if by_cpu < by_copy:
            chosen.add(expert)
            cpu_done = by_cpu
        else:
            copy_done = by_copy
    return chosen


def calibrated(
    store: ExpertStore,
    slot: torch.Tensor,
    spec: MoESpec,
    kernel=expert_pair_outputs,
    copy: float | None = None,
    cpu: float | None = None,
) -> Bandwidths:
    """The two bandwidths for this machine, device, dtype, expert size and CPU kernel: `copy` and `cpu`
    where given, else the calibration kept in localmoe's cache folder, measured (copying into `slot`, an
    unused device row, and computing experts of `spec`'s layer with `kernel`) where there is none yet. A
    kept one is checked at each start with a one-expert measurement, and measured again where that is
    `FAR` from it: one measured while the machine was busy is not kept for good. Runs measure one at a
    time, under the file's lock: two at once would slow each other down."""
    if copy is not None and cpu is not None:
        return Bandwidths(copy, cpu)
    device = slot.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    key = f"{platform.node()}|{device.type}:{name}|{store.dtype}|{store.mode}|{store.expert_bytes}|{kernel.__name__}"
    path = cache_dir() / CALIBRATION_FILE
    with locked(path):
        known = _read(path)
        kept = _bandwidths(known.get(key))
        if kept is None or _far(_measure(store, slot, spec, kernel, samples=1), kept):
            if kept is not None:
                print(
                    f"localmoe: the bandwidths of {path} are far from those measured now: measuring again",
                    file=sys.stderr,
                )
            kept = _measure(store, slot, spec, kernel)
            known[key] = asdict(kept)
            _write(path, known)
    return Bandwidths(copy or kept.copy, cpu or kept.cpu)


def _bandwidths(entry) -> Bandwidths | None:
    if isinstance(entry, dict) and all(_positive(entry.get(name)) for name in ("copy", "cpu")):
        return Bandwidths(entry["copy"], entry["cpu"])
    return None  # none yet, or damaged: measure again


def _far(measured: Bandwidths, kept: Bandwidths) -> bool:
    ratios = (measured.copy / kept.copy, measured.cpu / kept.cpu)
    return any(not 1 / FAR <= ratio <= FAR for ratio in ratios)


def _positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _measure(store: ExpertStore, slot: torch.Tensor, spec: MoESpec, kernel, samples: int = 3) -> Bandwidths:
    """Median of `samples` experts each way, after a warm-up."""
    host = HostExperts(store, kernel)
    experts = [e % spec.experts for e in range(samples + 1)]
    x = torch.randn(1, spec.hidden).to(store.dtype)
    out = torch.empty(1, spec.hidden, dtype=store.dtype)

    def copy(expert: int) -> None:
        if queued := store.copy_to(slot, spec.layer, expert):
            queued.wait()  # the reader thread has queued it
        if slot.is_cuda:
            torch.cuda.synchronize(slot.device)

    def compute(expert: int) -> None:
        host.compute(spec, x, torch.tensor([[expert]]), None, [expert], out)

    return Bandwidths(
        copy=store.expert_bytes / _median_seconds(copy, experts),
        cpu=store.expert_bytes / _median_seconds(compute, experts),
    )


def _median_seconds(run, experts: list[int]) -> float:
    run(experts[0])  # warm-up: page faults, lazy allocation, kernel selection
    times = []
    for expert in experts[1:]:
        start = time.perf_counter()
        run(expert)
        times.append(time.perf_counter() - start)
    return max(statistics.median(times), 1e-9)


def _read(path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or damaged: measure again
    return data if isinstance(data, dict) else {}


def _write(path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(data, indent=1))
    except OSError:
        pass  # a read-only cache folder costs a measurement per start, nothing more
