"""Moving experts ahead of need: predicting a coming layer's experts, the copy path into slots with its
ordering against compute, and the one device-to-host read per MoE layer.

On CUDA, copies run on a side stream. Two hazards are ours because the pool is never freed: the
compute must wait for a slot's copy before reading it (read after write), and a copy must wait for
the compute that last read a slot before overwriting it (write after read). One event per slot and
direction covers both. On the CPU everything is synchronous and the same calls only keep time.
"""

import time
from collections.abc import Callable

import torch


def predict_experts(router, x: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` experts a router would rank highest for hidden states x [T, E]: ids [T, count]."""
    return router.scores(x).topk(count, dim=-1).indices


class Copies:
    def __init__(self, device: torch.device, slots: int):
        self.cuda = device.type == "cuda"
        self.copy_seconds = 0.0  # CPU: time spent copying, all of it on the critical path
        self._stall_seconds = 0.0
        self._waits: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        if self.cuda:
            self.stream = torch.cuda.Stream(device)
            self._copied = [torch.cuda.Event() for _ in range(slots)]
            self._read = [torch.cuda.Event() for _ in range(slots)]

    def copy(self, slot: int, fill: Callable[[], None]) -> None:
        """Run `fill`, which writes slot `slot`, ordered after the last compute that read the slot."""
        if not self.cuda:
            start = time.perf_counter()
            fill()
            self.copy_seconds += time.perf_counter() - start
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self._read[slot])
            fill()
            self._copied[slot].record(self.stream)

    def wait(self, slots: list[int]) -> None:
        """Make the compute stream wait until these slots' copies have landed (no host sync)."""
        if not self.cuda:
            return
        stream = torch.cuda.current_stream()
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(stream)
        for slot in slots:
            stream.wait_event(self._copied[slot])
        after.record(stream)
        self._waits.append((before, after))
        if len(self._waits) > 512:
            self._fold_finished_waits()

    def read_by_compute(self, slots: list[int]) -> None:
        """Mark that the compute queued so far reads these slots: a later copy into them waits for it."""
        if self.cuda:
            stream = torch.cuda.current_stream()
            for slot in slots:
                self._read[slot].record(stream)

    def stall_seconds(self) -> float:
        """CUDA: how long the compute stream sat waiting for copies (synchronises). CPU: copy time."""
        if not self.cuda:
            return self.copy_seconds
        torch.cuda.synchronize()
        self._fold_finished_waits()
        return self._stall_seconds

    def _fold_finished_waits(self) -> None:
        pending = []
        for before, after in self._waits:
            if after.query():
                self._stall_seconds += before.elapsed_time(after) / 1000
            else:
                pending.append((before, after))
        self._waits = pending


class HostReader:
    """Brings small device tensors to the host in one copy: the single sync of an MoE layer.

    On CUDA it copies into a pinned buffer and waits on an event, which is cheaper than `.tolist()`
    on a device tensor (an unpinned copy plus a full sync). Values travel as float32, exact for
    expert ids and router weights.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._buffer = torch.empty(0)
        if self.cuda:
            self._event = torch.cuda.Event()

    def read(self, tensors: list[torch.Tensor]) -> list[list[float]]:
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        if self.cuda:
            if self._buffer.numel() < flat.numel():
                self._buffer = torch.empty(max(flat.numel(), 2 * self._buffer.numel()), pin_memory=True)
            host = self._buffer[: flat.numel()]
            host.copy_(flat, non_blocking=True)
            self._event.record()
            self._event.synchronize()
            flat = host
        values = flat.tolist()
        out, start = [], 0
        for t in tensors:
            out.append(values[start : start + t.numel()])
            start += t.numel()
        return out
