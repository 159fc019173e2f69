"""What callers see of the expert cache: a snapshot of its slots and counters, and `--stats`'s table of the
counters per MoE layer and in all."""

from dataclasses import dataclass

from localmoe.runtime.expert_cache import CacheCounters, ExpertCache
from localmoe.runtime.memory import format_bytes

COLUMNS = ("uses", "hits", "misses", "in place", "on cpu", "hit rate", "prefetched", "used", "wasted", "admitted")
COLUMNS += ("evicted", "copied", "read in place")


@dataclass(frozen=True)
class CacheSnapshot:
    slots: int  # in use now
    allocated: int  # rows allocated at load: the most `slots` can grow to
    pinned: int
    total: CacheCounters
    per_layer: dict[int, CacheCounters]

    @classmethod
    def of(cls, cache: ExpertCache) -> "CacheSnapshot":
        per_layer = {layer: counters.copy() for layer, counters in sorted(cache.counters.items())}
        return cls(cache.slots, cache.rows.shape[0], len(cache.pinned), cache.totals(), per_layer)


def cache_report(cache: ExpertCache) -> str:
    rows = [(str(layer), cache.counters[layer]) for layer in sorted(cache.counters)]
    rows.append(("all", cache.totals()))
    lines = [f"{'layer':>5}  " + "  ".join(f"{name:>13}" for name in COLUMNS)]
    lines += [f"{name:>5}  " + "  ".join(f"{cell:>13}" for cell in _cells(counters)) for name, counters in rows]
    stall = cache.copies.stall_seconds()
    waited = "compute waited for copies" if cache.copies.cuda else "copying (synchronous on the CPU)"
    total = cache.totals()
    lines.append(
        f"{waited}: {stall:.3f} s; pinned experts: {len(cache.pinned)}; slots: {cache.slots} "
        f"(per layer: {cache.quota or 'shared'}); warm-up copies: {total.warmup_copies}"
    )
    if total.direct:
        lines.append(
            f"read where they lie (the host copy, over the bus on CUDA): {total.direct} expert uses, "
            f"{format_bytes(total.bytes_direct)}; admitted into slots afterwards: {total.admissions}"
        )
    if total.on_cpu:
        lines.append(
            f"computed on the CPU from the host store: {total.on_cpu} expert uses in {total.cpu_seconds:.3f} s"
        )
    return "\n".join(lines)


def _cells(c: CacheCounters) -> list[str]:
    return [
        str(c.uses),
        str(c.hits),
        str(c.misses),
        str(c.direct),
        str(c.on_cpu),
        f"{c.hit_rate:.3f}",
        str(c.prefetch_issued),
        str(c.prefetch_used),
        str(c.prefetch_wasted),
        str(c.admissions),
        str(c.evictions),
        format_bytes(c.bytes_copied),
        format_bytes(c.bytes_direct),
    ]
