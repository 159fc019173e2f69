"""Eviction policies and the cache's slot rules, on a store of toy experts."""

from collections import Counter

import torch

from localmoe.runtime.expert_cache import LFU, LRU, ExpertCache, Score, SlotTable, Visit
from localmoe.runtime.layouts import ExpertLayout
from localmoe.runtime.prefetch import Copies


class ToyStore:
    """Experts whose every weight equals a code of (layer, expert): a slot shows what it holds."""

    layout = ExpertLayout(hidden=2, intermediate=3)
    dtype = row_dtype = torch.float32
    expert_bytes = layout.numel * 4

    def copy_to(self, row, layer, expert, then=None):
        row.fill_(100 * layer + expert)
        if then is not None:
            then()


def cache(slots: int, policy: str = "lru", layers: int | None = None) -> ExpertCache:
    return ExpertCache(ToyStore(), slots, torch.device("cpu"), policy, layers)


def visit(c: ExpertCache, layer: int, experts: list[int], probabilities: dict[int, float] | None = None) -> None:
    """One token's layer visit, as the runtime makes it."""
    c.begin_layer(layer, Counter(experts), probabilities)
    c.acquire(layer, experts)
    c.release(layer, experts)


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


def test_score_weighs_tokens_and_router_probability_and_decays():
    policy = Score(decay=0.5, prior_weight=0)
    for key in [(0, 0), (0, 1), (0, 2)]:
        policy.added(key)
    policy.visit(0, Counter({0: 1}), {0: 0.6, 1: 0.3, 2: 0.1})
    assert policy.victim(lambda key: False) == (0, 2)  # never chosen, least probability
    assert policy.rank((0, 0)) == 1.6
    policy.visit(0, Counter({2: 1}), {2: 0.9, 0: 0.1})
    assert policy.rank((0, 0)) == 0.5 * 1.6 + 0.1 and policy.rank((0, 1)) == 0.5 * 0.3
    assert policy.victim(lambda key: False) == (0, 1)
    policy.visit(1, Counter({3: 1}), {3: 1.0})  # another layer's visit decays nothing here
    assert policy.rank((0, 1)) == 0.5 * 0.3


def test_score_prior_lets_a_profiles_hot_expert_outrank_a_recent_cold_one():
    policy = Score(decay=0.9, prior_weight=20)
    policy.seed({(0, 5): 0.5})  # half the tokens of earlier runs chose it
    policy.visit(0, Counter({1: 1}), {1: 0.7})
    assert policy.rank((0, 5)) == 10 > policy.rank((0, 1))


def test_a_layer_at_its_quota_evicts_its_own_experts():
    c = cache(4, "lru", layers=2)
    visit(c, 0, [0, 1])
    visit(c, 1, [0, 1])
    visit(c, 0, [2])  # layer 1's experts are older, but layer 0 holds its quota of 2
    assert (0, 2) in c and (1, 0) in c and (1, 1) in c and (0, 0) not in c


def test_a_layer_below_its_quota_takes_a_slot_from_one_above():
    c = cache(4, "lru", layers=2)
    visit(c, 0, [0, 1, 2, 3])  # free slots: layer 0 may go over its quota of 2
    visit(c, 1, [0])
    visit(c, 0, [1, 2, 3])  # layer 0's least recent use, expert 0, is gone, not layer 1's
    visit(c, 1, [1])  # layer 1 is below its quota: it takes layer 0's least recent
    assert (1, 0) in c and (1, 1) in c and (0, 1) not in c and c.quota == 2


def test_shared_pool_evicts_across_layers():
    for layers, evicted in ((None, (1, 0)), (2, (0, 0))):
        c = cache(4, "lru", layers)
        visit(c, 0, [0, 1])
        visit(c, 1, [0, 1])
        visit(c, 0, [0, 1])
        visit(c, 0, [2])  # least recent: layer 1's expert 0, but with quotas layer 0 evicts its own
        assert evicted not in c and len(c.slot_of) == 4


