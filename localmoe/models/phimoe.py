"""Phi-3.5-MoE (PhimoeForCausalLM): LayerNorm with biases, Mixtral-style expert names, and sparsemixer
routing, which at inference picks the best expert, then the best of the rest, each weighted by a
softmax over the experts whose logits come close enough to it."""

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, causal_lm
from localmoe.models.layers import CausalLM, DecoderLayer
from localmoe.models.moe import FUSED_EXPERTS, MIXTRAL_EXPERTS, GatedActivation, Routing, SparseMoE
from localmoe.models.rotary import RotaryEmbedding


class SparseMixerRouter(nn.Module):
    """Top-2 sparsemixer, as at inference (no sampling): for each pick, experts whose logit trails
    the pick's by more than 2 x `jitter_eps` (relative) are left out of the softmax that weights it."""

    def __init__(self, hidden: int, num_experts: int, jitter_eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.jitter_eps = jitter_eps

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight).float()

    def forward(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x, self.weight)
        first_weight, first = self._pick(logits, logits)
        second_weight, second = self._pick(logits.scatter(-1, first, float("-inf")), logits)
        weights = torch.cat((first_weight, second_weight), dim=-1).float()
        return Routing(weights, torch.cat((first, second), dim=-1), logits.float())

    def _pick(self, candidates: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        best, index = candidates.max(dim=-1, keepdim=True)
        far = (best - logits) / logits.abs().clamp(min=best) > 2 * self.jitter_eps
        return candidates.masked_fill(far, float("-inf")).softmax(dim=-1).gather(-1, index), index


class PhimoeRotary(RotaryEmbedding):
    """As transformers computes Phi-MoE's longrope: the short factors' frequencies at every length, and
    cos/sin scaled by long_mscale once a forward pass reaches past the original context (short_mscale
    before)."""

    static = False  # the scale depends on how far the forward pass reaches

    def __init__(self, params: dict, head_dim: int, max_positions: int):
        super().__init__(params, head_dim, max_positions)
        self.params = params

    def scale(self, start: int, length: int) -> float:
        if self.params["rope_type"] == "default":
            return self.scaling
        beyond = start + length > self.params["original_max_position_embeddings"]
        return self.params["long_mscale"] if beyond else self.params["short_mscale"]


@dataclass
class PhimoeArgs(ModelArgs):
    default_rope_theta: ClassVar[float] = 1_000_000.0

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = 8
    head_dim: int | None = None
    num_local_experts: int = 16
    router_jitter_noise: float = 0.01
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5  # the LayerNorms' epsilon, despite the name
    max_position_embeddings: int = 4096 * 32
    sliding_window: int | None = None
    attention_bias: bool = False
    lm_head_bias: bool = False
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)


def build(args: PhimoeArgs) -> CausalLM:
    hidden, experts = args.hidden_size, args.num_local_experts
    head_dim = args.attention_head_dim
    layers = [
        DecoderLayer(
            Attention(
                hidden,
                args.num_attention_heads,
                args.key_value_heads,
                head_dim,
                qkv_bias=args.attention_bias,
                out_bias=args.attention_bias,
                sliding_window=args.sliding_window,
            ),
            SparseMoE(
                i,
                hidden,
                args.intermediate_size,
                experts,
                2,
                SparseMixerRouter(hidden, experts, args.router_jitter_noise),
                act=GatedActivation(act=args.hidden_act),
            ),
            hidden,
            args.rms_norm_eps,
            norm=nn.LayerNorm,
        )
        for i in range(args.num_hidden_layers)
    ]
    return causal_lm(args, layers, head_dim, norm=nn.LayerNorm, rotary=PhimoeRotary, lm_head_bias=args.lm_head_bias)


FAMILY = Family(
    architectures=("PhimoeForCausalLM",),
    model_type="phimoe",
    args=PhimoeArgs,
    model=build,
    experts=(
        PerExpert(MIXTRAL_EXPERTS),
        FUSED_EXPERTS,
    ),
    hub_aliases=((".mlp.gate.", ".block_sparse_moe.gate."), (".mlp.gate.", ".mlp.router.")),
    example="microsoft/Phi-3.5-MoE-instruct",
)
