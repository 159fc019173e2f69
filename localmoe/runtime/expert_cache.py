"""The device tier: one pool of expert slots shared by every layer, allocated once at start-up, and the
device-side table the kernels look slots up in.

Accounting, per layer: every distinct expert a layer visit needs is one use. A use is a hit when the
expert was already in a slot before anything was done for this use, and a miss when it had to be
copied for it, whether on demand (the compute waits) or by a prefetch that arrived ahead of time
(`prefetch_used`). A prefetch whose expert is not needed at the visit it was made for is wasted. A use
the kernel read where it lies, in the host store (the direct miss policy), is `direct`; one the miss
policy computed on the CPU is `on_cpu`: neither copies anything for the use. A miss read in place may be
admitted afterwards, for later uses (`admissions`). So hits + misses + direct + on_cpu = uses, bytes
copied = (misses + prefetch_wasted + warmup_copies + admissions) x expert bytes, and bytes read in place
= direct x expert bytes.
"""

import heapq
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch

from localmoe.runtime.expert_store import ExpertStore
from localmoe.runtime.prefetch import Copies

Key = tuple[int, int]  # (layer, expert)


@dataclass
class CacheCounters:
    uses: int = 0
    hits: int = 0
    misses: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    warmup_copies: int = 0  # experts copied in to be pinned (--pin-hot)
    bytes_copied: int = 0
    on_cpu: int = 0  # uses computed on the CPU from the host store
    cpu_seconds: float = 0.0
    direct: int = 0  # uses the kernel read where they lie, in the host store (over the bus on CUDA)
    bytes_direct: int = 0
    admissions: int = 0  # experts read in place, then copied into a slot for later uses
    evictions: int = 0  # experts dropped to make room

    def copy(self) -> "CacheCounters":
        return replace(self)

    def __iadd__(self, other: "CacheCounters") -> "CacheCounters":
        for name in (f.name for f in fields(self)):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    @property
    def hit_rate(self) -> float:
        return self.hits / self.uses if self.uses else 0.0

    @property
    def loaded(self) -> int:
        """Uses served from outside the slots: copied in, read in place or computed on the CPU."""
        return self.uses - self.hits


def passed_over(key: Key, skip: Callable[[Key], bool], layers: set[int] | None) -> bool:
    """Whether a policy must pass over `key`: the cache's rule says so, or it is outside `layers`."""
    return (layers is not None and key[0] not in layers) or skip(key)


class CachePolicy:
    """What the cache asks of an eviction policy: `added`, `used` and `removed` keep it told about the pool,
    `victim` names the expert to evict. The optional hooks do nothing here: `visit` sees each layer visit's
    routing (with the router's probabilities of every expert where `weighs_router`), `seed` takes a routing
    profile's shares as a prior, and `rank` orders experts for admission where `ranks` (without an order,
    every miss is admitted)."""

    weighs_router = False
    ranks = False

    def added(self, key: Key) -> None:
        raise NotImplementedError

    def used(self, key: Key) -> None:
        raise NotImplementedError

    def removed(self, key: Key) -> None:
        raise NotImplementedError

    def victim(self, skip: Callable[[Key], bool], layers: set[int] | None = None) -> Key | None:
        raise NotImplementedError

    def visit(self, layer: int, routed: Counter[int], probabilities: dict[int, float]) -> None:
        pass

    def seed(self, shares: dict[Key, float]) -> None:
        pass

    def rank(self, key: Key) -> float:
        """The higher, the more an expert deserves a slot (where `ranks`)."""
        return 0.0


