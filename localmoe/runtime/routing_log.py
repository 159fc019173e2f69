"""The routing of every forward step, written on the device by the MoE layers and read by the host a step
later: how the expert cache learns what was used without the step ever waiting for the host.

Per MoE layer and token the log keeps the chosen experts, the slots the kernel found them in (-1: read
where it lies), the router's scores of every expert (what the score policy weighs) and, for a trace,
its weights of the chosen ones. When a step is
complete, its rows go to pinned host memory with one asynchronous copy and an event (CUDA); the host
takes a step once its event has passed, so it never waits for the device. On the CPU a step is taken
as soon as it is complete.
"""

from collections import deque
from dataclasses import dataclass

import numpy
import torch

from localmoe.models.moe import Routing


@dataclass
class LayerRouting:
    """One MoE layer's routing in a step, on the host: ids and slots [T, k], scores [T, E], and the
    weights [T, k] where logged."""

    layer: int
    ids: numpy.ndarray
    slots: numpy.ndarray
    scores: numpy.ndarray
    weights: numpy.ndarray | None


class RoutingLog:
    def __init__(self, top_k: dict[int, int], experts: int, device: torch.device, weights: bool):
        """`top_k`: the MoE layers in order, with the experts each chooses per token; `weights`: whether to
        log the router's weights of the chosen experts too. Buffers are [tokens, layers, k or experts]:
        a step's rows are their first `tokens`, one contiguous block to send to the host."""
        self.top_k, self.experts, self.device = top_k, experts, device
        self.layers = list(top_k)
        self.row = {layer: i for i, layer in enumerate(self.layers)}
        self.logs_weights = weights
        self.cuda = device.type == "cuda"
        self._tokens = 0  # tokens of the step being written
        self._pending: deque[tuple[dict[str, torch.Tensor], int, torch.cuda.Event | None]] = deque()
        self._spare: list[dict[str, torch.Tensor]] = []  # pinned host buffers to reuse
        self._retired: list[dict[str, torch.Tensor]] = []  # device buffers outgrown, which a graph may write
        self._allocate(1)

    def lookup(self, layer: int, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The slots of a layer's [T, k] pairs, `table` [experts] at `ids`, written into the log (one op
        for a decode token) and returned, for the kernel to read."""
        tokens = ids.shape[0]
        self.expect(tokens)
        slots = self._rows("slots", layer, tokens)
        if slots.is_contiguous():
            return torch.index_select(table, 0, ids.view(-1), out=slots.view(-1)).view(slots.shape)
        return slots.copy_(table[ids])

    def expect(self, tokens: int) -> None:
        """The coming step has `tokens` tokens: what a replayed graph, which runs no `lookup`, cannot say.
        Rows for them are allocated where there are fewer; a step captured before keeps writing the
        buffers it was captured with, which stay allocated (its rows then never reach the host: the
        static steps tell their most tokens before capturing any, so this does not happen to them)."""
        if tokens > self._capacity:
            self._retired.append(self._buffers)
            self._allocate(max(tokens, 2 * self._capacity))
        self._tokens = tokens

    def record(self, layer: int, routing: Routing) -> None:
        """Log the layer's routing beside the slots written through `slots` (device copies, no sync)."""
        tokens = routing.ids.shape[0]
        self._rows("ids", layer, tokens).copy_(routing.ids)
        self._rows("scores", layer, tokens).copy_(routing.scores)
        if self.logs_weights:
            self._rows("weights", layer, tokens).copy_(routing.weights)

    def _rows(self, name: str, layer: int, tokens: int, buffers: dict | None = None) -> torch.Tensor:
        width = self.experts if name == "scores" else self.top_k[layer]
        return (buffers or self._buffers)[name][:tokens, self.row[layer], :width]

    def close(self) -> None:
        """The step is complete: send its rows to the host (CUDA: asynchronously, on the current stream), and
        mark every layer's ids unwritten (-1), so that the host skips the layers the next step does not run
        (a step of the multi-token-prediction layers alone)."""
        tokens = self._tokens
        if not self.cuda:
            self._pending.append(({name: rows[:tokens].clone() for name, rows in self._buffers.items()}, tokens, None))
        else:
            host = self._host_buffers()
            for name, rows in self._buffers.items():
                host[name][:tokens].copy_(rows[:tokens], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((host, tokens, event))
        self._buffers["ids"][:tokens].fill_(-1)

    def taken(self, wait: bool = False) -> list[list[LayerRouting]]:
        """The steps whose rows have reached the host, oldest first, each as its layers' routing; `wait`:
        all of them, waiting for the device where needed."""
        steps = []
        while self._pending:
            host, tokens, event = self._pending[0]
            if event is not None and not event.query():
                if not wait:
                    break
                event.synchronize()
            self._pending.popleft()
            steps.append(self._layers(host, tokens))
            if event is not None:
                self._spare.append(host)
        return steps

    def _layers(self, host: dict[str, torch.Tensor], tokens: int) -> list[LayerRouting]:
        """Each layer's rows the step wrote (ids not -1): none for a layer it did not run, and only the
        first of a replayed decode step's, whose token count the log keeps from an earlier step."""
        layers = []
        for layer in self.layers:
            written = self._rows("ids", layer, tokens, host)[:, 0].numpy() >= 0
            if written.any():
                rows = {name: self._rows(name, layer, tokens, host).numpy()[written] for name in host}
                layers.append(LayerRouting(layer, rows["ids"], rows["slots"], rows["scores"], rows.get("weights")))
        return layers

    def _allocate(self, tokens: int) -> None:
        """Device buffers for steps of up to `tokens` tokens (between steps only: a captured step keeps its)."""
        self._capacity = tokens
        self._buffers = self._kinds(tokens, self.device)
        self._spare.clear()  # host buffers of the old size

    def _host_buffers(self) -> dict[str, torch.Tensor]:
        return self._spare.pop() if self._spare else self._kinds(self._capacity, "cpu", pin=True)

    def _kinds(self, tokens: int, device, pin: bool = False) -> dict[str, torch.Tensor]:
        layers, k = len(self.layers), max(self.top_k.values())
        kinds = {"ids": (k, torch.int64), "slots": (k, torch.int32), "scores": (self.experts, torch.float32)}
        if self.logs_weights:
            kinds["weights"] = (k, torch.float32)
        with torch.inference_mode(False):  # normal tensors, written in and out of inference mode
            return {
                name: torch.full(
                    (tokens, layers, width), -1 if name == "ids" else 0, dtype=dtype, device=device, pin_memory=pin
                )
                for name, (width, dtype) in kinds.items()
            }
