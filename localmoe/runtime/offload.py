"""Experts computed from the expert cache: the runtime's side of a model's MoE blocks when the routed
experts do not all fit on the device.

Per MoE layer: one host read of the routing (and of the coming layers' predicted experts), then copies
for the experts not in a slot, prefetches for the coming layers, and the expert computation over the
slots. When a layer needs more experts than the pool holds (a long prefill), it runs in rounds, and
the next round's copies are issued before the current round computes. Misses the miss policy gives to
the CPU are computed from the host store while the device works on the rest.
"""

import time
from collections import Counter
from pathlib import Path

import torch

from localmoe.files import sweep_temporaries
from localmoe.kernels.reference import combine_pairs, expert_pair_outputs
from localmoe.models.moe import SparseMoE
from localmoe.runtime.cpu_experts import HostExperts
from localmoe.runtime.expert_cache import ExpertCache
from localmoe.runtime.miss_policy import MissPolicy
from localmoe.runtime.prefetch import HostReader, predict_experts
from localmoe.runtime.profile import RoutingProfile, merge_into, read_profile, start_from_profile
from localmoe.runtime.stats import CacheSnapshot
from localmoe.runtime.trace import RoutingTrace


class OffloadedExperts:
    def __init__(
        self,
        cache: ExpertCache,
        blocks: list[SparseMoE],
        *,
        prefetch: int = 1,
        margin: int = 0,
        trace: RoutingTrace | None = None,
        miss_policy: MissPolicy,
        pair_outputs=expert_pair_outputs,
        pin_hot: int = 0,
        host_kernel=expert_pair_outputs,
    ):
        """`miss_policy`: what a miss does (see localmoe.runtime.miss_policy). `pair_outputs`: the kernel
        computing the experts in slots (see localmoe.kernels.pair_kernel); `host_kernel`: the CPU's share
        (see localmoe.kernels.host_kernel; on a CPU device the same kernel, so that both give the same bits).
        `pin_hot`: experts pinned after the first prompt (the warm-up), those it used most, unless a routing
        profile named them at load."""
        self.cache = cache
        self.blocks = {block.layer_idx: block for block in blocks}
        self.trace = trace
        self.reader = HostReader(cache.rows.device)
        self.host = HostExperts(cache.store, host_kernel)
        self.miss_policy = miss_policy
        self.pair_outputs = pair_outputs
        self.configure_prefetch(prefetch, margin)
        self.pin_hot, self.warmed_up = pin_hot, False
        self.profile, self.profile_path, self._own_profile = RoutingProfile(), None, True
        self._profiled = Counter()  # what of the cache's token counts the profile has

    def configure_prefetch(self, depth: int, margin: int) -> None:
        """Predict and copy the experts of the next `depth` MoE layers, `margin` beyond each top-k."""
        order = sorted(self.blocks)
        self.ahead = {layer: order[i + 1 : i + 1 + depth] for i, layer in enumerate(order)}
        self.depth, self.margin = depth, margin

    def __call__(
        self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, routed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The layer's experts applied to x; routers (this layer's, to weigh, and coming layers', to
        predict) see `routed` where the experts' inputs are not the router's (a latent space)."""
        block = self.blocks[layer]
        coming = self.ahead[layer]
        hidden = x if routed is None else routed
        predicted = [self._predict(self.blocks[c], hidden) for c in coming]
        router = _distribution(block, hidden) if self.cache.policy.weighs_router else None
        extra = [weights] if self.trace else []
        if router is not None:  # per token for the trace, else only the sum the policy is given
            extra.append(router if self.trace else router.sum(0))
        host = self.reader.read([ids, *predicted, *extra])
        chosen = [int(v) for v in host[0]]
        probabilities = None
        if router is not None:
            rows = [host[-1][i : i + block.num_experts] for i in range(0, len(host[-1]), block.num_experts)]
            probabilities = dict(enumerate(map(sum, zip(*rows, strict=True))))
        if self.trace:
            predicted_next = [int(v) for v in host[1]] if coming else None
            every = host[-1] if router is not None else None
            self.trace.record(layer, chosen, host[1 + len(coming)], block.top_k, predicted_next, every)
        need = Counter(chosen)
        self.cache.begin_layer(layer, need, probabilities)
        on_cpu = self.miss_policy.for_cpu(self.cache, layer, need)
        if on_cpu:  # the inputs reach the host now, while the device is idle, not after its work is queued
            inputs = x.cpu(), weights.reshape(-1).cpu() if block.weights_on_input else None

        pairs = x.new_zeros(ids.numel(), x.shape[1])
        rounds, overlap = self._rounds(layer, [expert for expert in need if expert not in on_cpu])
        for i, experts in enumerate(rounds):
            if i == 0 or not overlap:
                self.cache.acquire(layer, experts)
            if overlap and i + 1 < len(rounds):
                self.cache.acquire(layer, rounds[i + 1])  # copied while this round computes
            if i + 1 == len(rounds):
                self._prefetch(coming, host[1 : 1 + len(coming)])
            self._compute(block, x, ids, weights, experts, pairs)
            self.cache.release(layer, experts)
        if on_cpu:
            self._compute_on_cpu(block, *inputs, torch.tensor(chosen).view(ids.shape), sorted(on_cpu), pairs)
        return combine_pairs(pairs, torch.ones_like(weights) if block.weights_on_input else weights)

    def after_prefill(self) -> None:
        """The first prompt is the warm-up: pin the `pin_hot` experts its tokens were routed to most."""
        if self.pin_hot and not self.warmed_up:
            self.cache.pin([key for key, _ in self.cache.token_counts.most_common(self.pin_hot)])
        self.warmed_up = True

    def clear(self, policy: str) -> None:
        """Empty the cache and its counters under `policy`; the next prompt is the warm-up again."""
        self.cache.clear(policy)
        self.warmed_up = False

    def snapshot(self) -> CacheSnapshot:
        return CacheSnapshot.of(self.cache)

    def start_from_profile(self, path: Path, own: bool) -> None:
        """Read the routing profile at `path` (kept there from now on; `own`: localmoe's, else the user's:
        see `read_profile`); warm the pool from it, and pin its `pin_hot` hottest, where it has something
        to say."""
        sweep_temporaries(path.parent, path.name)
        profile = read_profile(path, own, set(self.blocks), next(iter(self.blocks.values())).num_experts)
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
        counts = self.cache.token_counts
        if any(counts[key] < n for key, n in self._profiled.items()):
            self._profiled = Counter()  # the cache was emptied since: its counts start again
        experts = next(iter(self.blocks.values())).num_experts
        added = counts - self._profiled
        self.profile = merge_into(self.profile_path, added, top_k, self._own_profile, set(self.blocks), experts)
        self._profiled = Counter(counts)

    def _compute_on_cpu(self, block: SparseMoE, x, scale, ids, experts: list[int], pairs: torch.Tensor) -> None:
        """The pairs of `experts` into `pairs`, computed by the CPU (the host writes only their rows)."""
        out = pairs if pairs.device.type == "cpu" else torch.empty_like(pairs, device="cpu")
        start = time.perf_counter()
        self.host.compute(block, x, ids, scale, experts, out)
        self.cache.computed_on_cpu(block.layer_idx, len(experts), time.perf_counter() - start)
        if out is not pairs:  # this copy waits for the device's share of the layer, not the timing above
            rows = torch.isin(ids.reshape(-1), torch.tensor(experts)).nonzero().squeeze(1)
            pairs.index_copy_(0, rows.to(pairs.device), out[rows].to(pairs.device))

    def _predict(self, block: SparseMoE, x: torch.Tensor) -> torch.Tensor:
        return predict_experts(block.gate, x, min(block.top_k + self.margin, block.num_experts))

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

    def _compute(self, block: SparseMoE, x: torch.Tensor, ids, weights, experts: list[int], pairs) -> None:
        slots = [self.cache.slot_of[(block.layer_idx, expert)] for expert in experts]
        self.cache.copies.wait(slots)
        table = [-1] * block.num_experts
        for expert, slot in zip(experts, slots, strict=True):
            table[expert] = slot
        slots_of_pairs = _to_device(table, x.device)[ids]
        cache = self.cache
        scale = weights.reshape(-1) if block.weights_on_input else None
        self.pair_outputs(pairs, x, cache.gate_up, cache.down, slots_of_pairs, block.act, *cache.biases, scale)
        self.cache.copies.read_by_compute(slots)


def _distribution(block: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """The router's scores of every expert for each token, as a distribution [T, experts]."""
    scores = block.gate.scores(x)
    return scores / scores.sum(dim=-1, keepdim=True)


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    table = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        # pinned, so the copy is asynchronous and the host does not wait for the device
        return table.pin_memory().to(device, non_blocking=True)
    return table
