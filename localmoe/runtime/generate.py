"""The generation loop, as a generator of token ids: the CLI, the chat, tests and benchmarks all consume it;
and the decode steps it runs: static where the model allows (captured as CUDA graphs where asked), else
the model's forward."""

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from localmoe.errors import LocalMoEError, setting
from localmoe.models.layers import bucket
from localmoe.models.state import KVCache
from localmoe.runtime.sampling import Sampler, SamplingParams


@dataclass
class GenerationStats:
    """Filled in by the generator as it runs."""

    prompt_tokens: int = 0  # tokens fed to the model for the prompt (the reused ones not counted)
    new_tokens: int = 0
    prefill_seconds: float = 0.0  # until the first new token was chosen: the time to first token
    decode_seconds: float = 0.0
    decode_host_seconds: float = 0.0  # of which the host spent queueing decode steps and sampling (not waiting)

    @property
    def prefill_rate(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_rate(self) -> float:
        # The first new token comes from the prefill; the rest each cost one decode step.
        return max(self.new_tokens - 1, 0) / self.decode_seconds if self.decode_seconds else 0.0

    def summary(self) -> str:
        return (
            f"prompt: {self.prompt_tokens} tokens, {self.prefill_rate:.1f} tok/s, first token after "
            f"{self.prefill_seconds:.2f} s; generated: {self.new_tokens} tokens, {self.decode_rate:.1f} tok/s"
        )


@dataclass
class StepHooks:
    """What runs around every forward step, outside any captured graph: `before` once the previous step
    is queued, `after` once this one is (the expert cache learns from the routing there)."""

    before: Callable[[], None] = lambda: None
    after: Callable[[], None] = lambda: None


@dataclass
class DecodeSteps:
    """One decode token after another over `cache`: a static step (`CausalLM.decode_step`) where the model
    allows, its token and position in device buffers, captured as a CUDA graph per bucket with `graphs`;
    the model's forward otherwise."""

    model: nn.Module
    cache: KVCache
    graphs: bool = False
    hooks: StepHooks = field(default_factory=StepHooks)

    def __post_init__(self):
        self.static = self.model.static_decode
        device = self.model.model.embed_tokens.weight.device
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self._captured: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @torch.inference_mode()
    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """Logits [1, 1, V] after `token` ([1, 1], on the device) at the cache's next position."""
        self.hooks.before()
        position = self.cache.pos
        if not self.static:
            logits = self.model(token, self.cache)
        else:
            if position >= self.cache.max_len:
                raise LocalMoEError(f"{position + 1} tokens do not fit the {self.cache.max_len}-token context")
            self.token.copy_(token)
            self.position.fill_(position)
            self.cache.writing = True
            logits = self._run(bucket(position, self.cache.max_len))
            self.cache.pos, self.cache.writing = position + 1, False
        self.hooks.after()
        return logits

    def _run(self, keys: int) -> torch.Tensor:
        if not self.graphs:
            return self.model.decode_step(self.token, self.position, self.cache, keys)
        if keys not in self._captured:
            self._captured[keys] = self._capture(keys)
        graph, logits = self._captured[keys]
        graph.replay()
        return logits

    def _capture(self, keys: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Run the step once on a side stream (lazy initialisation, kernel compilation), then capture it.
        Both write what the replay writes again (this token's keys and values, its routing), harmlessly."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model.decode_step(self.token, self.position, self.cache, keys)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.model.decode_step(self.token, self.position, self.cache, keys)
        return graph, logits


def generate_tokens(
    model: nn.Module,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    sampler: Sampler | None = None,
    eos_ids: frozenset[int] = frozenset(),
    stats: GenerationStats | None = None,
    cache: KVCache | None = None,
    reuse: int = 0,
    context: int | None = None,
    prefill_chunk: int = 512,
    on_prefill: Callable[[], None] | None = None,
    hooks: StepHooks | None = None,
    graphs: bool = False,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` tokens after `prompt`, stopping after an EOS id.

    With `cache`, its first `reuse` positions already hold the start of `prompt` (an earlier turn of
    a conversation) and only the rest is fed; without, a cache is allocated for this call. The prompt
    goes through the model in chunks of `prefill_chunk` tokens, which bounds a long prompt's
    activations; `on_prefill` runs once the prompt is in the cache. Greedy without a `sampler`. `hooks`
    run around every forward step; `graphs`: capture the decode steps as CUDA graphs (see DecodeSteps).
    """
    limit = model.max_position_embeddings
    check_fits(len(prompt), max_new_tokens, min(context or limit, limit, cache.max_len if cache else limit), limit)
    sampler = sampler or Sampler(SamplingParams(), model.model.embed_tokens.weight.device)
    stats = stats or GenerationStats()
    device = model.model.embed_tokens.weight.device
    if cache is None:
        cache = model.new_cache(1, len(prompt) + max_new_tokens)
    hooks = hooks or StepHooks()
    decode = DecodeSteps(model, cache, graphs, hooks)
    # the last prompt token is always fed: its logits pick the first token
    reuse = cache.rewind(min(reuse, len(prompt) - 1))
    seen = torch.tensor([*prompt, *[0] * max_new_tokens], device=device)
    stats.prompt_tokens = len(prompt) - reuse
    start = time.perf_counter()
    for chunk in range(reuse, len(prompt), prefill_chunk):
        hooks.before()
        logits = _forward(model, seen[None, chunk : min(chunk + prefill_chunk, len(prompt))], cache)
        hooks.after()
    if on_prefill:
        on_prefill()
    for produced in range(1, max_new_tokens + 1):
        position = len(prompt) + produced - 1
        seen[position] = sampler(logits[0, -1], seen[:position])
        queued = time.perf_counter()
        token = int(seen[position])  # waits for the device: the timings below are real
        now = time.perf_counter()
        if produced == 1:
            stats.prefill_seconds = now - start
        else:
            stats.decode_seconds += now - start
            stats.decode_host_seconds += queued - start
        stats.new_tokens = produced
        yield token
        if token in eos_ids or produced == max_new_tokens:
            return
        start = time.perf_counter()
        logits = decode(seen[None, position : position + 1])


def check_fits(prompt_tokens: int, max_new_tokens: int, context: int, limit: int, name: str = "max_new_tokens") -> None:
    """The one rule for a generation's length: the prompt and `max_new_tokens` must fit the `context`
    (`limit`: the model's maximum), or the request is refused before it starts, never cut short. `name`:
    the setting that asked for them."""
    if not prompt_tokens:
        raise LocalMoEError("the prompt is empty: give at least one token of text")
    if prompt_tokens + max_new_tokens > context:
        raise LocalMoEError(
            f"the prompt ({prompt_tokens} tokens) plus {max_new_tokens} new tokens exceeds the {context}-token "
            f"context: shorten the prompt, lower {setting(name)} or raise {setting('context')} (the model "
            f"allows up to {limit})"
        )


@torch.inference_mode()
def _forward(model: nn.Module, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    return model(ids, cache)
