"""The generation loop, as a generator of token ids: the CLI, the chat, tests and benchmarks all consume it;
and the decode steps it runs: static where the model allows (captured as CUDA graphs where asked), else
the model's forward."""

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from localmoe.errors import LocalMoEError, setting
from localmoe.models.state import KVCache
from localmoe.runtime.sampling import Sampler, SamplingParams
from localmoe.runtime.speculative import Drafter, SpeculationStats
from localmoe.runtime.steps import StaticSteps, StepHooks


@dataclass
class GenerationStats:
    """Filled in by the generator as it runs."""

    prompt_tokens: int = 0  # tokens fed to the model for the prompt (the reused ones not counted)
    new_tokens: int = 0
    prefill_seconds: float = 0.0  # until the first new token was chosen: the time to first token
    decode_seconds: float = 0.0
    decode_host_seconds: float = 0.0  # of which the host spent queueing decode steps and sampling (not waiting)
    speculation: SpeculationStats | None = None  # where decoding was speculative
    experts_loaded: int | None = None  # by the decode steps from outside the expert slots (None: all resident)

    @property
    def prefill_rate(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_rate(self) -> float:
        # The first new token comes from the prefill; the rest each cost one decode step.
        return max(self.new_tokens - 1, 0) / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def loaded_per_token(self) -> float | None:
        """Experts loaded per decoded token (the first token comes from the prefill)."""
        decoded = self.new_tokens - 1
        return self.experts_loaded / decoded if self.experts_loaded is not None and decoded > 0 else None

    def summary(self) -> str:
        line = (
            f"prompt: {self.prompt_tokens} tokens, {self.prefill_rate:.1f} tok/s, first token after "
            f"{self.prefill_seconds:.2f} s; generated: {self.new_tokens} tokens, {self.decode_rate:.1f} tok/s"
        )
        if self.loaded_per_token is not None:
            line += f"; {self.loaded_per_token:.1f} experts loaded per decoded token"
        return line + (f"; {self.speculation.summary()}" if self.speculation else "")


@dataclass
class DecodeSteps:
    """One decode token after another over `cache`, and speculative checks of up to `most` tokens: static
    steps (`CausalLM.decode_step`) where the model allows, captured as CUDA graphs with `graphs` (see
    StaticSteps); the model's forward otherwise."""

    model: nn.Module
    cache: KVCache
    graphs: bool = False
    hooks: StepHooks = field(default_factory=StepHooks)
    most: int = 1

    def __post_init__(self):
        self.static = self.model.static_decode
        device = self.model.model.embed_tokens.weight.device
        self.steps = StaticSteps(self.cache, device, self.graphs, self.hooks, self.most) if self.static else None

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """Logits [1, 1, V] after `token` ([1, 1], on the device) at the cache's next position."""
        if self.static:
            return self.steps("decode", self._decode, ids=token)
        return self._eager(lambda: self.model(token, self.cache))

    def check(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A speculative check of ids [1, T] (the last chosen token, then the drafts) at the cache's next
        positions: logits [1, T, V] and the last layer's hidden states [1, T, E] at every position."""
        if self.static:
            return self.steps("check", self._check, ids=ids)
        # a recurrent state keeps its trail where there are drafts to cut back
        return self._eager(lambda: _forward(self.model, ids, self.cache, True, True, trail=ids.shape[1] > 1))

    def _decode(self, positions: torch.Tensor, keys: int, ids: torch.Tensor) -> torch.Tensor:
        return self.model.decode_step(ids, positions, self.cache, keys)

    def _check(self, positions: torch.Tensor, keys: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.decode_step(ids, positions, self.cache, keys, hidden=True)

    @torch.inference_mode()
    def _eager(self, run: Callable[[], object]):
        self.hooks.before()
        out = run()
        self.hooks.after()
        return out


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
    drafter: Drafter | None = None,
    draft_tokens: int = 4,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` tokens after `prompt`, stopping after an EOS id.

    With `cache`, its first `reuse` positions already hold the start of `prompt` (an earlier turn of
    a conversation) and only the rest is fed; without, a cache is allocated for this call. The prompt
    goes through the model in chunks of `prefill_chunk` tokens, which bounds a long prompt's
    activations; `on_prefill` runs once the prompt is in the cache. Greedy without a `sampler`. `hooks`
    run around every forward step; `graphs`: capture the decode steps as CUDA graphs (see DecodeSteps).
    With a `drafter`, decoding is speculative: up to `draft_tokens` drafted tokens checked per forward
    pass (see localmoe.runtime.speculative), counted in `stats.speculation`.
    """
    limit = model.max_position_embeddings
    check_fits(len(prompt), max_new_tokens, min(context or limit, limit, cache.max_len if cache else limit), limit)
    sampler = sampler or Sampler(SamplingParams(), model.model.embed_tokens.weight.device)
    stats = stats or GenerationStats()
    device = model.model.embed_tokens.weight.device
    if cache is None:
        cache = model.new_cache(1, len(prompt) + max_new_tokens)
    hooks = hooks or StepHooks()
    decode = DecodeSteps(model, cache, graphs, hooks, most=1 + draft_tokens if drafter is not None else 1)
    # the last prompt token is always fed: its logits pick the first token
    reuse = cache.rewind(min(reuse, len(prompt) - 1))
    if drafter is not None:
        drafter.rewind(reuse)
    seen = torch.tensor([*prompt, *[0] * max_new_tokens], device=device)
    stats.prompt_tokens = len(prompt) - reuse
    start = time.perf_counter()
    hidden = drafter is not None and drafter.reads_hidden
    for chunk in range(reuse, len(prompt), prefill_chunk):
        hooks.before()
        logits, h = _forward(model, seen[None, chunk : min(chunk + prefill_chunk, len(prompt))], cache, hidden, hidden)
        hooks.after()
        if hidden:
            drafter.observe(chunk, h.shape[1], h[0])
    if on_prefill:
        on_prefill()
    if drafter is not None:
        stats.speculation = SpeculationStats()
        steps = Speculation(
            model, cache, decode, drafter, draft_tokens, hooks, prefill_chunk, prompt, stats.speculation
        )
        yield from steps.run(logits[:, -1:], sampler, seen, max_new_tokens, eos_ids, stats, start)
        return
    for produced in range(1, max_new_tokens + 1):
        position = len(prompt) + produced - 1
        token = _choose(sampler, logits[0, -1], seen, position, stats, start)
        yield token
        if token in eos_ids or produced == max_new_tokens:
            return
        start = time.perf_counter()
        logits = decode(seen[None, position : position + 1])


def _choose(sampler: Sampler, logits: torch.Tensor, seen: torch.Tensor, position: int, stats, start: float) -> int:
    """The token at `position` of `seen`, chosen from `logits` [V]; the time since `start` counted in
    `stats`, the first token's as the prefill's."""
    seen[position] = sampler(logits, seen[:position])
    queued = time.perf_counter()
    token = int(seen[position])  # waits for the device: the timings below are real
    now = time.perf_counter()
    if stats.new_tokens == 0:
        stats.prefill_seconds = now - start
    else:
        stats.decode_seconds += now - start
        stats.decode_host_seconds += queued - start
    stats.new_tokens += 1
    return token


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


class Speculation:
    """Speculative decode steps: the drafter's tokens fed after the last chosen one in one forward pass,
    kept while the sampler chooses them; the cache then cut back to the tokens kept, through each state's
    `truncate` (recurrent and pooled states into the check's trail), feeding the kept ones again only where
    a state could not be cut there."""

    def __init__(self, model, cache, decode, drafter, draft_tokens, hooks, prefill_chunk, prompt, stats):
        self.model, self.cache, self.decode, self.drafter = model, cache, decode, drafter
        self.draft_tokens, self.hooks, self.prefill_chunk = draft_tokens, hooks, prefill_chunk
        self.tokens = list(prompt)  # prompt and output so far, on the host
        self.stats: SpeculationStats = stats
        self.fed: tuple[int, torch.Tensor] | None = None  # (first position, hidden states) of the last forward

    def run(self, logits, sampler, seen, max_new_tokens, eos_ids, stats: GenerationStats, start) -> Iterator[int]:
        """Yield the tokens after the prompt, from the prefill's last logits [1, 1, V] on."""
        rows, drafts = logits[0], []
        try:
            while True:
                for kept, row in enumerate(rows):  # row i follows draft i - 1: `kept` drafts precede it
                    token = _choose(sampler, row, seen, len(self.tokens), stats, start)
                    self.tokens.append(token)
                    produced = stats.new_tokens
                    yield token
                    start = time.perf_counter()
                    matched = kept < len(drafts) and token == drafts[kept]
                    if token in eos_ids or produced == max_new_tokens:
                        if drafts:  # the drafts after this token were never judged
                            self.stats.record(min(len(drafts), kept + 1), kept + matched)
                        return
                    if not matched:
                        break
                if drafts:
                    self.stats.record(len(drafts), kept)
                self._settle()
                room = min(self.draft_tokens, max_new_tokens - produced - 1, self.cache.max_len - len(self.tokens))
                drafts = self.drafter.propose(self.tokens, room)[:room] if room > 0 else []
                rows = self._verify(drafts, seen.device)
        finally:
            self._settle()

    def _verify(self, drafts: list[int], device: torch.device) -> torch.Tensor:
        """Logits [1 + len(drafts), V] after the last chosen token and after each draft."""
        ids = torch.tensor([self.tokens[-1:] + drafts], device=device)
        if not drafts and not self.drafter.reads_hidden:
            return self.decode(ids)[0]
        first = self.cache.pos
        logits, h = self.decode.check(ids)
        if self.drafter.reads_hidden:  # a copy of a graph's outputs: its next replay may come before they are read
            self.fed = first, h.clone() if self.decode.graphs else h
        return logits[0]

    def _settle(self) -> None:
        """Once the last forward pass's tokens are chosen (all of them, or those before the generation
        ended): the cache keeps every token but the last chosen, as plain decoding's does, and the drafter
        learns which of the pass's positions that keeps (a conversation's next turn may go on from them)."""
        keep = len(self.tokens) - 1
        if self.fed is not None:
            first, hidden = self.fed
            self.drafter.observe(first, min(keep - first, hidden.shape[1]), hidden[0])
        self.fed = None
        if self.cache.pos <= keep or self.cache.writing:
            return  # nothing fed beyond, or a forward pass cut short, which the next rewind sees
        done = self.cache.rewind(keep)
        self.stats.fed_again += keep - done
        device = self.model.model.embed_tokens.weight.device
        for chunk in range(done, keep, self.prefill_chunk):
            self.hooks.before()
            _forward(
                self.model,
                torch.tensor([self.tokens[chunk : min(chunk + self.prefill_chunk, keep)]], device=device),
                self.cache,
            )
            self.hooks.after()


@torch.inference_mode()
def _forward(
    model: nn.Module, ids: torch.Tensor, cache: KVCache, every: bool = False, hidden: bool = False, trail: bool = False
) -> tuple:
    """(logits, the last layer's hidden states or None): of the last position, or of every one with
    `every` (a draft's check); hidden states where `hidden` (for a drafter that reads them: then of
    every position). `trail`: a check, which the cache may be cut back into (see Step.trail)."""
    if hidden:
        return model(ids, cache, all_logits=True, hidden=True, trail=trail)
    return model(ids, cache, all_logits=every, trail=trail), None
