"""Static steps over one cache, captured as CUDA graphs where asked: what decoding (one token), speculative
checks (the last chosen token and the drafts) and the MTP layers' draft steps share. A static step knows
its positions only on the device (see `localmoe.models.layers.Step`), so one function serves every
position of a bucket, and a graph captured once per (kind, bucket, token count) replays it; the hooks
around it (the expert cache learning from the routing) stay outside every graph."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from localmoe.errors import LocalMoEError
from localmoe.models.layers import bucket
from localmoe.models.state import KVCache


@dataclass
class StepHooks:
    """What runs around every forward step, outside any captured graph: `before` once the previous step
    is queued, `after` once this one is (the expert cache learns from the routing there). `tokens` before
    a static step, with its token count, which a replayed graph runs no Python to tell (the routing log
    sizes its rows by it); given `most` tokens before any step is captured, it makes room for them."""

    before: Callable[[], None] = lambda: None
    after: Callable[[], None] = lambda: None
    tokens: Callable[[int], None] = lambda tokens: None


# (positions [T] on the device, key slots, inputs [1, T, ...] by name) -> what the step returns
StepFn = Callable[..., object]


class StaticSteps:
    """Static steps at the next positions of `cache`: their inputs ([1, T, ...] by name) and positions
    copied into device buffers of up to `most` tokens, and the step run on those, captured as a CUDA
    graph per (kind, bucket, T) with `graphs`. Padding every step to `most` tokens would let one graph
    serve each bucket, but padded tokens would be routed to experts no kept token needs (loaded, on an
    offloaded model) and written past the end of a nearly full cache; so each T has its own graph,
    captured at its first use. A step of more than `most` tokens (an MTP layer's catch-up over a
    prompt's chunk) runs static, uncaptured."""

    def __init__(self, cache: KVCache, device: torch.device, graphs: bool, hooks: StepHooks, most: int):
        self.cache, self.graphs, self.hooks, self.most = cache, graphs, hooks, most
        self.positions = torch.zeros(most, dtype=torch.long, device=device)
        self._offsets = torch.arange(most, device=device)
        self._inputs: dict[str, torch.Tensor] = {}  # [1, most, ...] by name, never reallocated: graphs hold them
        self._captured: dict[tuple, tuple[torch.cuda.CUDAGraph, object]] = {}
        hooks.tokens(most)  # the routing log's rows allocated before anything is captured

    @torch.inference_mode()
    def __call__(self, kind: object, step: StepFn, **inputs: torch.Tensor) -> object:
        """`step(positions, keys, **inputs)` over inputs [1, T, ...] at the cache's next T positions, reading
        keys through their bucket; `kind` names the step function (one graph per kind, bucket and T).
        The cache moves on by T."""
        length, start = next(iter(inputs.values())).shape[1], self.cache.pos
        if start + length > self.cache.max_len:
            raise LocalMoEError(f"{start + length} tokens do not fit the {self.cache.max_len}-token context")
        keys = bucket(start + length - 1, self.cache.max_len)
        self.hooks.before()
        self.hooks.tokens(length)
        self.cache.writing = True
        if length > self.most:
            out = step(torch.arange(start, start + length, device=self.positions.device), keys, **inputs)
        else:
            torch.add(self._offsets[:length], start, out=self.positions[:length])
            held = {name: self._held(name, value) for name, value in inputs.items()}
            out = self._run((kind, keys, length), lambda: step(self.positions[:length], keys, **held))
        self.cache.pos, self.cache.writing = start + length, False
        self.hooks.after()
        return out

    def _held(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """`value` [1, T, ...] copied into the buffer of its name."""
        if name not in self._inputs:
            self._inputs[name] = value.new_zeros(1, self.most, *value.shape[2:])
        return self._inputs[name][:, : value.shape[1]].copy_(value)

    def _run(self, key: tuple, run: Callable[[], object]) -> object:
        if not self.graphs:
            return run()
        if key not in self._captured:
            self._captured[key] = capture(run)
        graph, out = self._captured[key]
        graph.replay()
        return out


def capture(run: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """Run the step once on a side stream (lazy initialisation, kernel compilation), then capture it. Both
    write what the replay writes again (the step's keys and values, its routing), harmlessly."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out
