"""Routers, expert activations and the sparse MoE block.

The block routes tokens and hands the choice to `experts`, a callable the runtime binds: a family
declares where its routed experts are stored (`expert_tensors`) but never holds or places them.
Shared experts and the shared expert gate are ordinary resident modules of the block. What the
runtime learns of a block is its `MoESpec`, and of each call the `Routing`: the seam runs one way.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.models.expert_tensors import Fused
from localmoe.models.layers import MLP, activation, linear


class Routing(NamedTuple):
    """A router's choice for T tokens: weights [T, k] float32, expert ids [T, k], and its scores of every
    expert [T, experts] (float32), which the cache's score policy weighs. An id of -1 is a choice of no
    expert the runtime holds (an identity expert, which the block adds itself, with weight 0 here)."""

    weights: torch.Tensor
    ids: torch.Tensor
    scores: torch.Tensor


# (layer index, the experts' inputs [T, E], routing) -> [T, E]; for experts in a latent space also `routed=`,
# the hidden states the router saw, from which a runtime predicts coming layers' experts
ExpertsFn = Callable[..., torch.Tensor]

# transformers 5 keeps every family's experts under these names in memory; checkpoints saved that way load.
FUSED_EXPERTS = Fused("model.layers.{layer}.mlp.experts.gate_up_proj", "model.layers.{layer}.mlp.experts.down_proj")
# Per-expert Hub names of Mixtral and the families that kept its layout (Phi-MoE, MiniMax): w1 gate, w3 up, w2 down
MIXTRAL_EXPERTS = {
    role: f"model.layers.{{layer}}.block_sparse_moe.experts.{{expert}}.{name}.weight"
    for role, name in (("gate", "w1"), ("up", "w3"), ("down", "w2"))
}
# The per-expert Hub names of the families whose experts are MLPs like their dense layers (Qwen, OLMoE, DeepSeek...)
MLP_EXPERTS = {
    role: f"model.layers.{{layer}}.mlp.experts.{{expert}}.{role}_proj.weight" for role in ("gate", "up", "down")
}


@dataclass(frozen=True)
class GatedActivation:
    """How an expert combines its gate and up projections.

    `glu`: act(gate) * up. `clamped_swiglu` (gpt-oss): gate clamped above at `limit`, up clamped to
    [-limit, limit], then gate * sigmoid(alpha * gate) * (up + 1). `clamped_glu` (DeepSeek-V4): the
    same clamps, then act(gate) * up. `glu_clamped_after` (Step-3.7): act(gate) clamped above at
    `limit`, times up clamped to [-limit, limit]. `softcapped_glu` (Inkling 2): sigmoid(gate) times gate
    and up, each capped by tanh, at `gate_limit` and `limit`. `ungated` (Nemotron-H): experts without a
    gate projection, act(up).
    """

    kind: str = "glu"
    act: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0
    gate_limit: float = 0.0

    @property
    def gated(self) -> bool:
        """Whether the experts have a gate projection beside up (else their input projection is up alone)."""
        return self.kind != "ungated"

    def combine(self, projected: torch.Tensor) -> torch.Tensor:
        """The activation of an expert's input projection [..., 2I] (gate then up; [..., I], up alone,
        for ungated experts)."""
        if not self.gated:
            return activation(self.act)(projected)
        return self(*projected.chunk(2, dim=-1))

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.kind in ("clamped_swiglu", "clamped_glu"):
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
        if self.kind == "clamped_swiglu":
            return gate * torch.sigmoid(gate * self.alpha) * (up + 1)
        if self.kind == "softcapped_glu":  # in float32, as the original
            g, u = gate.float(), up.float()
            return (softcap(g, self.gate_limit) * torch.sigmoid(g) * softcap(u, self.limit)).to(gate.dtype)
        if self.kind == "glu_clamped_after":
            return activation(self.act)(gate).clamp(max=self.limit) * up.clamp(min=-self.limit, max=self.limit)
        return activation(self.act)(gate) * up


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """x bounded to (-cap, cap) by tanh, nearly unchanged well inside."""
    return torch.tanh(x / cap) * cap


@dataclass(frozen=True)
class MoESpec:
    """What the runtime needs to know of one MoE block: its layer, the shapes of its routed experts and
    how they compute (`weights_on_input`: the router weight scales an expert's input, not its output);
    `may_skip`: some choices may be -1, no expert (see `Routing`), which the runtime neither looks up,
    counts, copies nor computes; `per_choice`: the runtime returns each choice's output unweighted,
    [T, k, E], for the block to combine (Muse Spark normalises each expert's output first)."""

    layer: int
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    act: GatedActivation
    bias: bool
    weights_on_input: bool
    may_skip: bool = False
    per_choice: bool = False


class GatedMLP(MLP):
    """A dense MLP whose gate and up projections combine as `glu` says (the clamped SwiGLUs of dense
    layers and shared experts: DeepSeek-V4, Step-3.7, MiniMax-M3)."""

    def __init__(self, hidden: int, intermediate: int, glu: GatedActivation, bias: bool = False):
        super().__init__(hidden, intermediate, glu.act, bias)
        self.glu = glu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.glu(self.gate_proj(x), self.up_proj(x)))


class TopKRouter(nn.Module):
    """Softmax over all experts, then the top k, optionally renormalised to sum to one (the same as a
    softmax over the top k logits, as gpt-oss computes it)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, normalize: bool, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.bias = nn.Parameter(torch.empty(num_experts)) if bias else None
        self.top_k = top_k
        self.normalize = normalize

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Selection scores [T, experts] (float32): the top k of these are chosen. In the router's own
        dtype, which some families keep in float32."""
        return linear(x.to(self.weight.dtype), self.weight, self.bias).softmax(dim=-1, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> Routing:
        """The routing of hidden states [T, E]."""
        scores = self.scores(x)
        weights, ids = scores.topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(weights, ids, scores)


class GroupedTopKRouter(nn.Module):
    """DeepSeek-style routing, in float32: score every expert (softmax or sigmoid), keep the
    `topk_group` best of `n_group` groups, take the top k there, optionally renormalise, scale.

    V2 ranks groups by their best expert; V3 and GLM-4.5 by the sum of their best two, and add a
    learned correction bias to the scores for choosing only (the weights use the plain scores).
    `group_by_top2` overrides the ranking (Mistral 4: softmax scores, best-two sums, no bias);
    `norm_eps` is added to the sum the weights are renormalised by; `softcap` caps the logits at
    +-softcap by tanh before scoring (Laguna); `dropped` is what the experts of dropped groups score for
    the choice (-inf with a correction bias, 0 without, as V2; A.X-K2: 0 with one); `logit_scale`
    multiplies the logits before scoring (Muse Spark).
    """

    def __init__(
        self,
        hidden: int,
        num_experts: int,
        top_k: int,
        *,
        scoring: str,
        n_group: int,
        topk_group: int,
        normalize: bool,
        scaling: float,
        correction_bias: bool,
        group_by_top2: bool | None = None,
        norm_eps: float = 1e-20,
        softcap: float | None = None,
        dropped: float | None = None,
        logit_scale: float = 1.0,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.dropped = (float("-inf") if correction_bias else 0.0) if dropped is None else dropped
        if correction_bias:
            self.e_score_correction_bias = nn.Parameter(torch.empty(num_experts))
        self.top_k, self.scoring, self.normalize, self.scaling = top_k, scoring, normalize, scaling
        self.n_group, self.topk_group = n_group, topk_group
        self.group_by_top2 = correction_bias if group_by_top2 is None else group_by_top2
        self.norm_eps, self.softcap, self.logit_scale = norm_eps, softcap, logit_scale

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.weight.float())
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> Routing:
        scores = self.scores(x)
        choice = scores + self.e_score_correction_bias.float() if hasattr(self, "e_score_correction_bias") else scores
        groups = choice.view(choice.shape[0], self.n_group, -1)
        top2 = self.group_by_top2
        group_scores = groups.topk(2, dim=-1).values.sum(dim=-1) if top2 else groups.max(dim=-1).values
        kept = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, 1)
        choice = groups.masked_fill(kept.unsqueeze(-1) == 0, self.dropped).view_as(choice)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + self.norm_eps)
        return Routing(weights * self.scaling, ids, scores)


