"""Jamba (JambaForCausalLM, e.g. ai21labs/AI21-Jamba-Mini-1.7): Mamba-1 layers with attention (without
position embeddings) every `attn_layer_period` layers from `attn_layer_offset`, and softmax top-k experts,
not renormalised, every `expert_layer_period` layers from `expert_layer_offset` (dense MLPs between)."""

import math
from dataclasses import dataclass, field
from typing import ClassVar

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import Fused, PerExpert
from localmoe.models.family import Family, ModelArgs, causal_lm
from localmoe.models.layers import MLP, CausalLM, DecoderLayer
from localmoe.models.mamba1 import Mamba1Mixer
from localmoe.models.moe import GatedActivation, SparseMoE, TopKRouter


@dataclass
class JambaArgs(ModelArgs):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"num_experts": ("num_local_experts",)}

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 8
    num_experts: int = 16
    num_experts_per_tok: int = 2
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)  # unused: no layer has position embeddings

    def attention(self, i: int) -> bool:
        return i % self.attn_layer_period == self.attn_layer_offset

    def sparse(self, i: int) -> bool:
        return self.num_experts > 1 and i % self.expert_layer_period == self.expert_layer_offset

    @property
    def dt_rank(self) -> int:
        return math.ceil(self.hidden_size / 16) if self.mamba_dt_rank == "auto" else self.mamba_dt_rank


def build(args: JambaArgs) -> CausalLM:
    hidden, heads = args.hidden_size, args.num_attention_heads
    head_dim = hidden // heads

    def mixer(i: int):
        if args.attention(i):
            return Attention(hidden, heads, args.num_key_value_heads, head_dim, rope=False)
        return Mamba1Mixer(
            hidden,
            inner=args.mamba_expand * hidden,
            state_size=args.mamba_d_state,
            dt_rank=args.dt_rank,
            kernel=args.mamba_d_conv,
            act=args.hidden_act,
            proj_bias=args.mamba_proj_bias,
            conv_bias=args.mamba_conv_bias,
            inner_norm_eps=args.rms_norm_eps,
        )

    def feed_forward(i: int):
        if not args.sparse(i):
            return MLP(hidden, args.intermediate_size, args.hidden_act)
        experts, top_k = args.num_experts, args.num_experts_per_tok
        router = TopKRouter(hidden, experts, top_k, normalize=False)
        return SparseMoE(
            i, hidden, args.intermediate_size, experts, top_k, router, act=GatedActivation(act=args.hidden_act)
        )

    layers = [DecoderLayer(mixer(i), feed_forward(i), hidden, args.rms_norm_eps) for i in range(args.num_hidden_layers)]
    return causal_lm(args, layers, head_dim)


FAMILY = Family(
    architectures=("JambaForCausalLM",),
    model_type="jamba",
    args=JambaArgs,
    model=build,
    experts=(
        PerExpert(
            {
                role: f"model.layers.{{layer}}.feed_forward.experts.{{expert}}.{role}_proj.weight"
                for role in ("gate", "up", "down")
            }
        ),
        Fused(
            "model.layers.{layer}.feed_forward.experts.gate_up_proj",
            "model.layers.{layer}.feed_forward.experts.down_proj",
        ),
    ),
    hub_aliases=(
        ("model.norm.", "model.final_layernorm."),
        (".self_attn.", ".mamba."),
        (".post_attention_layernorm.", ".pre_ff_layernorm."),
        (".mlp.gate.", ".feed_forward.router."),
        (".mlp.", ".feed_forward."),
    ),
    example="ai21labs/AI21-Jamba-Mini-1.7",
)
