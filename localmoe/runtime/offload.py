"""Experts computed through the expert cache: the runtime's side of a model's MoE blocks when the routed
experts do not all fit on the device.

A layer's pairs find their slots in the device-side table (-1: no slot). Then, as the miss policy says:

- `direct`: one kernel call computes every pair, from its slot or, for an expert without one, from its
  row in the host store, where it lies. Nothing waits for the host: the routing goes into the routing
  log, and once the step is over (on CUDA, a step later) the cache counts it, shows it to its policy
  and admits the misses the policy ranks above their victims.
- the others decide on the host: one host read of the layer's routing (and of the coming layers'
  predicted experts), copies for the misses, prefetches for the coming layers, and the misses the policy
  gives the CPU computed there from the host store. A layer that needs more experts than the pool holds
  (a long prefill) runs in rounds, the next round's copies issued before the current round computes.
"""

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from localmoe.files import sweep_temporaries
from localmoe.kernels.reference import combine_pairs, expert_pair_outputs
from localmoe.models.moe import MoESpec, Routing
from localmoe.runtime.cpu_experts import HostExperts
from localmoe.runtime.expert_cache import ExpertCache, Visit
from localmoe.runtime.miss_policy import MissPolicy
from localmoe.runtime.prefetch import HostReader, predict_experts
from localmoe.runtime.profile import RoutingProfile, merge_into, read_profile, start_from_profile
from localmoe.runtime.routing_log import LayerRouting, RoutingLog
from localmoe.runtime.stats import CacheSnapshot
from localmoe.runtime.trace import RoutingTrace

Scores = Callable[[torch.Tensor], torch.Tensor]  # a router's scores of every expert for hidden states [T, E]


