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
from typing import Protocol

import torch

from localmoe.runtime.steps import StaticSteps, StepHooks


class Drafter(Protocol):
    """Proposes the next tokens; learns from the target's forward passes where `reads_hidden`."""

    reads_hidden: bool = False  # it needs the target's last hidden states (see `observe`)

    def propose(self, tokens: Sequence[int], limit: int) -> list[int]:
        """Up to `limit` (> 0) tokens to follow `tokens`: the prompt and the output so far, the last one
        chosen and not yet fed to the target."""
        ...

    def observe(self, start: int, kept: int, hidden: torch.Tensor) -> None:
        """The target fed positions start, start + 1, ... and keeps the first `kept` of them (the rest
        were rejected drafts); `hidden` [T, H]: its hidden states there as it hands them to its MTP layers,
        after its final norm (`CausalLM.mtp_hidden`). Only called where `reads_hidden`."""

    def rewind(self, pos: int) -> None:
        """A generation starts over a cache that holds the first `pos` positions of its prompt (a
        conversation's next turn): keep what the drafter learnt of them, or forget it all."""


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

    def rewind(self, pos: int) -> None:
        self.follows, self.indexed = {}, 0  # indexed again from the tokens it is shown next

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
    """Drafts with the checkpoint's multi-token-prediction layers, chained as they were trained (DeepSeek-V3's
    report, section 2.2; transformers' MtpModel.forward): layer k at position i takes layer k - 1's output
    there (layer 0: the target's hidden state) and the token at i + k + 1, and predicts the token at i + k + 2.
    So at the last position P the target ran, layer 0 predicts the token at P + 2 from the target's own next
    token, and layer k the one at P + k + 2 from the tokens drafted before it: n layers draft n tokens, each
    layer at P. Past the checkpoint's layers the last one drafts on at P + 1, P + 2, ..., fed its own output
    and the token it drafted (as vLLM and SGLang reuse their one layer: these layers were trained for no
    further depth). Each layer keeps a KV cache over the target's positions (from the first one it was shown;
    a conversation keeps it from turn to turn where the target's cache keeps its prefix, see `rewind`); the
    entries a drafted token reached (the last k of layer k, and every one past P) are dropped before the
    next draft and computed again with the kept tokens, from the target's hidden states, kept for that.
    Layers beyond `drafts` (the most drafted tokens a check takes) are never run; the others run in every
    round, even where a round asks for fewer drafts (near the end of a generation), so that each layer's
    cache stays whole for the next round and the next turn."""

    reads_hidden = True

    def __init__(
        self, model, context: int, hooks: StepHooks | None = None, drafts: int | None = None, graphs: bool = False
    ):
        """`context`: the target's, in positions; `hooks`: run around each step of an MTP layer, as around
        the target's (the expert cache learns from its routing there); `drafts`: the most tokens a round
        will be asked for (None: as many as there are layers, or more); `graphs`: capture the layers'
        static steps as CUDA graphs (see StaticSteps), where the MTP layers run static steps."""
        self.model, self.context, self.hooks, self.graphs = model, context, hooks or StepHooks(), graphs
        self.depth = min(len(model.mtp.layers), drafts or len(model.mtp.layers))  # the layers that draft
        # the most positions a layer runs at once after the first round: the depth - 1 kept from the round
        # before and a check's drafts + 1 (a prompt's chunks run uncaptured)
        self.most = (drafts or self.depth) + self.depth
        self.caches: list | None = None  # one per layer, allocated at the first hidden states
        self.steps: list[StaticSteps] | None = None  # each layer's static steps over its cache, per generation
        self.first = 0  # the target's position of the caches' position 0
        self.fed = 0  # target positions every drafting layer has run with kept tokens only
        # the target's hidden states [t, H] from position `fed` on, in the pieces it gave them: the layers
        # run over them piece by piece, never over more positions at once than the target did
        self.hidden: list[torch.Tensor] = []

    def observe(self, start: int, kept: int, hidden: torch.Tensor) -> None:
        if self.caches is None:
            self.caches = [self.model.new_mtp_cache(1, self.context - start, k) for k in range(self.depth)]
            self.first = self.fed = start
            self.steps = self._static_steps()
        waiting = self.fed + sum(piece.shape[0] for piece in self.hidden)
        assert start == waiting, f"hidden states at {start}, expected at {waiting}"
        self.hidden.append(hidden[:kept])

    def rewind(self, pos: int) -> None:
        seen = self.fed + sum(piece.shape[0] for piece in self.hidden)
        kept = self.caches is not None and self.first <= pos <= seen
        if kept and pos < self.fed:  # the layers' entries past pos go; the target feeds those positions again
            kept = all(cache.rewind(pos - self.first) == pos - self.first for cache in self.caches)
            self.fed, self.hidden = pos, []
        elif kept:
            self.hidden = _first_rows(self.hidden, pos - self.fed)
        if not kept:
            self.caches, self.hidden = None, []
        # a new generation: graphs captured anew (what they write into may have been reallocated since)
        self.steps = self._static_steps()

    def _static_steps(self) -> list[StaticSteps] | None:
        """Each layer's static steps over its cache, where the layers run static steps and have caches."""
        if self.caches is None or not self.model.static_mtp:
            return None
        device = self.model.model.embed_tokens.weight.device
        return [StaticSteps(cache, device, self.graphs, self.hooks, self.most) for cache in self.caches]

    @torch.inference_mode()
    def propose(self, tokens: Sequence[int], limit: int) -> list[int]:
        start = self.fed  # the layers run positions start .. P, P the last the target ran
        known, drafts = list(tokens), []  # the token at position i: known[i], then the drafts
        for k in range(self.depth):
            self.caches[k].rewind(start - self.first)
        pieces = self.hidden
        while len(pieces) > 1 and pieces[-1].shape[0] < self.depth:  # the positions that read drafts in one piece
            pieces = [*pieces[:-2], torch.cat(pieces[-2:])]
        at = start
        for piece in pieces:
            h, n = piece[None], piece.shape[0]
            for k in range(self.depth):  # layer k over this piece, once the layers before it drafted
                following = (known[at + k + 1 : at + k + 1 + n] + drafts)[:n]  # the tokens at i + k + 1
                logits, h = self._step(h, torch.tensor([following], device=h.device), k)
                if at + n == len(known) - 1:  # the last piece: P is in it
                    drafts.append(int(logits[0, -1].argmax()))
            at += n
        kept = max(start, at + 1 - self.depth)  # the last k positions of layer k saw drafts
        self.hidden, self.fed = _last_rows(pieces, at - kept), kept
        while len(drafts) < limit:
            logits, h = self._step(h[:, -1:], torch.tensor([drafts[-1:]], device=h.device), self.depth - 1)
            drafts.append(int(logits[0, -1].argmax()))
        return drafts[:limit]

    def _step(self, h: torch.Tensor, following: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.steps is not None:
            cache = self.caches[depth]

            def step(positions, keys, h, ids):
                return self.model.mtp_step(h, ids, positions, cache, keys, depth)

            return self.steps[depth]("mtp", step, h=h, ids=following)
        self.hooks.before()
        logits, h = self.model.mtp_draft(h, following, self.caches[depth], depth)
        self.hooks.after()
        return logits, h


def _first_rows(pieces: list[torch.Tensor], rows: int) -> list[torch.Tensor]:
    """The first `rows` rows of the pieces put end to end, in pieces."""
    kept = []
    for piece in pieces:
        if rows <= 0:
            break
        kept.append(piece[:rows])
        rows -= piece.shape[0]
    return kept


def _last_rows(pieces: list[torch.Tensor], rows: int) -> list[torch.Tensor]:
    """The last `rows` rows of the pieces put end to end, as one copy (the pieces are freed)."""
    tail = []
    for piece in reversed(pieces):
        if rows <= 0:
            break
        tail.insert(0, piece[-rows:])
        rows -= piece.shape[0]
    return [torch.cat(tail).clone()] if tail else []


@dataclass
class SpeculationStats:
    """What the drafter proposed and the target kept, in all and by position in the draft."""

    drafted: int = 0
    accepted: int = 0
    verifications: int = 0  # forward passes that checked a draft
    fed_again: int = 0  # tokens fed again after a rejection, where a state could not be cut back to them
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
# context it runs in, the hooks of its steps, the most tokens a check takes and whether to capture CUDA graphs
DRAFTERS = {
    "mtp": MtpDrafter,
    "lookup": lambda model, context, hooks, drafts, graphs: PromptLookup(),
    "off": lambda model, context, hooks, drafts, graphs: None,
}