def biased_sigmoid_router(
    hidden: int,
    num_experts: int,
    top_k: int,
    *,
    normalize: bool = True,
    scaling: float = 1.0,
    bias: bool = True,
    norm_eps: float = 1e-20,
    softcap: float | None = None,
) -> GroupedTopKRouter:
    """Sigmoid scores, the top k chosen with a learned bias added (where the experts have one), no
    groups (LFM2-MoE, AFMoE, Laguna)."""
    return GroupedTopKRouter(
        hidden,
        num_experts,
        top_k,
        scoring="sigmoid",
        n_group=1,
        topk_group=1,
        normalize=normalize,
        scaling=scaling,
        correction_bias=bias,
        norm_eps=norm_eps,
        softcap=softcap,
    )


class SparseMoE(nn.Module):
    """The routed experts of one layer, plus the layer's shared expert if it has one: route, let the
    bound `experts` compute the weighted sum of the chosen ones, add the shared expert's output
    (scaled by sigmoid(shared_expert_gate(x)) where there is that gate).

    With `latent` (Nemotron-H), the experts work in a narrower space: the routed tokens go through
    fc1_latent_proj to it and their sum through fc2_latent_proj back, while routing and the shared
    expert see the hidden states; `hidden_size` is then the experts' width, the latent one.

    With `identity_experts` (LongCat-Flash's zero-computation experts), the router scores that many
    experts past the routed ones, each of which returns its input: the block adds the input times their
    weights itself, and the runtime sees those choices as -1, no expert, so that they take no slot and
    are never copied.
    """

    def __init__(
        self,
        layer_idx: int,
        hidden: int,
        intermediate: int,
        num_experts: int,
        top_k: int,
        router: nn.Module,
        *,
        act: GatedActivation = GatedActivation(),
        expert_bias: bool = False,
        weights_on_input: bool = False,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: bool = False,
        latent: int | None = None,
        latent_bias: bool = False,
        identity_experts: int = 0,
        per_choice: bool = False,
    ):
        super().__init__()
        self.gate = router
        self.layer_idx = layer_idx
        self.hidden_size, self.intermediate_size = latent or hidden, intermediate
        if latent is not None:
            self.fc1_latent_proj = nn.Linear(hidden, latent, bias=latent_bias)
            self.fc2_latent_proj = nn.Linear(latent, hidden, bias=latent_bias)
        self.num_experts, self.top_k, self.identity_experts = num_experts, top_k, identity_experts
        self.per_choice = per_choice  # the bound experts return each choice's output: a subclass combines them
        self.act, self.expert_bias = act, expert_bias
        self.weights_on_input = weights_on_input  # Llama 4: the router weight scales the expert's input
        if shared_expert is not None:
            self.shared_expert = shared_expert
        if shared_expert_gate:
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        self.experts: ExpertsFn | None = None

    @property
    def gated(self) -> bool:
        return self.act.gated

    @property
    def spec(self) -> MoESpec:
        return MoESpec(
            self.layer_idx,
            self.hidden_size,
            self.intermediate_size,
            self.num_experts,
            self.top_k,
            self.act,
            self.expert_bias,
            self.weights_on_input,
            self.identity_experts > 0,
            self.per_choice,
        )

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The router's scores of the routed experts [T, experts] (float32), from which a runtime predicts."""
        scores = self.gate.scores(x)
        return scores[:, : self.num_experts] if self.identity_experts else scores

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        routing = self.gate(flat)
        shared = self.shared(flat)  # queued first: it does not depend on the routing
        if self.identity_experts:
            routing, identity = self.split_identities(flat, routing)
            shared = identity if shared is None else shared + identity
        if hasattr(self, "fc1_latent_proj"):
            out = self.fc2_latent_proj(self.experts(self.layer_idx, self.fc1_latent_proj(flat), routing, routed=flat))
        else:
            out = self.experts(self.layer_idx, flat, routing)
        return (out if shared is None else out + shared).view(x.shape)

    def split_identities(self, flat: torch.Tensor, routing: Routing) -> tuple[Routing, torch.Tensor]:
        """The routing of the routed experts (identity choices as -1 with weight 0, scores of the routed
        experts only), and what the identity choices add: the input times their summed weight [T, E]."""
        identity = routing.ids >= self.num_experts
        weight = (routing.weights * identity).sum(dim=-1, keepdim=True)
        routed = Routing(
            routing.weights.masked_fill(identity, 0.0),
            routing.ids.masked_fill(identity, -1),
            routing.scores[:, : self.num_experts],
        )
        return routed, (flat.float() * weight).to(flat.dtype)

    def shared(self, flat: torch.Tensor) -> torch.Tensor | None:
        """The shared expert's output for tokens [T, E] (gated where the block has that gate), if any."""
        if not hasattr(self, "shared_expert"):
            return None
        shared = self.shared_expert(flat)
        if hasattr(self, "shared_expert_gate"):
            shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
        return shared


def sigmoid_moe(
    layer: int,
    hidden: int,
    intermediate: int,
    experts: int,
    top_k: int,
    *,
    shared: int = 0,
    act: str = "silu",
    n_group: int = 1,
    topk_group: int = 1,
    normalize: bool = True,
    scaling: float = 1.0,
) -> SparseMoE:
    """DeepSeek-V3's MoE block, which many families reuse: sigmoid scores whose learned correction bias
    steers the choice of experts over the best groups (not their weights), and a shared expert
    `shared` wide where that is not 0."""
    router = GroupedTopKRouter(
        hidden,
        experts,
        top_k,
        scoring="sigmoid",
        n_group=n_group,
        topk_group=topk_group,
        normalize=normalize,
        scaling=scaling,
        correction_bias=True,
    )
    shared_expert = MLP(hidden, shared, act) if shared else None
    return SparseMoE(
        layer, hidden, intermediate, experts, top_k, router, act=GatedActivation(act=act), shared_expert=shared_expert
    )


def moe_blocks(model: nn.Module) -> list[SparseMoE]:
    """The model's MoE blocks in layer order."""
    return sorted((m for m in model.modules() if isinstance(m, SparseMoE)), key=lambda m: m.layer_idx)
