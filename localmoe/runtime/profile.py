"""Routing profiles: how often each expert was routed to in earlier runs of a checkpoint, so that a run
starts with the experts it will likely need already in slots, and its policy with their history.

A profile is a small JSON file: per MoE layer, the tokens seen and the tokens routed to each expert.
Its size is bounded by the model (one number per expert); a layer's counts are halved whenever it has
seen more than `HORIZON` tokens, so recent runs weigh more and the numbers stay small. It is written
to a temporary file then renamed, so a run killed while saving leaves the previous profile whole.
"""

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from localmoe.checkpoint import Checkpoint
from localmoe.errors import LocalMoEError, setting
from localmoe.paths import cache_dir

FORMAT = 1
HORIZON = 1_000_000  # tokens per layer before the counts halve

Key = tuple[int, int]  # (layer, expert)


@dataclass
class RoutingProfile:
    tokens: Counter[int] = field(default_factory=Counter)  # tokens seen, per MoE layer
    counts: Counter[Key] = field(default_factory=Counter)  # tokens routed, per (layer, expert)

    @classmethod
    def load(cls, path: Path) -> "RoutingProfile":
        """The profile in `path`; an empty one where there is none yet."""
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, this localmoe writes {FORMAT}")
            tokens = Counter({int(layer): int(n) for layer, n in data["tokens"].items()})
            counts = Counter(
                {(int(layer), e): int(n) for layer, row in data["counts"].items() for e, n in enumerate(row) if n}
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise LocalMoEError(f"{path} is not a routing profile this localmoe reads ({error}): delete it") from None
        return cls(tokens, counts)

    def save(self, path: Path) -> None:
        experts = 1 + max((expert for _, expert in self.counts), default=-1)
        rows = {layer: [0] * experts for layer in self.tokens}
        for (layer, expert), n in self.counts.items():
            rows[layer][expert] = n
        data = {"format": FORMAT, "tokens": self.tokens, "counts": rows}
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(data))
        temporary.replace(path)

    def add(self, counts: Counter[Key], top_k: int) -> None:
        """Add a run's tokens routed per expert (`top_k` experts per token)."""
        routed = Counter()
        for (layer, _), n in counts.items():
            routed[layer] += n
        for layer, n in routed.items():
            self.tokens[layer] += n // top_k
        self.counts.update(counts)
        for layer in [layer for layer, n in self.tokens.items() if n > HORIZON]:
            self.tokens[layer] //= 2
            for key in [key for key in self.counts if key[0] == layer]:
                self.counts[key] //= 2

    def check(self, layers: set[int], num_experts: int, path: Path) -> None:
        """Refuse a profile recorded for another model: one naming layers or experts this one lacks."""
        for layer, expert in self.counts:
            if layer not in layers or expert >= num_experts:
                raise LocalMoEError(
                    f"{path} was recorded for another model (it has expert {expert} of MoE layer {layer}): "
                    f"give the profile of this checkpoint, or {setting('profile')} off"
                )

    def shares(self) -> dict[Key, float]:
        """Each expert's share of its layer's tokens: the expected uses per token (they sum to top-k)."""
        return {key: n / self.tokens[key[0]] for key, n in self.counts.items() if self.tokens[key[0]]}

    def hottest(self) -> list[Key]:
        """Experts by share, highest first."""
        shares = self.shares()
        return sorted(shares, key=shares.__getitem__, reverse=True)


def default_profile_path(checkpoint: Checkpoint) -> Path:
    """Where a checkpoint's profile lives under localmoe's cache folder, keyed by its folder."""
    identity = f"{checkpoint.path.resolve()}\n{checkpoint.part}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_dir() / "profiles" / f"{checkpoint.path.name}-{key}.json"


def start_from_profile(cache, profile: RoutingProfile) -> None:
    """Fill the free slots of an `ExpertCache` with the profile's hottest experts and give its policy
    their history, where the policy keeps one."""
    cache.warm(profile.hottest())
    cache.policy.seed(profile.shares())
