"""Choosing the next token: greedy, or sampling with temperature, top-k, top-p, min-p and a repetition
penalty, applied in the order transformers applies them, from a seeded generator.

Sampling draws one exponential variate per token and takes argmax(p / q), which picks token i with
probability p_i without a cumulative sum or a host round trip (the race gpt-fast uses).
"""

from dataclasses import dataclass, replace
from typing import Any

import torch

from localmoe.errors import LocalMoEError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
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
        params = replace(params, **{key: value for key, value in overrides.items() if value is not None})
        params.check()
        return params

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def check(self) -> None:
        problems = [
            (self.temperature < 0, "temperature must be 0 (greedy) or more"),
            (self.top_k < 0, "top_k must be 0 (off) or more"),
            (not 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (not 0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty <= 0, "repetition_penalty must be positive"),
            (self.seed is not None and not -(2**63) <= self.seed < 2**64, "seed must be from -2**63 to 2**64 - 1"),
        ]
        for bad, message in problems:
            if bad:
                raise LocalMoEError(message)


class Sampler:
    """Picks each next token from the last position's logits [V] and the ids seen so far."""

    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """The next token id as a 0-d tensor on the logits' device; `seen` holds prompt and output ids."""
        p = self.params
        logits = logits.float()
        if p.repetition_penalty != 1.0:
            logits = penalize_repetition(logits, seen, p.repetition_penalty)
        if p.greedy:
            return logits.argmax()
        probs = allowed_probabilities(logits / p.temperature, p.top_k, p.top_p, p.min_p)
        race = torch.empty_like(probs).exponential_(generator=self.generator)
        return (probs / race).argmax()


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
