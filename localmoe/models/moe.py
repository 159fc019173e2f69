"""Routers and the sparse MoE block.

The block routes tokens and hands the choice to `experts`, a callable the runtime binds: families
declare where routed expert weights live on disk (`ExpertNames`) but never hold or place them.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# (layer index, hidden states [T, E], router weights [T, k] float32, expert ids [T, k]) -> [T, E]
ExpertsFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExpertNames:
    """Where a family's routed experts are stored, as name templates with {layer} and {expert}.

    `per_expert` maps the roles gate, up and down to one 2-D tensor per expert, the layout Hub
    checkpoints use. `fused` maps gate_up ([experts, 2 x intermediate, hidden], gate rows first) and
    down ([experts, hidden, intermediate]) to one 3-D tensor per layer, the layout transformers 5
    keeps in memory and that also loads.
    """

    per_expert: dict[str, str]
    fused: dict[str, str] = field(default_factory=dict)


# transformers 5 keeps every family's experts under these names in memory; checkpoints saved that way load.
FUSED_EXPERTS = {
    "gate_up": "model.layers.{layer}.mlp.experts.gate_up_proj",
    "down": "model.layers.{layer}.mlp.experts.down_proj",
}


class TopKRouter(nn.Module):
    """Softmax over all experts, then the top k, optionally renormalised to sum to one."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, normalize: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.top_k = top_k
        self.normalize = normalize

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Selection scores [T, experts] (float32): the top k of these are chosen."""
        return F.linear(x, self.weight).softmax(dim=-1, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router weights [T, k] (float32) and expert ids [T, k] for hidden states [T, E]."""
        weights, ids = self.scores(x).topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids


class SparseMoE(nn.Module):
    """The routed experts of one layer: route, then let the bound `experts` compute the weighted sum."""

    def __init__(
        self,
        layer_idx: int,
        hidden: int,
        intermediate: int,
        num_experts: int,
        top_k: int,
        *,
        normalize: bool,
        act: str = "silu",
    ):
        super().__init__()
        self.gate = TopKRouter(hidden, num_experts, top_k, normalize)
        self.layer_idx = layer_idx
        self.hidden_size, self.intermediate_size = hidden, intermediate
        self.num_experts, self.top_k = num_experts, top_k
        self.act = act
        self.experts: ExpertsFn | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = self.gate(flat)
        return self.experts(self.layer_idx, flat, weights, ids).view(x.shape)


def moe_blocks(model: nn.Module) -> list[SparseMoE]:
    """The model's MoE blocks in layer order."""
    return sorted((m for m in model.modules() if isinstance(m, SparseMoE)), key=lambda m: m.layer_idx)