def test_bypass_admits_a_miss_only_over_a_weaker_victim():
    c = cache(2, Score(decay=1.0, prior_weight=0))
    visit(c, 0, [0], {0: 1.0})
    assert c.bypassed(0, [1]) == set()  # a free slot: admitted
    visit(c, 0, [1], {1: 1.0})
    for _ in range(3):
        visit(c, 0, [0], {0: 1.0})
    c.begin_layer(0, Counter({2: 1}), {2: 1.0})
    assert c.bypassed(0, [2]) == {2}  # 2 scores 2: it would evict expert 1 (also 2), not above it
    c.begin_layer(0, Counter({2: 1}), {2: 1.0})
    assert c.bypassed(0, [2]) == set()  # now 4 against 2: worth the copy
    assert cache(1, "lru").bypassed(0, [3]) == set()  # recency has no rank: every miss is admitted


def test_warm_fills_free_slots_up_to_each_layers_quota():
    c = cache(4, "lru", layers=2)
    c.warm([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)])
    assert set(c.slot_of) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert c.totals().warmup_copies == 4
    visit(c, 0, [0, 1])
    assert c.counters[0].hits == 2


def test_resize_shrinks_evicting_the_dropped_rows_and_grows_back():
    c = cache(4, "lru", layers=2)
    visit(c, 0, [0, 1])
    visit(c, 1, [0, 1])
    c.resize(2)
    assert len(c.slot_of) == 2 and c.quota == 1 and all(slot < 2 for slot in c.slot_of.values())
    c.resize(4)
    visit(c, 0, [5, 6])
    visit(c, 1, [5])
    assert len(c.slot_of) == 4 and all(held(c, *key) for key in c.slot_of)


def test_the_device_table_follows_the_pool():
    c = ExpertCache(ToyStore(), 2, torch.device("cpu"), "lru", table=SlotTable([0, 3], 4, torch.device("cpu")))
    visit(c, 3, [1, 2])
    assert c.table.row(3).tolist() == [-1, c.slot_of[(3, 1)], c.slot_of[(3, 2)], -1]
    visit(c, 0, [0])  # evicts (3, 1), the least recent
    assert c.table.row(3)[1] == -1 and c.table.row(0)[0] == c.slot_of[(0, 0)]


class ArrivingCopies(Copies):
    """CPU copies whose slots in `arriving` have not landed yet."""

    arriving: set[int] = set()

    def landed(self, slot: int) -> bool:
        return slot not in self.arriving


def test_a_slot_whose_copy_has_not_landed_is_no_admissions_victim_but_a_demand_copy_may_take_it():
    c = cache(2)
    c.copies = ArrivingCopies(torch.device("cpu"), 2)
    visit(c, 0, [0])
    visit(c, 0, [1])
    c.copies.arriving = {c.slot_of[(0, 0)]}  # the least recent, still arriving
    c.record_step([Visit(0, Counter([2]), None)])  # admitting 2 must evict 1, not the arriving 0
    assert (0, 0) in c and (0, 2) in c and (0, 1) not in c
    c.copies.arriving = {c.slot_of[(0, 0)], c.slot_of[(0, 2)]}
    c.record_step([Visit(0, Counter([3]), None)])  # nothing landed to evict: 3 stays out
    assert (0, 3) not in c
    visit(c, 0, [3])  # a demand copy takes an arriving slot when nothing else can be freed
    assert held(c, 0, 3)


def test_a_step_learned_later_counts_hits_and_reads_in_place_and_admits_by_rank():
    c = cache(2, "score")
    c.record_step([Visit(0, Counter([0, 1]), {0: 0.5, 1: 0.5})])
    total = c.totals()
    assert (total.uses, total.hits, total.direct, total.admissions) == (2, 0, 2, 2)
    assert total.bytes_direct == 2 * ToyStore.expert_bytes == total.bytes_copied
    # a miss that ranks below both cached experts is read in place again and not admitted
    c.record_step([Visit(0, Counter([0, 1, 2]), {0: 0.4, 1: 0.4, 2: 0.2}, found={0, 1})])
    total = c.totals()
    assert (total.hits, total.direct, total.admissions) == (2, 3, 2) and (0, 2) not in c
    assert total.hits + total.misses + total.direct + total.on_cpu == total.uses
