"""Speculative decoding's parts: drafters, which propose the tokens likely to come next, and the counters
of what they proposed and what was kept. The generation loop (localmoe.runtime.generate) checks a draft
with one forward pass of the target model over all of its tokens.

It is exact by construction: every token still comes from the sampler, applied to the target's logits at
its position, in order, once per token, as in plain decoding; a draft only decides how many positions'
logits one forward pass computes ahead, and is kept while it equals the sampler's choice. Under greedy
decoding that keeps the longest prefix matching the target's argmax, then the target's own next token.
Under sampling, a drafted token d is a proposal q that puts all its mass on d, and keeping d when the
sampler draws it (probability p(d)) and otherwise the token drawn (from p without d, renormalised) is the
standard rejection rule (Leviathan et al. 2023: accept with min(1, p(d) / q(d)), else draw from
max(0, p - q)), which keeps the target distribution; a seeded sampler even makes the draws plain
decoding makes. What is not exact is the arithmetic: T tokens through one forward pass round differently
from T single-token steps (other matmul shapes), as chunked prefill does.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from localmoe.runtime.generate import StepHooks


class Drafter(Protocol):
    """Proposes the next tokens; learns from the target's forward passes where `reads_hidden`."""

    reads_hidden: bool = False  # it needs the target's last hidden states (see `observe`)

    def propose(self, tokens: Sequence[int], limit: int) -> list[int]:
        """Up to `limit` (> 0) tokens to follow `tokens`: the prompt and the output so far, the last one
        chosen and not yet fed to the target."""
        ...

    def observe(self, start: int, kept: int, hidden: torch.Tensor) -> None:
        """The target fed positions start, start + 1, ... and keeps the first `kept` of them (the rest
        were rejected drafts); `hidden` [T, H]: its last layer's outputs there, before the final norm.
        Only called where `reads_hidden`."""


class PromptLookup(Drafter):
    """Prompt lookup decoding (Saxena 2023; transformers' `prompt_lookup_num_tokens`, vLLM's `ngram`): the
    tokens that followed the latest earlier occurrence of the sequence's last n tokens, the longest n
    from `longest` down to `shortest` that occurred. Text that quotes or repeats its context (code edits,
    summaries, extraction) drafts well; other text drafts nothing, at no cost. One per generation: the
    tokens it is shown only grow."""

    def __init__(self, longest: int = 3, shortest: int = 1):
        self.sizes = range(longest, shortest - 1, -1)
        self.follows: dict[tuple[int, ...], int] = {}  # n-gram -> where the token after its latest occurrence is
        self.indexed = 0  # the n-grams ending before this position are in `follows`

    def propose(self, tokens: Sequence[int], limit: int) -> list[int]:
        for end in range(self.indexed, len(tokens) - 1):  # n-grams with a token after them, the last excluded
            for n in self.sizes:
                if end + 1 >= n:
                    self.follows[tuple(tokens[end + 1 - n : end + 1])] = end + 1
        self.indexed = max(self.indexed, len(tokens) - 1)
        for n in self.sizes:
            if len(tokens) >= n and (after := self.follows.get(tuple(tokens[-n:]))) is not None:
                return list(tokens[after : after + limit])
        return []


