"""Replaying routing traces through the expert cache's own code, to compare policies and slot counts
without a model or a GPU, against offline bounds.

The replay drives the same `ExpertCache` the runtime uses (with a store of one-number experts), so the
counters it reports are the ones a run would report for the same routing.
"""

import bisect
import csv
import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import torch

from localmoe.errors import LocalMoEError
from localmoe.runtime.expert_cache import CacheCounters, CachePolicy, ExpertCache, Key, Visit, passed_over
from localmoe.runtime.layouts import ExpertLayout
from localmoe.runtime.profile import RoutingProfile, start_from_profile


@dataclass
class Trace:
    """Routing by request, token and MoE layer: `requests[r][t][i]` lists the experts token t of request r
    chose at MoE layer `layers[i]`. `predicted`, where the run recorded it, has the same shape and lists
    the experts predicted at that layer for the next MoE layer (what prefetch copied). `probabilities`,
    where known, has the same shape and maps experts to the router probability they got (all experts
    for a run's own trace, the chosen ones for a trace that kept only their weights)."""

    requests: list[list[list[list[int]]]]
    layers: list[int]
    num_experts: int
    predicted: list[list[list[list[int]]]] | None = None
    probabilities: list[list[list[dict[int, float]]]] | None = None

    @property
    def tokens(self) -> int:
        return sum(len(request) for request in self.requests)

    @property
    def top_k(self) -> int:
        return len(self.requests[0][0][0])

    def visits(self) -> list[list[Key]]:
        """The (layer, expert) uses of every layer visit, in the order a run makes them (a choice of no
        expert, -1, uses none: LongCat-Flash's identity experts)."""
        return [
            [(layer, expert) for expert in experts if expert >= 0]
            for request in self.requests
            for token in request
            for layer, experts in zip(self.layers, token, strict=True)
        ]

    def uses(self) -> list[Key]:
        """Every (layer, expert) use, in the order a run makes them."""
        return [key for visit in self.visits() for key in visit]

    def request(self, r: int) -> "Trace":
        """Request `r` alone."""

        def one(rows):
            return None if rows is None else [rows[r]]

        return Trace([self.requests[r]], self.layers, self.num_experts, one(self.predicted), one(self.probabilities))


@dataclass
class Replay:
    counters: CacheCounters
    tokens: int
    expert_bytes: int = 1
    per_layer: dict[int, CacheCounters] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.counters.hit_rate

    @property
    def bytes_per_token(self) -> float:
        c = self.counters
        return (c.misses + c.prefetch_wasted + c.warmup_copies + c.admissions) * self.expert_bytes / self.tokens

    @property
    def prefetch_precision(self) -> float:
        """Of the experts prefetched, the share the layer then used."""
        c = self.counters
        return c.prefetch_used / c.prefetch_issued if c.prefetch_issued else 0.0

    @property
    def prefetch_recall(self) -> float:
        """Of the misses, the share a prefetch had already brought in."""
        c = self.counters
        return c.prefetch_used / c.misses if c.misses else 0.0


class Belady(CachePolicy):
    """Offline optimal replacement for a known sequence of layer visits, for a cache that copies every
    miss: evict the cached expert needed again furthest in the future. It follows the cache's policy
    interface, so the cache's own rules (what the current layer uses is never evicted) bound it as they
    bind others."""

    def __init__(self, visits: list[list[Key]]):
        self._visits = visits
        self._starts = list(accumulate((len(visit) for visit in visits), initial=0))
        self._uses: dict[Key, list[int]] = defaultdict(list)
        for time, key in enumerate(key for visit in visits for key in visit):
            self._uses[key].append(time)
        self._visit = -1
        self._cached: set[Key] = set()

    def visit(self, layer: int, routed: Counter[int], probabilities: dict[int, float]) -> None:
        self._visit += 1
        if self._visit >= len(self._visits) or self._visits[self._visit][0][0] != layer:
            raise ValueError("Belady was given layer visits in another order than its sequence")

    def added(self, key: Key) -> None:
        self._cached.add(key)

    def used(self, key: Key) -> None:
        if key not in self._visits[self._visit]:
            raise ValueError(f"Belady was given a use of {key} that its sequence does not have here")

    def removed(self, key: Key) -> None:
        self._cached.discard(key)

    def victim(self, skip, layers: set[int] | None = None) -> Key | None:
        candidates = [key for key in self._cached if not passed_over(key, skip, layers)]
        return min(candidates, key=self._next_use, default=None)

    def _next_use(self, key: Key) -> float:
        """Minus the expert's next use after the visit under way: the sooner, the higher."""
        uses = self._uses[key]
        i = bisect.bisect_left(uses, self._starts[self._visit + 1])
        return -uses[i] if i < len(uses) else float("-inf")


