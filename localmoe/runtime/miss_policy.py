"""What happens to an expert a layer needs that has no slot: the miss policies (`--miss-policy`), one
class each, in one table that the CLI, `tune` and the benchmarks read."""

from collections import Counter
from typing import ClassVar

from localmoe.runtime.cpu_experts import Bandwidths, experts_for_cpu
from localmoe.runtime.expert_cache import ExpertCache


class MissPolicy:
    """Copies every miss into a slot before the layer computes (the compute waits for it)."""

    name: ClassVar[str] = "copy"
    weighs_bandwidths: ClassVar[bool] = False  # needs the machine's copy and CPU bandwidths

    def for_cpu(self, cache: ExpertCache, layer: int, need: Counter[int]) -> set[int]:
        """Of a layer visit's experts (expert -> tokens routed to it), those the CPU computes from the
        host store instead: misses only, since an expert in a slot, or on its way there, is used from
        the device."""
        return set()

    def __str__(self) -> str:
        return self.name


class OnCpu(MissPolicy):
    """Computes every miss on the CPU, from the host store, and caches none of them."""

    name = "cpu"

    def for_cpu(self, cache: ExpertCache, layer: int, need: Counter[int]) -> set[int]:
        return {expert for expert in need if (layer, expert) not in cache}


class Auto(MissPolicy):
    """Sends each miss where it would be done first, copied or on the CPU, as the measured bandwidths say."""

    name = "auto"
    weighs_bandwidths = True

    def __init__(self, bandwidths: Bandwidths):
        self.bandwidths = bandwidths

    def for_cpu(self, cache: ExpertCache, layer: int, need: Counter[int]) -> set[int]:
        misses = {expert: tokens for expert, tokens in need.items() if (layer, expert) not in cache}
        return experts_for_cpu(misses, cache.store.expert_bytes, self.bandwidths)


class Bypass(MissPolicy):
    """Computes on the CPU the misses the cache policy would not admit (see `ExpertCache.bypassed`)."""

    name = "bypass"

    def for_cpu(self, cache: ExpertCache, layer: int, need: Counter[int]) -> set[int]:
        return cache.bypassed(layer, list(need))


MISS_POLICIES: dict[str, type[MissPolicy]] = {policy.name: policy for policy in (Auto, MissPolicy, OnCpu, Bypass)}


def miss_policy(name: str, bandwidths: Bandwidths | None = None) -> MissPolicy:
    """The miss policy called `name`; `bandwidths` for the one that weighs them."""
    kind = MISS_POLICIES[name]
    if kind.weighs_bandwidths:
        if bandwidths is None:
            raise ValueError(f"the {name} miss policy needs the bandwidths it weighs")
        return kind(bandwidths)
    return kind()
