"""Moving experts ahead of need: predicting a coming layer's experts, the copy path into slots with its
ordering against compute, and the one device-to-host read per MoE layer of the miss policies that
decide on the host.

On CUDA, copies run on side streams. Two hazards are ours because the pool is never freed: the
compute must not read a slot before its copy has landed (read after write), and a copy must wait for
the compute that may still read a slot's previous expert (write after read). One event per slot and
direction covers both. On the CPU everything is synchronous and the same calls only keep time.
"""

import threading
import time
from collections.abc import Callable

import torch


def predict_experts(scores: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` experts a router's `scores` rank highest for hidden states x [T, E]: ids [T, count]."""
    return scores(x).topk(count, dim=-1).indices


class Copies:
    """Copies into slots, ordered against the compute that reads the slots.

    On CUDA copies run on side streams: urgent ones (a layer waits for them) on a stream of higher
    priority than the speculative ones (prefetches, admissions), so that they do not queue behind them.
    Per slot, a "copied" event (recorded after the copy and the table entry that publishes it) and a
    "freed" event (recorded on the compute stream when the slot's previous expert was evicted: after
    every kernel that may read it) order the two directions. On the CPU everything is synchronous.
    """

    def __init__(self, device: torch.device, slots: int):
        self.cuda = device.type == "cuda"
        self.copy_seconds = 0.0  # CPU: time spent copying, all of it on the critical path
        self._stall_seconds = 0.0
        self._waits: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._queuing: dict[int, threading.Event] = {}  # slots whose copy a reader thread has yet to queue
        if self.cuda:
            low, high = torch.cuda.Stream.priority_range()
            self.urgent = torch.cuda.Stream(device, priority=high)
            self.speculative = torch.cuda.Stream(device, priority=low)
            self._copied = [torch.cuda.Event() for _ in range(slots)]
            self._freed = [torch.cuda.Event() for _ in range(slots)]

    def copy(self, slot: int, fill, publish: Callable[[], None] | None, urgent: bool) -> None:
        """Run `fill(then)`, which writes slot `slot` and then runs `then` on the same stream, after the
        compute that read the slot's previous expert; `then` publishes the slot (says on the device that
        it has its expert) and marks the copy done. `fill` may leave the copy to a reader thread: it then
        returns an event set once the copy is queued."""
        if not self.cuda:
            start = time.perf_counter()
            fill(publish)
            self.copy_seconds += time.perf_counter() - start
            return
        stream = self.urgent if urgent else self.speculative

        def then() -> None:
            if publish:
                publish()
            self._copied[slot].record(stream)

        with torch.cuda.stream(stream):
            stream.wait_event(self._freed[slot])
            if queuing := fill(then):
                self._queuing[slot] = queuing

    def freed(self, slot: int) -> None:
        """The slot's expert was evicted: a later copy into it waits for the compute queued so far."""
        if self.cuda:
            self._freed[slot].record()

    def after_copy(self, slot: int) -> None:
        """Make the compute stream wait for the slot's last copy (a no-op once it has landed)."""
        if self.cuda:
            self._queued(slot)
            torch.cuda.current_stream().wait_event(self._copied[slot])

    def landed(self, slot: int) -> bool:
        """Whether the slot's last copy has completed (asks, does not wait)."""
        if not self.cuda:
            return True
        queuing = self._queuing.get(slot)
        return (queuing is None or queuing.is_set()) and self._copied[slot].query()

    def queuing(self, slots: list[int]) -> bool:
        """Whether a reader thread has yet to queue the copy of one of these slots."""
        return any(not self._queuing[slot].is_set() for slot in slots if slot in self._queuing)

    def _queued(self, slot: int) -> None:
        """Wait (on the host) until the slot's copy is queued, so that its event means that copy."""
        if (queuing := self._queuing.pop(slot, None)) is not None:
            queuing.wait()

    def wait(self, slots: list[int]) -> None:
        """Make the compute stream wait until these slots' copies have landed (no host sync)."""
        if not self.cuda:
            return
        stream = torch.cuda.current_stream()
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(stream)
        for slot in slots:
            self._queued(slot)
            stream.wait_event(self._copied[slot])
        after.record(stream)
        self._waits.append((before, after))
        if len(self._waits) > 512:
            self._fold_finished_waits()

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