class MtpDrafter(Drafter):
    """Drafts with the checkpoint's multi-token-prediction layer (DeepSeek-V3's MTP, as vLLM and SGLang
    run it): at position i it takes the target's hidden state there and the token at i + 1, and predicts
    the token at i + 2; further drafts feed it its own output and the token it drafted (one layer, reused
    at every depth). Its KV cache follows the target's positions (from the first one it was shown: in a
    conversation's later turns, it has not seen the earlier ones); drafted positions are dropped from it
    before the target's hidden states there are fed."""

    reads_hidden = True

    def __init__(self, model, context: int, hooks: "StepHooks | None" = None):
        """`context`: the target's, in positions; `hooks`: run around each step of the MTP layer, as around
        the target's (the expert cache learns from its routing there)."""
        self.model, self.context, self.hooks = model, context, hooks
        self.cache = None  # allocated at the first hidden states, for the positions from there on
        self.first = 0  # the target's position of the cache's position 0
        self.pending: list[torch.Tensor] = []  # hidden states [T, H] of kept positions not fed yet
        self.fed = 0  # target positions whose hidden states went through the MTP layer (from `first`)

    def observe(self, start: int, kept: int, hidden: torch.Tensor) -> None:
        if self.cache is None:
            self.cache = self.model.new_mtp_cache(1, self.context - start)
            self.first = self.fed = start
        waiting = self.fed + sum(h.shape[0] for h in self.pending)
        assert start == waiting, f"hidden states at {start}, expected at {waiting}"
        self.pending.append(hidden[:kept])

    @torch.inference_mode()
    def propose(self, tokens: Sequence[int], limit: int) -> list[int]:
        self.cache.rewind(self.fed - self.first)  # the last draft's positions
        h = torch.cat(self.pending)[None]
        self.pending = []
        device = h.device
        following = torch.tensor([tokens[self.fed + 1 : self.fed + 1 + h.shape[1]]], device=device)
        self.fed += h.shape[1]
        drafts = []
        while True:
            if self.hooks:
                self.hooks.before()
            logits, h = self.model.mtp_draft(h, following, self.cache)
            if self.hooks:
                self.hooks.after()
            drafts.append(int(logits[0, -1].argmax()))
            if len(drafts) == limit:
                return drafts
            h, following = h[:, -1:], torch.tensor([drafts[-1:]], device=device)


@dataclass
class SpeculationStats:
    """What the drafter proposed and the target kept, in all and by position in the draft."""

    drafted: int = 0
    accepted: int = 0
    verifications: int = 0  # forward passes that checked a draft
    fed_again: int = 0  # tokens fed again after a rejection, where states that cannot be cut back were restored
    drafted_at: list[int] = field(default_factory=list)  # [i]: drafts that had an i-th token
    accepted_at: list[int] = field(default_factory=list)  # [i]: drafts whose i-th token was kept

    def record(self, drafted: int, accepted: int) -> None:
        self.verifications += 1
        self.drafted += drafted
        self.accepted += accepted
        grow = drafted - len(self.drafted_at)
        self.drafted_at += [0] * grow
        self.accepted_at += [0] * grow
        for position in range(drafted):
            self.drafted_at[position] += 1
            self.accepted_at[position] += position < accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def rates(self) -> list[float]:
        """The share of the drafts reaching each position whose token there was kept."""
        return [kept / drafted for kept, drafted in zip(self.accepted_at, self.drafted_at, strict=True)]

    def __iadd__(self, other: "SpeculationStats") -> "SpeculationStats":
        for name in ("drafted", "accepted", "verifications", "fed_again"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.drafted_at, other.drafted_at), (self.accepted_at, other.accepted_at)):
            mine += [0] * (len(theirs) - len(mine))
            for position, count in enumerate(theirs):
                mine[position] += count
        return self

    def as_dict(self) -> dict:
        return {
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "acceptance_by_position": self.rates(),
            "verifications": self.verifications,
            "fed_again": self.fed_again,
        }

    def summary(self) -> str:
        per_position = ", ".join(f"{rate:.2f}" for rate in self.rates()) or "none"
        return (
            f"speculation: {self.drafted} drafted, {self.accepted} accepted ({self.acceptance_rate:.1%}) in "
            f"{self.verifications} verifications; by position: {per_position}"
        )


# what drafts for each choice of `--speculative` (localmoe.options.SPECULATIVE), given the target model, the
# context it runs in and the hooks of its steps
DRAFTERS = {
    "mtp": MtpDrafter,
    "lookup": lambda model, context, hooks: PromptLookup(),
    "off": lambda model, context, hooks: None,
}