class LRU(CachePolicy):
    """Evict the expert used least recently."""

    def __init__(self):
        self._order: OrderedDict[Key, None] = OrderedDict()

    def added(self, key: Key) -> None:
        self.used(key)

    def used(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def removed(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, skip: Callable[[Key], bool], layers: set[int] | None = None) -> Key | None:
        return next((key for key in self._order if not passed_over(key, skip, layers)), None)


class LFU(CachePolicy):
    """Evict the expert used least often (ties: least recently), with aging: every `half_life` uses
    all counts halve, so experts that were popular long ago do not stay forever.

    Counts are kept for every expert seen, not only cached ones, so an expert that returns keeps its
    history. A heap with lazy deletion finds the victim without scanning the pool.
    """

    def __init__(self, half_life: int = 1024):
        self.half_life = half_life
        self._count: Counter[Key] = Counter()
        self._last: dict[Key, int] = {}  # cached keys -> tick of their last use
        self._heap: list[tuple[int, int, Key]] = []
        self._tick = 0
        self._uses = 0

    def added(self, key: Key) -> None:
        self._touch(key)

    def used(self, key: Key) -> None:
        self._count[key] += 1
        self._uses += 1
        if self._uses % self.half_life == 0:
            self._age()
        self._touch(key)

    def removed(self, key: Key) -> None:
        self._last.pop(key, None)

    def victim(self, skip: Callable[[Key], bool], layers: set[int] | None = None) -> Key | None:
        skipped, found = [], None
        while self._heap:
            entry = heapq.heappop(self._heap)
            count, tick, key = entry
            if self._last.get(key) != tick or self._count[key] != count:
                continue  # stale: the key was used again, aged or evicted since this entry
            if passed_over(key, skip, layers):
                skipped.append(entry)
                continue
            found = key
            break
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return found

    def _touch(self, key: Key) -> None:
        self._tick += 1
        self._last[key] = self._tick
        heapq.heappush(self._heap, (self._count[key], self._tick, key))
        if len(self._heap) > 4 * len(self._last) + 64:
            self._rebuild()

    def _age(self) -> None:
        for key in self._count:
            self._count[key] //= 2
        self._rebuild()

    def _rebuild(self) -> None:
        self._heap = [(self._count[key], tick, key) for key, tick in self._last.items()]
        heapq.heapify(self._heap)


class Score(CachePolicy):
    """Evict the expert of lowest score. Each visit of a layer decays its experts' scores by `decay`
    and adds to each the tokens routed to it plus the router probability it got, summed over the
    visit's tokens, from every expert the router scored, chosen or not (the probability breaks ties
    among experts no token chose and lifts those that nearly were). A routing profile adds a prior:
    `prior_weight` visits' worth of each expert's share of tokens in earlier runs.

    Scores are kept as one list per layer, decayed in a single pass per visit, and the victim is
    searched among the candidate layers' cached experts only: with quotas, one layer's share.
    """

    weighs_router = True  # the runtime gives `visit` the router's probabilities of every expert
    ranks = True

    def __init__(self, decay: float = 0.99, prior_weight: float = 20.0):
        self.decay, self.prior_weight = decay, prior_weight
        self._scores: dict[int, list[float]] = {}
        self._prior: dict[Key, float] = {}
        self._cached: dict[int, set[int]] = {}

    def added(self, key: Key) -> None:
        self._cached.setdefault(key[0], set()).add(key[1])

    def used(self, key: Key) -> None:
        pass  # what `visit` is given counts, not the cache's own uses

    def removed(self, key: Key) -> None:
        self._cached.get(key[0], set()).discard(key[1])

    def visit(self, layer: int, routed: Counter[int], probabilities: dict[int, float]) -> None:
        row = self._scores.setdefault(layer, [])
        row[:] = [value * self.decay for value in row]
        for gains in (routed, probabilities):
            for expert, gain in gains.items():
                if expert >= len(row):
                    row.extend([0.0] * (expert + 1 - len(row)))
                row[expert] += gain

    def seed(self, shares: dict[Key, float]) -> None:
        """Earlier runs' share of tokens routed to each expert (a routing profile), as the prior."""
        self._prior = {key: self.prior_weight * share for key, share in shares.items()}

    def rank(self, key: Key) -> float:
        """What bypass admission compares: the higher, the more an expert deserves a slot."""
        row = self._scores.get(key[0], ())
        return (row[key[1]] if key[1] < len(row) else 0.0) + self._prior.get(key, 0.0)

    def victim(self, skip: Callable[[Key], bool], layers: set[int] | None = None) -> Key | None:
        among = self._cached if layers is None else layers
        candidates = ((layer, expert) for layer in among for expert in self._cached.get(layer, ()))
        return min((key for key in candidates if not skip(key)), key=self.rank, default=None)


POLICIES: dict[str, type[CachePolicy]] = {"lru": LRU, "lfu": LFU, "score": Score}


class SlotTable:
    """Where each expert is on the device: int32 [MoE layers, experts], a slot or -1. The kernels map a
    layer's routed ids through their row, so hits and misses are told apart on the device."""

    def __init__(self, layers: list[int], experts: int, device: torch.device):
        self.index = {layer: i for i, layer in enumerate(layers)}
        self.slots = torch.full((len(layers), experts), -1, dtype=torch.int32, device=device)

    def row(self, layer: int) -> torch.Tensor:
        return self.slots[self.index[layer]]

    def set(self, key: Key, slot: int) -> None:
        """Write one entry, on the current stream (no host sync)."""
        self.slots[self.index[key[0]], key[1]] = slot


@dataclass
class Visit:
    """A layer visit as the device made it, told to the cache afterwards (the direct miss policy): the
    tokens routed to each expert, the router's probabilities summed over them (where weighed), and the
    experts the kernel found in a slot."""

    layer: int
    routed: Counter[int]
    probabilities: dict[int, float] | None
    found: set[int] = field(default_factory=set)


class ExpertCache:
    """Maps (layer, expert) to slots of a fixed pool; copies experts in from the store on demand,
    ahead of time (prefetch) or to pin them; evicts by policy.

    A slot is never taken from an expert the current layer is using (`acquire` .. `release`) or that
    is pinned. A prefetch or an admission also never takes one from another prefetch that has not been
    used yet, nor one whose copy has not landed; a demand copy does so only when no other slot can be
    freed, since the compute cannot go on without it.

    With a `table`, the device's view follows: a copy writes the expert's entry on the copy stream once
    its bytes have landed, so a kernel reading the table concurrently sees -1 or a complete slot; an
    eviction writes -1 on the compute stream, after every kernel queued so far (and after the slot's
    own copy, should it still be on its way, so that no late entry outlives it), and the next copy
    into the slot waits for that point. No kernel can then read a slot while it is overwritten.

    With `layers` (the number of MoE layers sharing the pool), each layer has a quota of an equal
    share of the unpinned slots: a layer at its quota evicts its own experts, one below it evicts from
    the layers above theirs. A layer may go over while slots are free or when a long prefill needs
    more experts at once; it gives them back first. On real routing, quotas beat one freely shared
    pool for every policy (docs/benchmarks.md): one layer's burst cannot flush the others' experts.
    """

    def __init__(
        self,
        store: ExpertStore,
        slots: int,
        device: torch.device,
        policy: str | CachePolicy,
        layers: int | None = None,
        table: SlotTable | None = None,
    ):
        """`policy`: a name from POLICIES, or a policy object (the simulator passes Belady's). `layers`:
        the number of MoE layers sharing the pool, for quotas (None: one pool shared freely). `table`:
        the device-side table to keep (none in the simulator)."""
        self.store = store
        self.rows = torch.empty(slots, store.layout.numel, dtype=store.row_dtype, device=device)
        self.gate_up = store.layout.gate_up(self.rows)
        self.down = store.layout.down(self.rows)
        self.biases = store.layout.biases(self.rows)
        self.copies = Copies(device, slots)
        self.policy = POLICIES[policy]() if isinstance(policy, str) else policy
        self.slot_of: dict[Key, int] = {}
        self.slots = slots  # in use, at most the rows allocated (see `resize`)
        self.layers = layers
        self.table = table
        self._held: Counter[int] = Counter()  # unpinned experts in slots, per layer
        self._free = list(reversed(range(slots)))
        self.pinned: set[Key] = set()
        self._in_use: set[Key] = set()
        self._fresh: dict[Key, None] = {}  # prefetched and not used yet
        self.counters: dict[int, CacheCounters] = {}
        self.token_counts: Counter[Key] = Counter()  # tokens routed to each expert: what --pin-hot ranks by

    def resize(self, slots: int) -> None:
        """Use `slots` of the rows allocated at start-up: growing frees more, shrinking evicts what the
        dropped rows hold (pinned experts included). Nothing is allocated or freed."""
        if not 1 <= slots <= self.rows.shape[0]:
            raise ValueError(f"the pool has {self.rows.shape[0]} rows; {slots} slots do not fit")
        for key, slot in list(self.slot_of.items()):
            if slot >= slots:
                self._evict(key)
        self._free = [slot for slot in self._free if slot < slots] + list(range(self.slots, slots))[::-1]
        self.slots = slots

    def clear(self, policy=None) -> None:
        """Empty the pool and forget counters and history, optionally switching policy."""
        for key in list(self.slot_of):
            self._evict(key)
        self._free = list(reversed(range(self.slots)))
        self.pinned.clear()
        self.counters.clear()
        self.token_counts.clear()
        self.policy = POLICIES[policy]() if isinstance(policy, str) else (policy or type(self.policy)())

    @property
    def capacity(self) -> int:
        """Slots a layer can use at once: all but the pinned ones."""
        return self.slots - len(self.pinned)

    @property
    def quota(self) -> int | None:
        return self.capacity // self.layers if self.layers else None

    def __contains__(self, key: Key) -> bool:
        return key in self.slot_of

    def totals(self) -> CacheCounters:
        total = CacheCounters()
        for counters in self.counters.values():
            total += counters
        return total

    def begin_layer(self, layer: int, routed: Counter[int], probabilities: dict[int, float] | None = None) -> None:
        """Start a layer visit whose tokens were routed to these experts (expert -> tokens): count them
        for --pin-hot, show the visit to a policy that weighs visits (with the router's `probabilities`,
        expert -> summed over the tokens, where known), and settle the prefetches made for this visit
        (those it does not need were wasted).

        Also forget what the previous visit held in use: only one layer computes at a time, and a
        visit cut short (Ctrl-C in a chat) must not leave its experts protected for good.
        """
        self._in_use.clear()
        self.token_counts.update({(layer, expert): n for expert, n in routed.items()})
        self.policy.visit(layer, routed, probabilities or {})
        needed = set(routed)
        for key in [key for key in self._fresh if key[0] == layer and key[1] not in needed]:
            del self._fresh[key]
            self._layer(layer).prefetch_wasted += 1

    def acquire(self, layer: int, experts: list[int]) -> list[int]:
        """Slots holding these experts, copying in the missing ones; they stay put until `release`."""
        keys = [(layer, expert) for expert in experts]
        self._in_use.update(keys)
        counters = self._layer(layer)
        for key in keys:
            counters.uses += 1
            if key in self._fresh:
                del self._fresh[key]
                counters.misses += 1
                counters.prefetch_used += 1
            elif key in self.slot_of:
                counters.hits += 1
            else:
                counters.misses += 1
                self._load(key, self._take_slot(layer, for_prefetch=False))
            if key not in self.pinned:  # pinned experts are outside the policy: never its victims
                self.policy.used(key)
        return [self.slot_of[key] for key in keys]

    def bypassed(self, layer: int, experts: list[int]) -> set[int]:
        """Of a layer visit's experts, the misses the policy would not admit (bypass admission): each
        miss, best ranked first, takes a free slot, or else the slot of the victim it would evict if
        the policy ranks it above that victim. Policies without a `rank` (LRU, LFU) admit every miss."""
        if not self.policy.ranks:
            return set()
        misses = [expert for expert in experts if (layer, expert) not in self.slot_of]
        needed = {(layer, expert) for expert in experts}
        free, displaced, refused = len(self._free), set(), set()
        for expert in sorted(misses, key=lambda e: self.policy.rank((layer, e)), reverse=True):
            if free:
                free -= 1
                continue
            victim = self._victim(layer, lambda k: self._kept(k, demand=False) or k in needed or k in displaced)
            if victim is not None and self.policy.rank((layer, expert)) > self.policy.rank(victim):
                displaced.add(victim)
            else:
                refused.add(expert)
        return refused

    def record_step(self, visits: list[Visit]) -> None:
        """A step's layer visits whose misses the kernel read where they lay, told after the step: count
        each visit's uses (hits, and misses read in place), show it to the policy, then admit each visit's
        misses that the policy ranks above the expert they would evict (every miss, for a policy that does
        not rank), layer by layer, in rank order. An admitted expert serves from its slot once its copy
        has landed; until then the kernel keeps reading it in place."""
        for visit in visits:
            self.begin_layer(visit.layer, visit.routed, visit.probabilities)
            counters = self._layer(visit.layer)
            missed = set(visit.routed) - visit.found
            counters.uses += len(visit.routed)
            counters.hits += len(visit.found)
            counters.direct += len(missed)
            counters.bytes_direct += len(missed) * self.store.expert_bytes
            for expert in visit.found:
                key = (visit.layer, expert)
                if key in self.slot_of and key not in self.pinned:
                    self.policy.used(key)
        for visit in visits:
            self.admit(visit.layer, list(set(visit.routed) - visit.found), set(visit.routed))

    def admit(self, layer: int, misses: list[int], needed: set[int]) -> None:
        """Copy in the `misses` of a layer visit the policy admits, best ranked first, keeping the visit's
        `needed` experts; those that find no slot to take stay out."""
        self._in_use = {(layer, expert) for expert in needed}
        refused = self.bypassed(layer, list(needed))
        ranked = sorted(misses, key=lambda e: self.policy.rank((layer, e)), reverse=True)
        for expert in ranked:
            key = (layer, expert)
            if expert in refused or key in self.slot_of:
                continue
            slot = self._take_slot(layer, for_prefetch=True)
            if slot is None:
                break
            self._load(key, slot, urgent=False)
            self._layer(layer).admissions += 1
        self._in_use = set()

    def computed_on_cpu(self, layer: int, experts: int, seconds: float) -> None:
        """Count uses that the CPU computed from the host store: nothing was copied or cached for them."""
        counters = self._layer(layer)
        counters.uses += experts
        counters.on_cpu += experts
        counters.cpu_seconds += seconds

    def release(self, layer: int, experts: list[int]) -> None:
        self._in_use.difference_update((layer, expert) for expert in experts)

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Start copying experts a coming layer is predicted to need; stop at the first that finds no slot."""
        for expert in experts:
            key = (layer, expert)
            if key in self.slot_of:
                continue
            slot = self._take_slot(layer, for_prefetch=True)
            if slot is None:
                return
            self._load(key, slot, urgent=False)
            self._fresh[key] = None
            self._layer(layer).prefetch_issued += 1

    def warm(self, keys: list[Key]) -> None:
        """Copy in these experts (a routing profile's hottest, best first) into free slots, each layer
        up to its quota."""
        for key in keys:
            if not self._free:
                return
            if key not in self.slot_of and (self.quota is None or self._held[key[0]] < self.quota):
                self._load(key, self._free.pop(), urgent=False)
                self._layer(key[0]).warmup_copies += 1

    def pin(self, keys: list[Key]) -> None:
        """Keep these experts resident for good; at least one layer's worth of slots must stay free."""
        for key in keys:
            if key in self.pinned:
                continue
            if key not in self.slot_of:
                self._load(key, self._take_slot(key[0], for_prefetch=False))
                self._layer(key[0]).warmup_copies += 1
            self._held[key[0]] -= 1
            self._fresh.pop(key, None)
            self.pinned.add(key)
            self.policy.removed(key)

    def _layer(self, layer: int) -> CacheCounters:
        return self.counters.setdefault(layer, CacheCounters())

    def _take_slot(self, layer: int, for_prefetch: bool) -> int | None:
        """A slot for an expert of `layer`: a free one, else a victim's."""
        if self._free:
            return self._free.pop()
        key = self._victim(layer, lambda k: self._kept(k, demand=False))
        if key is None and not for_prefetch:
            # A demand copy cannot wait: take a prefetched or still arriving expert's slot when nothing
            # else is free.
            key = self._victim(layer, lambda k: self._kept(k, demand=True))
        if key is None:
            if for_prefetch:
                return None
            raise RuntimeError("expert cache: no slot can be freed for a demand copy (pool smaller than planned)")
        self._layer(key[0]).evictions += 1
        return self._evict(key)

    def _kept(self, key: Key, demand: bool) -> bool:
        """Whether `key` may not be evicted now: in use by the current visit; and, unless for a demand
        copy, prefetched and not used yet or still on its way to its slot."""
        if key in self._in_use:
            return True
        return not demand and (key in self._fresh or not self.copies.landed(self.slot_of[key]))

    def _victim(self, layer: int, skip: Callable[[Key], bool]) -> Key | None:
        """The policy's victim, taken first from the layers quotas say should give a slot up."""
        if self.quota is not None:
            held = self._held
            over = {layer} if held[layer] >= self.quota else {other for other, n in held.items() if n > self.quota}
            if key := self.policy.victim(skip, over):
                return key
        return self.policy.victim(skip)

    def _evict(self, key: Key) -> int:
        """Drop `key` from the pool; its slot is the caller's to reuse."""
        if key in self._fresh:
            del self._fresh[key]
            self._layer(key[0]).prefetch_wasted += 1
        if key in self.pinned:
            self.pinned.discard(key)
        else:
            self._held[key[0]] -= 1
        self.policy.removed(key)
        slot = self.slot_of.pop(key)
        if self.table is not None:
            self.copies.after_copy(slot)  # its entry is written before it is cleared
            self.table.set(key, -1)
        self.copies.freed(slot)
        return slot

    def _load(self, key: Key, slot: int, urgent: bool = True) -> None:
        """Copy `key` into `slot` (`urgent`: a layer waits for it, ahead of speculative copies)."""
        publish = None if self.table is None else (lambda: self.table.set(key, slot))
        self.copies.copy(slot, lambda then: self.store.copy_to(self.rows[slot], *key, then), publish, urgent)
        self.slot_of[key] = slot
        self._held[key[0]] += 1
        self.policy.added(key)
        self._layer(key[0]).bytes_copied += self.store.expert_bytes
