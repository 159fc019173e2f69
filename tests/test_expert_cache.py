"""Eviction policies and the cache's slot rules, on a store of toy experts."""

from collections import Counter

import torch

from localmoe.runtime.expert_cache import LFU, LRU, ExpertCache
from localmoe.runtime.expert_store import ExpertLayout


class ToyStore:
    """Experts whose every weight equals a code of (layer, expert): a slot shows what it holds."""

    layout = ExpertLayout(hidden=2, intermediate=3)
    dtype = row_dtype = torch.float32
    expert_bytes = layout.numel * 4

    def copy_to(self, row, layer, expert):
        row.fill_(100 * layer + expert)


def cache(slots: int, policy: str = "lru") -> ExpertCache:
    return ExpertCache(ToyStore(), slots, torch.device("cpu"), policy)


def held(c: ExpertCache, layer: int, expert: int) -> bool:
    return (layer, expert) in c and bool((c.rows[c.slot_of[(layer, expert)]] == 100 * layer + expert).all())


def test_lru_evicts_least_recent_and_skips():
    policy = LRU()
    for key in [(0, 0), (0, 1), (0, 2)]:
        policy.added(key)
    policy.used((0, 0))
    assert policy.victim(lambda key: False) == (0, 1)
    assert policy.victim(lambda key: key == (0, 1)) == (0, 2)
    assert policy.victim(lambda key: True) is None


def test_lfu_evicts_least_frequent():
    policy = LFU()
    for key in [(0, 0), (0, 1), (0, 2)]:
        policy.added(key)
    for _ in range(3):
        policy.used((0, 0))
    policy.used((0, 1))
    assert policy.victim(lambda key: key == (0, 2)) == (0, 1)


def test_lfu_aging_lets_recent_use_outweigh_old_popularity():
    policy = LFU(half_life=8)
    old, recent, idle = (0, 0), (0, 1), (0, 2)
    for key in (old, recent, idle):
        policy.added(key)
    for _ in range(7):
        policy.used(old)
    for _ in range(5):  # the 8th use halves every count: old 7 -> 3, recent 1 -> 0, then 4 more
        policy.used(recent)
    # without aging, recent (5 uses) would go before old (7)
    assert policy.victim(lambda key: key == idle) == old


def test_acquire_copies_misses_and_counts():
    c = cache(3)
    assert c.acquire(0, [1, 2]) and held(c, 0, 1) and held(c, 0, 2)
    c.release(0, [1, 2])
    c.acquire(0, [2, 3])
    counters = c.counters[0]
    assert (counters.uses, counters.hits, counters.misses) == (4, 1, 3)
    assert counters.bytes_copied == 3 * ToyStore.expert_bytes


def test_demand_never_evicts_what_the_layer_is_using():
    c = cache(2)
    c.acquire(0, [0])
    c.acquire(0, [1])  # both in use: the pool is full
    c.release(0, [1])
    c.acquire(1, [5])
    assert held(c, 0, 0) and held(c, 1, 5) and (0, 1) not in c


def test_prefetch_skips_when_no_slot_is_free_of_current_work():
    c = cache(2)
    c.acquire(0, [0, 1])
    c.prefetch(1, [3])
    assert (1, 3) not in c and c.totals().prefetch_issued == 0


def test_prefetch_never_evicts_a_prefetch_and_waste_is_counted():
    c = cache(3)
    c.acquire(0, [0])
    c.prefetch(1, [4, 5, 6])  # room for two; the third would have to evict a fresh prefetch
    assert held(c, 1, 4) and held(c, 1, 5) and (1, 6) not in c
    c.release(0, [0])
    c.begin_layer(1, Counter({4: 1}))
    c.acquire(1, [4])
    counters = c.counters[1]
    assert (counters.prefetch_issued, counters.prefetch_used, counters.prefetch_wasted) == (2, 1, 1)
    assert counters.misses == 1 and counters.hits == 0


def test_pinned_experts_stay():
    c = cache(3)
    c.pin([(0, 7)])
    c.acquire(0, [7])  # using a pinned expert must not make it a victim again
    c.release(0, [7])
    for expert in range(6):
        c.acquire(1, [expert])
        c.release(1, [expert])
    assert held(c, 0, 7) and c.capacity == 2
    assert c.counters[0].warmup_copies == 1