def belady_uncached(trace: Trace, slots: int) -> Replay:
    """The offline optimum of one pool of `slots` experts that may leave a miss uncached (computed on the
    CPU or read where it lies) and decides what to keep once each token's step is over, as the direct
    miss policy does: at each miss, of the pooled experts and the miss, the one needed again furthest
    ahead stays out.

    Hits depend only on what the pool holds as a step begins, and after it the pool may hold any of what
    it held and what the step used, so farthest-in-future counted in steps is optimal (which of two
    experts needed by the same later step stays makes no difference: that step may keep either). It
    bounds every policy the cache runs: those that copy or bypass decide within the step, and keep a
    visit's experts in place while it runs. Misses are the uncached uses that took a slot (copies)."""
    steps = [
        [(layer, e) for layer, experts in zip(trace.layers, token, strict=True) for e in experts if e >= 0]
        for request in trace.requests
        for token in request
    ]
    uses: dict[Key, list[int]] = defaultdict(list)
    for time, step in enumerate(steps):
        for key in step:
            uses[key].append(time)

    def next_use(key: Key, time: int) -> float:
        later = uses[key]
        i = bisect.bisect_right(later, time)
        return later[i] if i < len(later) else float("inf")

    pool: dict[Key, float] = {}  # key -> its next use
    furthest: list[tuple[float, Key]] = []  # a max-heap of (-next use, key), stale entries skipped
    per_layer: dict[int, CacheCounters] = defaultdict(CacheCounters)
    for time, step in enumerate(steps):
        for key in step:
            per_layer[key[0]].uses += 1
            if key in pool:
                per_layer[key[0]].hits += 1
                pool[key] = next_use(key, time)
                heapq.heappush(furthest, (-pool[key], key))
        for when, key in sorted((next_use(k, time), k) for k in step if k not in pool):
            counters = per_layer[key[0]]
            if len(pool) >= slots:
                while -furthest[0][0] != pool.get(furthest[0][1]):
                    heapq.heappop(furthest)
                if -furthest[0][0] <= when:
                    counters.on_cpu += 1
                    continue
                _, victim = heapq.heappop(furthest)
                del pool[victim]
                counters.evictions += 1
            elif when == float("inf"):
                counters.on_cpu += 1  # never needed again: not worth a copy
                continue
            pool[key] = when
            heapq.heappush(furthest, (-when, key))
            counters.misses += 1
            counters.bytes_copied += 1
    total = CacheCounters()
    for counters in per_layer.values():
        total += counters
    return Replay(total, trace.tokens, per_layer=dict(per_layer))


class _OneNumberStore:
    """A store whose experts are one number each: the replay exercises the cache, not the copies."""

    layout = ExpertLayout(hidden=1, intermediate=1)
    dtype = row_dtype = torch.float32
    expert_bytes = 1

    def copy_to(self, row: torch.Tensor, layer: int, expert: int, then=None) -> None:
        row.fill_(expert)
        if then is not None:
            then()