class OffloadedExperts:
    def __init__(
        self,
        cache: ExpertCache,
        specs: list[MoESpec],
        predictors: dict[int, Scores],
        *,
        prefetch: int = 0,
        margin: int = 0,
        trace: RoutingTrace | None = None,
        miss_policy: MissPolicy,
        pair_outputs=expert_pair_outputs,
        pin_hot: int = 0,
        host_kernel=expert_pair_outputs,
    ):
        """`cache` keeps a device-side table; `predictors`: each MoE layer's router scores, which prefetch
        applies to the layer before (host-decided miss policies only). `miss_policy`: what a miss does (see
        localmoe.runtime.miss_policy). `pair_outputs`: the kernel computing the experts in slots and, for the
        direct miss policy, those read where they lie (see localmoe.kernels.pair_kernel); `host_kernel`: the
        CPU's share (see localmoe.kernels.host_kernel; on a CPU device the same kernel, so that both give the
        same bits). `pin_hot`: experts pinned after the first prompt (the warm-up), those it used most, unless
        a routing profile named them at load."""
        self.cache = cache
        self.specs = {spec.layer: spec for spec in specs}
        self.predictors = predictors
        self.trace = trace
        self.reader = HostReader(cache.rows.device)
        self.host = HostExperts(cache.store, host_kernel)
        readable = cache.store.readable_in_place
        self.in_place = {layer: cache.store.in_place(layer) for layer in self.specs} if readable else {}
        top_k = {layer: spec.top_k for layer, spec in self.specs.items()}
        self.log = RoutingLog(top_k, max(s.experts for s in specs), cache.rows.device, weights=trace is not None)
        self.miss_policy = miss_policy
        self.pair_outputs = pair_outputs
        self.configure_prefetch(prefetch, margin)
        self.pin_hot, self.warmed_up = pin_hot, False
        self.profile, self.profile_path, self._own_profile = RoutingProfile(), None, True
        self._profiled = Counter()  # what of the cache's token counts the profile has

    def configure_prefetch(self, depth: int, margin: int) -> None:
        """Predict and copy the experts of the next `depth` MoE layers, `margin` beyond each top-k."""
        order = sorted(self.specs)
        self.ahead = {layer: order[i + 1 : i + 1 + depth] for i, layer in enumerate(order)}
        self.depth, self.margin = depth, margin

    def __call__(
        self, layer: int, x: torch.Tensor, routing: Routing, routed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The layer's experts applied to x; coming layers' routers, to predict, see `routed` where the
        experts' inputs are not the router's (a latent space)."""
        spec = self.specs[layer]
        if self.miss_policy.in_place:
            return self._read_in_place(spec, x, routing)
        return self._decided_on_host(spec, x, routing, x if routed is None else routed)

    # --- misses read where they lie -------------------------------------------------------------------

    def _read_in_place(self, spec: MoESpec, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Every pair in one kernel call, from its slot or its host row; only device work, no host read."""
        ids = routing.ids.clamp(min=0) if spec.may_skip else routing.ids
        slots = self.log.lookup(spec.layer, self.cache.table.row(spec.layer), ids)  # [T, k]
        if spec.may_skip:  # no slot and no host row: the kernel leaves the pair's zeros
            slots.masked_fill_(routing.ids < 0, -1)
        self.log.record(spec.layer, routing)
        shape = (routing.ids.numel(), x.shape[1])
        pairs = x.new_zeros(shape) if spec.may_skip else x.new_empty(shape)  # else every pair is written
        self._pairs(spec, x, routing, slots, pairs, self.in_place[spec.layer])
        return self._combined(spec, pairs, routing)

    def begin_step(self) -> None:
        """Before a forward step: learn from the steps whose routing has reached the host."""
        self._learn()

    def step_tokens(self, tokens: int) -> None:
        """Before a static step (maybe a replayed graph): its token count, for the routing log."""
        self.log.expect(tokens)

    def end_step(self) -> None:
        """After a forward step: send its routing to the host (on the CPU, learned at once)."""
        if self.miss_policy.in_place:
            self.log.close()
            self._learn()

    def settle(self) -> None:
        """Learn from every step so far, waiting for the device where needed (counters, profile, pinning)."""
        self._learn(wait=True)

    def _learn(self, wait: bool = False) -> None:
        for step in self.log.taken(wait):
            self.cache.record_step([self._visit(layer) for layer in step])

    def _visit(self, routing: LayerRouting) -> Visit:
        spec, ids = self.specs[routing.layer], routing.ids.reshape(-1).tolist()
        found = {expert for expert, slot in zip(ids, routing.slots.reshape(-1).tolist(), strict=True) if slot >= 0}
        distribution = routing.scores / routing.scores.sum(axis=-1, keepdims=True)
        weighs = self.cache.policy.weighs_router
        if self.trace:
            every = distribution.reshape(-1).tolist() if weighs else None
            self.trace.record(spec.layer, ids, routing.weights.reshape(-1).tolist(), spec.top_k, None, every)
        probabilities = dict(enumerate(distribution.sum(axis=0).tolist())) if weighs else None
        return Visit(spec.layer, experts_used(ids), probabilities, found)

    # --- misses decided on the host -------------------------------------------------------------------

    def _decided_on_host(self, spec: MoESpec, x: torch.Tensor, routing: Routing, routed: torch.Tensor) -> torch.Tensor:
        layer, ids, weights = spec.layer, routing.ids, routing.weights
        coming = self.ahead[layer]
        predicted = [self._predict(self.specs[c], routed) for c in coming]
        weighs = self.cache.policy.weighs_router
        distribution = routing.scores / routing.scores.sum(dim=-1, keepdim=True) if weighs else None
        extra = [weights] if self.trace else []
        if distribution is not None:  # per token for the trace, else only the sum the policy is given
            extra.append(distribution if self.trace else distribution.sum(0))
        host = self.reader.read([ids, *predicted, *extra])
        chosen = [int(v) for v in host[0]]
        probabilities = None
        if distribution is not None:
            rows = [host[-1][i : i + spec.experts] for i in range(0, len(host[-1]), spec.experts)]
            probabilities = dict(enumerate(map(sum, zip(*rows, strict=True))))
        if self.trace:
            predicted_next = [int(v) for v in host[1]] if coming else None
            every = host[-1] if distribution is not None else None
            self.trace.record(layer, chosen, host[1 + len(coming)], spec.top_k, predicted_next, every)
        need = experts_used(chosen)
        self.cache.begin_layer(layer, need, probabilities)
        on_cpu = self.miss_policy.for_cpu(self.cache, layer, need)
        if on_cpu:  # the inputs reach the host now, while the device is idle, not after its work is queued
            inputs = x.cpu(), weights.reshape(-1).cpu() if spec.weights_on_input else None

        pairs = x.new_zeros(ids.numel(), x.shape[1])
        rounds, overlap = self._rounds(layer, [expert for expert in need if expert not in on_cpu])
        for i, experts in enumerate(rounds):
            if i == 0 or not overlap:
                self.cache.acquire(layer, experts)
            if overlap and i + 1 < len(rounds):
                self.cache.acquire(layer, rounds[i + 1])  # copied while this round computes
            self._compute(spec, x, routing, experts, pairs)
            if i + 1 == len(rounds):  # queued after the compute, which it must not delay
                self._prefetch(coming, host[1 : 1 + len(coming)])
            self.cache.release(layer, experts)
        if on_cpu:
            self._compute_on_cpu(spec, *inputs, torch.tensor(chosen).view(ids.shape), sorted(on_cpu), pairs)
        return self._combined(spec, pairs, routing)

    def _compute_on_cpu(self, spec: MoESpec, x, scale, ids, experts: list[int], pairs: torch.Tensor) -> None:
        """The pairs of `experts` into `pairs`, computed by the CPU (the host writes only their rows)."""
        out = pairs if pairs.device.type == "cpu" else torch.empty_like(pairs, device="cpu")
        start = time.perf_counter()
        self.host.compute(spec, x, ids, scale, experts, out)
        self.cache.computed_on_cpu(spec.layer, len(experts), time.perf_counter() - start)
        if out is not pairs:  # this copy waits for the device's share of the layer, not the timing above
            rows = torch.isin(ids.reshape(-1), torch.tensor(experts)).nonzero().squeeze(1)
            pairs.index_copy_(0, rows.to(pairs.device), out[rows].to(pairs.device))

    def _predict(self, spec: MoESpec, x: torch.Tensor) -> torch.Tensor:
        return predict_experts(self.predictors[spec.layer], x, min(spec.top_k + self.margin, spec.experts))

    def _rounds(self, layer: int, need: list[int]) -> tuple[list[list[int]], bool]:
        """The layer's experts split into rounds that fit the pool, those already cached first; and
        whether two rounds fit at once, so the next can be copied while one computes."""
        pinned = [e for e in need if (layer, e) in self.cache.pinned]
        rest = sorted(
            (e for e in need if (layer, e) not in self.cache.pinned), key=lambda e: (layer, e) not in self.cache
        )
        capacity = self.cache.capacity
        if len(rest) <= capacity:
            return [pinned + rest], False
        overlap = capacity >= 2
        size = capacity // 2 if overlap else capacity
        rounds = [rest[i : i + size] for i in range(0, len(rest), size)]
        rounds[0] = pinned + rounds[0]
        return rounds, overlap

    def _prefetch(self, coming: list[int], predicted: list[list[float]]) -> None:
        for layer, ids in zip(coming, predicted, strict=True):
            # most tokens first; for one token, the router's own ranking
            ranked = Counter(int(v) for v in ids)
            self.cache.prefetch(layer, [expert for expert, _ in ranked.most_common()])

    def _compute(self, spec: MoESpec, x: torch.Tensor, routing: Routing, experts: list[int], pairs) -> None:
        """The pairs whose expert has a slot, after this round's copies have landed (those of the round's
        experts; any other expert in a slot gives the same output again). While a reader thread still
        reads some from disk, what is in slots already is computed first."""
        slots = [self.cache.slot_of[(spec.layer, expert)] for expert in experts]
        table = self.cache.table.row(spec.layer)
        if spec.may_skip:  # a choice of no expert has no slot
            table = torch.cat((table, table.new_full((1,), -1)))  # row -1
        if self.cache.copies.queuing(slots):
            self._pairs(spec, x, routing, table[routing.ids], pairs, None)
        self.cache.copies.wait(slots)
        self._pairs(spec, x, routing, table[routing.ids], pairs, None)

    # --- both ------------------------------------------------------------------------------------------

    def _pairs(self, spec: MoESpec, x, routing: Routing, slots: torch.Tensor, pairs: torch.Tensor, host) -> None:
        cache = self.cache
        scale = routing.weights.reshape(-1) if spec.weights_on_input else None
        reads = {} if host is None else {"ids": routing.ids, "host": host}
        self.pair_outputs(pairs, x, cache.gate_up, cache.down, slots, spec.act, *cache.biases, scale, **reads)

    def _combined(self, spec: MoESpec, pairs: torch.Tensor, routing: Routing) -> torch.Tensor:
        weights = routing.weights
        if spec.per_choice:
            return pairs.view(*weights.shape, -1)
        return combine_pairs(pairs, torch.ones_like(weights) if spec.weights_on_input else weights)

    # --- warm-up, profile, what callers see -----------------------------------------------------------

    def after_prefill(self) -> None:
        """The first prompt is the warm-up: pin the `pin_hot` experts its tokens were routed to most."""
        if self.pin_hot and not self.warmed_up:
            self.settle()
            self.cache.pin([key for key, _ in self.cache.token_counts.most_common(self.pin_hot)])
        self.warmed_up = True

    def clear(self, policy: str) -> None:
        """Empty the cache and its counters under `policy`; the next prompt is the warm-up again."""
        self.log.taken(wait=True)  # what happened before is not counted after
        self.cache.clear(policy)
        self.warmed_up = False

    def snapshot(self) -> CacheSnapshot:
        self.settle()
        return CacheSnapshot.of(self.cache)

    def start_from_profile(self, path: Path, own: bool) -> None:
        """Read the routing profile at `path` (kept there from now on; `own`: localmoe's, else the user's:
        see `read_profile`); warm the pool from it, and pin its `pin_hot` hottest, where it has something
        to say."""
        sweep_temporaries(path.parent, path.name)
        profile = read_profile(path, own, set(self.specs), next(iter(self.specs.values())).experts)
        self.profile, self.profile_path, self._own_profile = profile, path, own
        if self.pin_hot and profile.counts:
            self.cache.pin(profile.hottest()[: self.pin_hot])
            self.warmed_up = True  # the profile stands in for the first prompt's warm-up
        start_from_profile(self.cache, profile)

    def save_profile(self, top_k: int) -> None:
        """Add the routing seen since the last save to the routing profile as the file holds it now (other
        runs may have added theirs), and write it."""
        if self.profile_path is None:
            return
        self.settle()
        counts = self.cache.token_counts
        if any(counts[key] < n for key, n in self._profiled.items()):
            self._profiled = Counter()  # the cache was emptied since: its counts start again
        experts = next(iter(self.specs.values())).experts
        added = counts - self._profiled
        self.profile = merge_into(self.profile_path, added, top_k, self._own_profile, set(self.specs), experts)
        self._profiled = Counter(counts)


def experts_used(ids: list[int]) -> Counter[int]:
    """The tokens routed to each expert, of a layer's choices (-1, no expert, is none)."""
    return Counter(expert for expert in ids if expert >= 0)
