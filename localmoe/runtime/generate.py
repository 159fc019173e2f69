"""The generation loop, as a generator of token ids: the CLI, the chat, tests and benchmarks all consume it."""

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from localmoe.errors import LocalMoEError, setting
from localmoe.models.state import KVCache
from localmoe.runtime.sampling import Sampler, SamplingParams


@dataclass
class GenerationStats:
    """Filled in by the generator as it runs."""

    prompt_tokens: int = 0  # tokens fed to the model for the prompt (the reused ones not counted)
    new_tokens: int = 0
    prefill_seconds: float = 0.0  # until the first new token was chosen: the time to first token
    decode_seconds: float = 0.0

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
) -> Iterator[int]:
    """Yield up to `max_new_tokens` tokens after `prompt`, stopping after an EOS id.

    With `cache`, its first `reuse` positions already hold the start of `prompt` (an earlier turn of
    a conversation) and only the rest is fed; without, a cache is allocated for this call. The prompt
    goes through the model in chunks of `prefill_chunk` tokens, which bounds a long prompt's
    activations; `on_prefill` runs once the prompt is in the cache. Greedy without a `sampler`.
    """
    limit = model.max_position_embeddings
    check_fits(len(prompt), max_new_tokens, min(context or limit, limit, cache.max_len if cache else limit), limit)
    sampler = sampler or Sampler(SamplingParams(), model.model.embed_tokens.weight.device)
    stats = stats or GenerationStats()
    device = model.model.embed_tokens.weight.device
    if cache is None:
        cache = model.new_cache(1, len(prompt) + max_new_tokens)
    # the last prompt token is always fed: its logits pick the first token
    reuse = cache.rewind(min(reuse, len(prompt) - 1))
    seen = torch.tensor([*prompt, *[0] * max_new_tokens], device=device)
    stats.prompt_tokens = len(prompt) - reuse
    start = time.perf_counter()
    for chunk in range(reuse, len(prompt), prefill_chunk):
        logits = _forward(model, seen[None, chunk : min(chunk + prefill_chunk, len(prompt))], cache)
    if on_prefill:
        on_prefill()
    for produced in range(1, max_new_tokens + 1):
        position = len(prompt) + produced - 1
        seen[position] = sampler(logits[0, -1], seen[:position])
        token = int(seen[position])  # waits for the device: the timings below are real
        now = time.perf_counter()
        if produced == 1:
            stats.prefill_seconds = now - start
        else:
            stats.decode_seconds += now - start
        stats.new_tokens = produced
        yield token
        if token in eos_ids or produced == max_new_tokens:
            return
        start = time.perf_counter()
        logits = _forward(model, seen[None, position : position + 1], cache)


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
