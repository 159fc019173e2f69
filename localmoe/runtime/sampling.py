"""Choosing the next token: greedy, or sampling with temperature, top-k, top-p, min-p and a repetition
penalty, applied in the order transformers applies them, from a seeded generator; before them, OpenAI's
logit bias and presence and frequency penalties, and a constraint (a grammar) that masks the tokens it
does not allow. On request the sampler records each step's log-probabilities.

Sampling draws one exponential variate per token and takes argmax(p / q), which picks token i with
probability p_i without a cumulative sum or a host round trip (the race gpt-fast uses). A constraint or
a record of log-probabilities reads the chosen token on the host each step: they cost that round trip.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from localmoe.errors import LocalMoEError

SEEDS = (-(2**63), 2**64)  # what torch's generators take (a negative seed wraps around)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # subtracted from the logit of every token the output already has
    frequency_penalty: float = 0.0  # subtracted once per time the output has the token
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    seed: int | None = None

    @classmethod
    def from_generation_config(cls, config: dict[str, Any], **overrides) -> "SamplingParams":
        """The checkpoint's defaults (greedy unless it sets do_sample), then the given overrides (None: keep)."""
        params = cls()
        if config.get("do_sample"):
            params = cls(
                temperature=config.get("temperature", 1.0),
                top_k=config.get("top_k") or 0,
                top_p=config.get("top_p", 1.0),
                min_p=config.get("min_p") or 0.0,
            )
        if config.get("repetition_penalty"):
            params = replace(params, repetition_penalty=config["repetition_penalty"])
        given = {key: value for key, value in overrides.items() if value is not None}
        params = replace(params, **given)
        params.check("generation_config.json", frozenset(given))
        return params

    @classmethod
    def check_overrides(cls, **overrides) -> None:
        """Refuse bad values before anything is loaded (the checkpoint's defaults are checked once read)."""
        cls(**{key: value for key, value in overrides.items() if value is not None}).check()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def check(self, defaults_from: str | None = None, overridden: frozenset[str] = frozenset()) -> None:
        """One line for the first bad value; NaN fails every range (it would pick token 0 forever). A bad
        value that is not in `overridden` came from `defaults_from`, which the line names."""
        for name, message in self._problems():
            if name not in overridden and defaults_from:
                message = f"{defaults_from}: {message}"
            raise LocalMoEError(message)

    def _problems(self) -> Iterator[tuple[str, str]]:
        numbers = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
        for name in numbers:
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                yield name, f"{name} must be a number, not {value!r}"
        for name in ("top_k", "seed"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                yield name, f"{name} must be an integer, not {value!r}"
        ranges = [
            ("temperature", not 0 <= self.temperature < math.inf, "temperature must be 0 (greedy) or more"),
            ("top_k", self.top_k < 0, "top_k must be 0 (off) or more"),
            ("top_p", not 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            ("min_p", not 0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            ("repetition_penalty", not 0 < self.repetition_penalty < math.inf, "repetition_penalty must be positive"),
            ("presence_penalty", not -2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            ("frequency_penalty", not -2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (
                "logit_bias",
                not all(-100 <= bias <= 100 for _, bias in self.logit_bias),
                "logit_bias values must be in [-100, 100]",
            ),
            (
                "seed",
                self.seed is not None and not SEEDS[0] <= self.seed < SEEDS[1],
                "seed must be an integer from -2**63 to 2**64 - 1",
            ),
        ]
        yield from ((name, message) for name, bad, message in ranges if bad)


class Constraint(Protocol):
    """What a grammar does for the sampler: mask the logits [V] to the tokens it allows, then follow the
    token chosen; `finished` once nothing but the end of text may follow."""

    finished: bool

    def mask(self, logits: torch.Tensor) -> torch.Tensor: ...

    def accept(self, token: int) -> None: ...


@dataclass
class StepLogprobs:
    """One chosen token's log-probability and the most likely tokens', from the model's own distribution
    (the log-softmax of its logits, before bias, penalties, constraint, temperature and filters)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class Sampler:
    """Picks each next token from the last position's logits [V] and the ids seen so far."""

    def __init__(
        self,
        params: SamplingParams,
        device: torch.device,
        *,
        constraint: Constraint | None = None,
        top_logprobs: int | None = None,
    ):
        """`top_logprobs`: None records nothing; k records each chosen token's log-probability and the
        k most likely tokens' in `steps`."""
        self.params, self.constraint, self.top_logprobs = params, constraint, top_logprobs
        self.steps: list[StepLogprobs] = []
        self.prompt_length: int | None = None  # the ids seen at the first call; the output follows them
        self.generator = torch.Generator(device=device)
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed % 2**64)

    @property
    def finished(self) -> bool:
        """The constraint allows nothing more: generation should end here."""
        return self.constraint is not None and self.constraint.finished

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """The next token id as a 0-d tensor on the logits' device; `seen` holds prompt and output ids."""
        if self.prompt_length is None:
            self.prompt_length = seen.numel()
        logits = logits.float()
        logprobs = logits.log_softmax(-1) if self.top_logprobs is not None else None
        token = self._choose(self._adjusted(logits, seen))
        if self.constraint is not None:
            self.constraint.accept(int(token))
        if logprobs is not None:
            self.steps.append(_step(logprobs, int(token), self.top_logprobs))
        return token

    def _adjusted(self, logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.logit_bias:
            ids, bias = zip(*p.logit_bias, strict=True)
            logits = logits.index_add(
                0, torch.tensor(ids, device=logits.device), torch.tensor(bias, device=logits.device)
            )
        if self.constraint is not None:
            logits = self.constraint.mask(logits)
        if p.repetition_penalty != 1.0:
            logits = penalize_repetition(logits, seen, p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            logits = penalize_presence(logits, seen[self.prompt_length :], p.presence_penalty, p.frequency_penalty)
        return logits

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.greedy:
            return logits.argmax()
        probs = allowed_probabilities(logits / p.temperature, p.top_k, p.top_p, p.min_p)
        race = torch.empty_like(probs).exponential_(generator=self.generator)
        return (probs / race).argmax()


def _step(logprobs: torch.Tensor, token: int, top: int) -> StepLogprobs:
    best = logprobs.topk(min(top, logprobs.numel())) if top else None
    alternatives = list(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else []
    return StepLogprobs(token, float(logprobs[token]), alternatives)


def penalize_presence(logits: torch.Tensor, output: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties: each token the output has loses `presence`, plus `frequency` per occurrence."""
    counts = torch.bincount(output, minlength=logits.numel())[: logits.numel()].to(logits.dtype)
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make every token already seen less likely: positive logits divided, negative ones multiplied."""
    scores = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits


def allowed_probabilities(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Softmax over the tokens that survive top-k, then top-p, then min-p; zero elsewhere. [V]"""
    if 0 < top_k < logits.numel():
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # Drop the least likely tokens whose total probability stays within 1 - top_p; keep at least one.
        ordered, order = logits.sort()
        tail = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        tail[-1] = False
        logits = logits.masked_fill(torch.zeros_like(tail).scatter(0, order, tail), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits.softmax(-1)