def replay(
    trace: Trace,
    slots: int,
    policy: str | Callable[[], object],
    prefetch: bool = False,
    pin_hot: int = 0,
    miss: str = "copy",
    shared: bool = False,
    profile: RoutingProfile | None = None,
) -> Replay:
    """Run the trace through an `ExpertCache` of `slots` slots, as the runtime does: with a quota per
    layer, or with `shared`, one pool shared freely.

    `policy` is a cache policy name, "belady", or a function making a policy (`Score` with another
    decay, say); "belady" with a miss policy other than "copy" is `belady_uncached`'s bound. With
    `prefetch`, the experts the trace records as predicted for the next layer are prefetched after each
    layer, as the runtime does. With `pin_hot`, the first request is the warm-up whose hottest experts
    get pinned, as `--pin-hot` does. `miss` says what a miss does, as `--miss-policy`: "copy" (copied
    before use), "bypass" (the misses the policy does not admit computed on the CPU), or "direct" (read
    where it lies, and once the token is over, admitted where the policy ranks it above its victim: the
    rule the runtime follows a step behind).
    With a routing `profile`, the cache starts from it as a run with `--profile` does.
    """
    if prefetch and trace.predicted is None:
        raise LocalMoEError("this trace has no predictions of the next layer's experts: replay it without prefetch")
    if prefetch and miss == "direct":
        raise LocalMoEError("the direct miss policy admits misses a token later; it does not prefetch")
    if policy == "belady" and (prefetch or pin_hot or profile):
        raise LocalMoEError("Belady's bound is computed without prefetch, pinning or a profile")
    if policy == "belady" and miss != "copy":
        if not shared:
            raise LocalMoEError("Belady's bound for misses left uncached is one shared pool's: replay it with shared")
        return belady_uncached(trace, slots)
    chosen = Belady(trace.visits()) if policy == "belady" else policy if isinstance(policy, str) else policy()
    cache = ExpertCache(_OneNumberStore(), slots, torch.device("cpu"), chosen, None if shared else len(trace.layers))
    if profile:
        start_from_profile(cache, profile)
    for r, request in enumerate(trace.requests):
        for t, token in enumerate(request):
            visits = []
            for i, (layer, experts) in enumerate(zip(trace.layers, token, strict=True)):
                experts = [expert for expert in experts if expert >= 0]  # -1: no expert (an identity)
                probabilities = trace.probabilities[r][t][i] if trace.probabilities else None
                if miss == "direct":
                    found = {expert for expert in experts if (layer, expert) in cache}
                    visits.append(Visit(layer, Counter(experts), probabilities, found))
                    continue
                cache.begin_layer(layer, Counter(experts), probabilities)
                on_cpu = cache.bypassed(layer, experts) if miss == "bypass" else set()
                if on_cpu:
                    cache.computed_on_cpu(layer, len(on_cpu), 0.0)
                copied = [expert for expert in experts if expert not in on_cpu]
                cache.acquire(layer, copied)
                if prefetch and i + 1 < len(trace.layers):
                    cache.prefetch(trace.layers[i + 1], trace.predicted[r][t][i])
                cache.release(layer, copied)
            if visits:
                cache.record_step(visits)
        if r == 0 and pin_hot:
            cache.pin([key for key, _ in cache.token_counts.most_common(pin_hot)])
    return Replay(cache.totals(), trace.tokens, per_layer=dict(cache.counters))


def fresh_runs(trace: Trace, slots: int, policy: str | Callable[[], object], profiled: bool, **options) -> Replay:
    """Each request replayed as a run of its own, from an empty cache; with `profiled`, started from the
    routing profile of all the other requests (leave one out: a profile never holds the run it warms)."""
    total, everything = CacheCounters(), Counter(trace.uses())
    for r in range(len(trace.requests)):
        request, profile = trace.request(r), None
        if profiled:
            profile = RoutingProfile()
            profile.add(everything - Counter(request.uses()), trace.top_k)
        total += replay(request, slots, policy, profile=profile, **options).counters
    return Replay(total, trace.tokens)


def static_oracle_hit_rate(trace: Trace, slots: int) -> float:
    """Hits if the `slots` experts the trace uses most were pinned from the start and nothing else cached."""
    counts = Counter(trace.uses())
    return sum(n for _, n in counts.most_common(slots)) / sum(counts.values())


