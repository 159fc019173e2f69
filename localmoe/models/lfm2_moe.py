"""LFM2-MoE (Lfm2MoeForCausalLM, e.g. LiquidAI/LFM2-8B-A1B): gated short convolutions in most layers and
grouped-query attention (per-head q/k norm, rotary) in the rest, as `layer_types` lists them; dense
first layers, then experts routed by sigmoid scores with a learned bias steering the choice, the
weights renormalised and scaled. The final norm is called `embedding_norm`."""

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import Fused, PerExpert
from localmoe.models.family import Family, ModelArgs, causal_lm
from localmoe.models.layers import MLP, CausalLM, RMSNorm, Step
from localmoe.models.moe import GatedActivation, SparseMoE, biased_sigmoid_router
from localmoe.models.short_conv import GatedShortConv


@dataclass
class Lfm2MoeArgs(ModelArgs):
    default_rope_theta: ClassVar[float] = 1_000_000.0
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"tie_word_embeddings": ("tie_embedding",)}

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    layer_types: list[str]
    moe_intermediate_size: int = 1792
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    conv_bias: bool = False
    conv_L_cache: int = 3
    num_dense_layers: int = 2
    num_experts: int = 32
    num_experts_per_tok: int = 4
    use_expert_bias: bool = True
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    norm_eps: float = 1e-5
    max_position_embeddings: int = 128_000
    tie_word_embeddings: bool = True
    rope: dict = field(default_factory=dict)

    @property
    def rms_norm_eps(self) -> float:
        return self.norm_eps


class Lfm2Layer(nn.Module):
    """Pre-norm token mixer (a short convolution or attention), then pre-norm feed-forward."""

    def __init__(self, mixer: nn.Module, feed_forward: nn.Module, hidden: int, eps: float):
        super().__init__()
        self.self_attn = mixer
        self.feed_forward = feed_forward
        self.operator_norm = RMSNorm(hidden, eps)
        self.ffn_norm = RMSNorm(hidden, eps)

    def forward(self, h: torch.Tensor, step: Step, state) -> torch.Tensor:
        h = h + self.self_attn(self.operator_norm(h), step, state)
        return h + self.feed_forward(self.ffn_norm(h))


def build(args: Lfm2MoeArgs) -> CausalLM:
    hidden, heads = args.hidden_size, args.num_attention_heads
    head_dim = hidden // heads

    def mixer(i: int) -> nn.Module:
        if args.layer_types[i] == "conv":
            return GatedShortConv(hidden, args.conv_L_cache, args.conv_bias)
        return Attention(hidden, heads, args.num_key_value_heads, head_dim, qk_norm="head", norm_eps=args.norm_eps)

    def feed_forward(i: int) -> nn.Module:
        if i < args.num_dense_layers:
            return MLP(hidden, args.intermediate_size)
        experts, top_k = args.num_experts, args.num_experts_per_tok
        router = biased_sigmoid_router(
            hidden,
            experts,
            top_k,
            normalize=args.norm_topk_prob,
            scaling=args.routed_scaling_factor,
            bias=args.use_expert_bias,
            norm_eps=1e-6,
        )
        return SparseMoE(i, hidden, args.moe_intermediate_size, experts, top_k, router, act=GatedActivation())

    layers = [Lfm2Layer(mixer(i), feed_forward(i), hidden, args.norm_eps) for i in range(args.num_hidden_layers)]
    return causal_lm(args, layers, head_dim)


FAMILY = Family(
    architectures=("Lfm2MoeForCausalLM",),
    model_type="lfm2_moe",
    args=Lfm2MoeArgs,
    model=build,
    experts=(
        PerExpert(
            {
                role: f"model.layers.{{layer}}.feed_forward.experts.{{expert}}.{name}.weight"
                for role, name in (("gate", "w1"), ("up", "w3"), ("down", "w2"))
            }
        ),
        Fused(
            "model.layers.{layer}.feed_forward.experts.gate_up_proj",
            "model.layers.{layer}.feed_forward.experts.down_proj",
        ),
    ),
    hub_aliases=(
        (".self_attn.o_proj.", ".self_attn.out_proj."),
        (".self_attn.q_norm.", ".self_attn.q_layernorm."),
        (".self_attn.k_norm.", ".self_attn.k_layernorm."),
        (".self_attn.", ".conv."),  # the convolution layers' mixer
        (".feed_forward.gate.e_score_correction_bias", ".feed_forward.expert_bias"),
        (".feed_forward.gate_proj.", ".feed_forward.w1."),
        (".feed_forward.up_proj.", ".feed_forward.w3."),
        (".feed_forward.down_proj.", ".feed_forward.w2."),
        ("model.norm.", "model.embedding_norm."),
    ),
    example="LiquidAI/LFM2-8B-A1B",
)
