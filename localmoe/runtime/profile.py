"""Routing profiles: how often each expert was routed to in earlier runs of a checkpoint, so that a run
starts with the experts it will likely need already in slots, and its policy with their history.

A profile is a small JSON file: per MoE layer, the tokens seen and the tokens routed to each expert.
Its size is bounded by the model (one number per expert); a layer's counts are halved whenever it has
seen more than `HORIZON` tokens, so recent runs weigh more and the numbers stay small. It is written
whole (`write_atomic`), and runs that save at once merge their counts under its lock (`merge_into`).
"""

import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from localmoe.checkpoint import Checkpoint
from localmoe.errors import LocalMoEError, setting
from localmoe.files import locked, read_limited, write_atomic
from localmoe.paths import cache_dir

FORMAT = 1
PROFILES = "profiles"  # the folder of localmoe's cache folder that holds them
HORIZON = 1_000_000  # tokens per layer before the counts halve
# A profile holds a number per expert: some MiB for the largest models. Beyond this a file is no profile.
MAX_BYTES = 64 * 2**20

Key = tuple[int, int]  # (layer, expert)


@dataclass
class RoutingProfile:
    tokens: Counter[int] = field(default_factory=Counter)  # tokens seen, per MoE layer
    counts: Counter[Key] = field(default_factory=Counter)  # tokens routed, per (layer, expert)

    @classmethod
    def load(cls, path: Path) -> "RoutingProfile":
        """The profile in `path`; an empty one where there is none yet. A file that is not a profile
        raises ProfileError."""
        if not path.exists():
            return cls()
        try:
            data = json.loads(read_limited(path, MAX_BYTES).decode("utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, this localmoe writes {FORMAT}")
            tokens = Counter({int(layer): int(n) for layer, n in data["tokens"].items()})
            counts = Counter(
                {(int(layer), e): int(n) for layer, row in data["counts"].items() for e, n in enumerate(row) if n}
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
            raise ProfileError(f"{path} is not a routing profile this localmoe reads ({error})") from None
        return cls(tokens, counts)

    def save(self, path: Path) -> None:
        experts = 1 + max((expert for _, expert in self.counts), default=-1)
        rows = {layer: [0] * experts for layer in self.tokens}
        for (layer, expert), n in self.counts.items():
            rows[layer][expert] = n
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"format": FORMAT, "tokens": self.tokens, "counts": rows}))

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
                raise ProfileError(
                    f"{path} was recorded for another model (it has expert {expert} of MoE layer {layer})"
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
    return cache_dir() / PROFILES / f"{checkpoint.file_label}-{key}.json"


class ProfileError(LocalMoEError):
    """A file that is not a routing profile of this model."""


def read_profile(path: Path, own: bool, layers: set[int], num_experts: int) -> RoutingProfile:
    """The routing profile in `path` for a model with these MoE `layers` and experts per layer. `own`: the
    file is localmoe's (the checkpoint's profile in its cache folder), so a damaged one, or one of another
    model that once stood at the checkpoint's path, is replaced by an empty one, with a notice; else it is
    the user's, and refused in one line."""
    try:
        profile = RoutingProfile.load(path)
        profile.check(layers, num_experts, path)
    except ProfileError as error:
        if not own:
            raise ProfileError(
                f"{error}: give this checkpoint's routing profile, or {setting('profile')} auto or off"
            ) from None
        print(f"localmoe: {error}: starting a new one", file=sys.stderr)
        return RoutingProfile()
    return profile


def merge_into(path: Path, counts: Counter[Key], top_k: int, own: bool, layers: set[int], num_experts: int):
    """Add a run's routing `counts` to the profile in `path` as it is now, under its lock, so that runs
    saving at once each add theirs; the merged profile is returned."""
    with locked(path):
        profile = read_profile(path, own, layers, num_experts)
        profile.add(counts, top_k)
        profile.save(path)
    return profile


def start_from_profile(cache, profile: RoutingProfile) -> None:
    """Fill the free slots of an `ExpertCache` with the profile's hottest experts and give its policy
    their history, where the policy keeps one."""
    cache.warm(profile.hottest())
    cache.policy.seed(profile.shares())
