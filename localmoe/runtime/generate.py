"""The generation loop, as a generator of token ids: the CLI, tests and benchmarks all consume it."""

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from localmoe.errors import LocalMoEError


@dataclass
class GenerationStats:
    """Filled in by the generator as it runs."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    def summary(self) -> str:
        prefill = self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0
        # The first new token comes from the prefill; the rest each cost one decode step.
        steps = max(self.new_tokens - 1, 0)
        decode = steps / self.decode_seconds if self.decode_seconds else 0.0
        return (
            f"prompt: {self.prompt_tokens} tokens, {prefill:.1f} tok/s; "
            f"generated: {self.new_tokens} tokens, {decode:.1f} tok/s"
        )


def greedy_tokens(
    model: nn.Module,
    prompt: Sequence[int],
    max_new_tokens: int,
    eos_ids: frozenset[int] = frozenset(),
    stats: GenerationStats | None = None,
    *,
    context: int | None = None,
    prefill_chunk: int = 512,
    on_prefill: Callable[[], None] | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` greedy tokens after `prompt`, stopping after an EOS id.

    The prompt goes through the model in chunks of `prefill_chunk` tokens, which bounds the
    activations a long prompt needs; `on_prefill` runs once the prompt is in the cache.
    """
    if not prompt:
        raise LocalMoEError("the prompt is empty: give at least one token of text")
    limit = model.max_position_embeddings
    context = min(context or limit, limit)
    if len(prompt) + max_new_tokens > context:
        raise LocalMoEError(
            f"the prompt ({len(prompt)} tokens) plus {max_new_tokens} new tokens exceeds the {context}-token context: "
            f"shorten the prompt, lower --max-new-tokens or raise --context (the model allows up to {limit})"
        )
    stats = stats or GenerationStats()
    stats.prompt_tokens = len(prompt)
    device = model.model.embed_tokens.weight.device
    cache = model.new_cache(1, len(prompt) + max_new_tokens)
    ids = torch.tensor([list(prompt)], device=device)
    start = time.perf_counter()
    for chunk in range(0, len(prompt), prefill_chunk):
        logits = _forward(model, ids[:, chunk : chunk + prefill_chunk], cache)
    if on_prefill:
        on_prefill()
    for produced in range(1, max_new_tokens + 1):
        token = int(logits[0, -1].argmax())  # waits for the device: the timings below are real
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
        logits = _forward(model, torch.tensor([[token]], device=device), cache)


@torch.inference_mode()
def _forward(model: nn.Module, ids: torch.Tensor, cache) -> torch.Tensor:
    return model(ids, cache)
