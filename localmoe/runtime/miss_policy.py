"""What happens to an expert a layer needs that has no slot: the miss policies (`--miss-policy`), one
class each, in one table that the CLI, `tune` and the benchmarks read."""

from collections import Counter
from typing import ClassVar

from localmoe.runtime.cpu_experts import Bandwidths, experts_for_cpu
from localmoe.runtime.expert_cache import ExpertCache


class MissPolicy:
    """Copies every miss into a slot before the layer computes (the compute waits for it). Like every
    policy but `direct`, it reads each MoE layer's routing on the host before the layer's experts run:
    one device-to-host wait per layer, which keeps decode host-bound on a GPU."""

    name: ClassVar[str] = "copy"
    weighs_bandwidths: ClassVar[bool] = False  # needs the machine's copy and CPU bandwidths
    in_place: ClassVar[bool] = False  # misses read by the kernel where they lie, the routing learned later
    computes_on_cpu: ClassVar[bool] = False  # some misses computed by the CPU (`for_cpu` can answer any)
    prefetch: ClassVar[int] = 1  # MoE layers looked ahead by default: predicting needs the host mid-step

    def for_cpu(self, cache: ExpertCache, layer: int, need: Counter[int]) -> set[int]:
        """Of a layer visit's experts (expert -> tokens routed to it), those the CPU computes from the
        host store instead: misses only, since an expert in a slot, or on its way there, is used from
        the device."""
        return set()

    def __str__(self) -> str:
        return self.name


class Direct(MissPolicy):
    """Misses are read by the kernel where they lie, in the host store (pinned memory over the bus on
    CUDA), in the same launch as the hits: no layer waits for the host. The cache learns the routing one
    step later and admits the misses its policy ranks above their victims. Needs a host store that can be
    read in place: rows in RAM, pinned for CUDA."""

    name = "direct"
    in_place = True
    prefetch = 0  # no host decision in the middle of a step to prefetch with: misses are admitted a step later


class OnCpu(MissPolicy):
    """Computes every miss on the CPU, from the host store, and caches none of them."""

    name = "cpu"
    computes_on_cpu = True

    def for_cpu(self, cache: ExpertCache, layer: int, need: Counter[int]) -> set[int]:
        return {expert for expert in need if (layer, expert) not in cache}


class Auto(MissPolicy):
    """Sends each miss where it would be done first, copied or on the CPU, as the measured bandwidths say."""

    name = "auto"
    computes_on_cpu = True
    weighs_bandwidths = True

    def __init__(self, bandwidths: Bandwidths):
        self.bandwidths = bandwidths

    def for_cpu(self, cache: ExpertCache, layer: int, need: Counter[int]) -> set[int]:
        misses = {expert: tokens for expert, tokens in need.items() if (layer, expert) not in cache}
        return experts_for_cpu(misses, cache.store.expert_bytes, self.bandwidths)


class Bypass(MissPolicy):
    """Computes on the CPU the misses the cache policy would not admit (see `ExpertCache.bypassed`)."""

    name = "bypass"
    computes_on_cpu = True

    def for_cpu(self, cache: ExpertCache, layer: int, need: Counter[int]) -> set[int]:
        return cache.bypassed(layer, list(need))


MISS_POLICIES: dict[str, type[MissPolicy]] = {
    policy.name: policy for policy in (Direct, MissPolicy, OnCpu, Auto, Bypass)
}
DEFAULT, FALLBACK = "direct", "copy"  # the fallback where the host store cannot be read in place


def miss_policy(name: str, bandwidths: Bandwidths | None = None) -> MissPolicy:
    """The miss policy called `name`; `bandwidths` for the one that weighs them."""
    kind = MISS_POLICIES[name]
    if kind.weighs_bandwidths:
        if bandwidths is None:
            raise ValueError(f"the {name} miss policy needs the bandwidths it weighs")
        return kind(bandwidths)
    return kind()