def load_trace(path: Path) -> Trace:
    """A routing trace from `localmoe generate --trace` (.jsonl), or in a plain form: .npz/.npy
    [requests x] tokens x layers x k expert ids (.npz: `expert_ids`, with optional `layers` and
    `num_experts`), .json (the same nested lists), .csv (request,token,layer,expert...)."""
    if not path.is_file():
        raise LocalMoEError(f"no such trace file: {path}")
    loaders = {".jsonl": _from_jsonl, ".npz": _from_numpy, ".npy": _from_numpy, ".json": _from_json, ".csv": _from_csv}
    if path.suffix not in loaders:
        raise LocalMoEError(f"{path}: trace formats are {', '.join(loaders)}")
    try:
        return loaders[path.suffix](path)
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise LocalMoEError(f"{path} is not a routing trace this reader knows: {error}") from None


def _from_nested(ids: list, layers: list[int] | None, num_experts: int | None) -> Trace:
    if ids and ids[0] and isinstance(ids[0][0][0], int):
        ids = [ids]  # one request: tokens x layers x k
    layers = layers or list(range(len(ids[0][0])))
    num_experts = num_experts or 1 + max(e for request in ids for token in request for row in token for e in row)
    return Trace(ids, list(layers), int(num_experts))


def _from_numpy(path: Path) -> Trace:
    import numpy

    data = numpy.load(path)
    if path.suffix == ".npy":
        return _from_nested(data.tolist(), None, None)
    layers = data["layers"].tolist() if "layers" in data.files else None
    num_experts = int(data["num_experts"]) if "num_experts" in data.files else None
    trace = _from_nested(data["expert_ids"].tolist(), layers, num_experts)
    if "expert_weights" in data.files:
        weights = data["expert_weights"].astype("float32").tolist()
        trace.probabilities = _chosen_probabilities(
            trace.requests, [weights] if isinstance(weights[0][0][0], float) else weights
        )
    return trace


def _chosen_probabilities(ids: list, weights: list) -> list:
    """Per visit, the chosen experts' router weights: all a trace kept of the router's distribution."""
    return [
        [
            [dict(zip(e, w, strict=True)) for e, w in zip(token, wt, strict=True)]
            for token, wt in zip(r, wr, strict=True)
        ]
        for r, wr in zip(ids, weights, strict=True)
    ]


def _from_json(path: Path) -> Trace:
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        return _from_nested(data["expert_ids"], data.get("layers"), data.get("num_experts"))
    return _from_nested(data, None, None)


def _from_csv(path: Path) -> Trace:
    rows = defaultdict(lambda: defaultdict(dict))
    with path.open() as file:
        for row in csv.reader(file):
            if not row or not row[0].strip().lstrip("-").isdigit():
                continue  # a header
            request, token, layer, *experts = (int(v) for v in row)
            rows[request][token][layer] = experts
    layers = sorted({layer for request in rows.values() for token in request.values() for layer in token})
    ids = [
        [[token[layer] for layer in layers] for _, token in sorted(request.items())]
        for _, request in sorted(rows.items())
    ]
    return _from_nested(ids, layers, None)


def _from_jsonl(path: Path) -> Trace:
    """Rows of one run; a token position that goes back to 0 starts a new request."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    layers = sorted({row["layer"] for row in rows})
    requests: list[dict[int, dict[int, dict]]] = []
    last = None
    for row in rows:
        if last is None or (row["token"] < last and row["layer"] == layers[0]):
            requests.append(defaultdict(dict))
        requests[-1][row["token"]][row["layer"]] = row
        last = row["token"]
    ids = [[[token[layer]["experts"] for layer in layers] for _, token in sorted(r.items())] for r in requests]
    trace = _from_nested(ids, layers, None)
    if any("predicted" in row for row in rows):  # the last MoE layer predicts nothing
        trace.predicted = [
            [[token[layer].get("predicted", []) for layer in layers] for _, token in sorted(r.items())]
            for r in requests
        ]
    if all("probabilities" in row for row in rows):
        trace.probabilities = [
            [[dict(enumerate(token[layer]["probabilities"])) for layer in layers] for _, token in sorted(r.items())]
            for r in requests
        ]
    return trace
