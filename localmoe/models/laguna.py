"""Laguna (LagunaForCausalLM, poolside's Laguna XS.2): grouped-query attention with a head count of its
own per layer, per-head q/k norms, sliding-window or full layers each kind with its own rotary (partial
on full layers by default), and a softplus gate on each head's output (or each channel's); dense first
layers, then experts routed by sigmoid scores of optionally tanh-capped logits with a learned bias
steering the choice, renormalised and scaled, beside a shared expert."""

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from localmoe.errors import LocalMoEError
from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs
from localmoe.models.layers import MLP, Backbone, CausalLM, DecoderLayer
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GatedActivation, SparseMoE, biased_sigmoid_router
from localmoe.models.rotary import RotaryEmbedding, rope_parameters

# each kind of layer's rotary where the config gives none, as transformers' LagunaConfig sets them
DEFAULT_ROPE = {
    "full_attention": {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
}


@dataclass
class LagunaArgs(ModelArgs):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"num_experts": ("num_local_experts",)}

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int = 8192
    num_attention_heads: int = 48
    num_attention_heads_per_layer: list[int] | None = None
    num_key_value_heads: int = 8
    head_dim: int = 128
    attention_bias: bool = False
    gating: bool | str = True
    layer_types: list[str] | None = None
    sliding_window: int = 512
    rope_parameters: dict | None = None  # one set per kind of layer
    mlp_layer_types: list[str] | None = None
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    num_experts: int = 256
    num_experts_per_tok: int = 8
    moe_routed_scaling_factor: float = 1.0
    moe_router_logit_softcapping: float = 0.0
    moe_apply_router_weight_on_input: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False

    def kind(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else "full_attention"

    def heads(self, i: int) -> int:
        return self.num_attention_heads_per_layer[i] if self.num_attention_heads_per_layer else self.num_attention_heads

    def sparse(self, i: int) -> bool:
        return self.mlp_layer_types[i] == "sparse" if self.mlp_layer_types else i > 0

    def rope(self, kind: str) -> dict[str, Any]:
        given = (self.rope_parameters or DEFAULT_ROPE).get(kind) or DEFAULT_ROPE[kind]
        config = {"rope_parameters": given, "max_position_embeddings": self.max_position_embeddings}
        return rope_parameters(config, DEFAULT_ROPE[kind]["rope_theta"])


def build(args: LagunaArgs) -> CausalLM:
    if args.moe_apply_router_weight_on_input:
        raise LocalMoEError(
            "this Laguna weighs the experts' inputs by the router (moe_apply_router_weight_on_input), which "
            "transformers 5.24 does not implement either, so localmoe cannot check it: not supported"
        )
    hidden, head_dim = args.hidden_size, args.head_dim
    kinds = sorted({args.kind(i) for i in range(args.num_hidden_layers)})
    rotaries = {kind: RotaryEmbedding(args.rope(kind), head_dim, args.max_position_embeddings) for kind in kinds}
    main = kinds[0]  # the model's rotary; layers of the other kind use theirs through the step

    def attention(i: int) -> Attention:
        kind = args.kind(i)
        return Attention(
            hidden,
            args.heads(i),
            args.num_key_value_heads,
            head_dim,
            qkv_bias=args.attention_bias,
            out_bias=args.attention_bias,
            qk_norm="head",
            norm_eps=args.rms_norm_eps,
            sliding_window=args.sliding_window if kind == "sliding_attention" else None,
            rotary=None if kind == main else rotaries[kind],
            gate="softplus",
            gate_per_head=args.gating is True or args.gating == "per-head",
        )

    def feed_forward(i: int) -> nn.Module:
        if not args.sparse(i):
            return MLP(hidden, args.intermediate_size, args.hidden_act)
        experts, top_k = args.num_experts, args.num_experts_per_tok
        router = biased_sigmoid_router(
            hidden,
            experts,
            top_k,
            scaling=args.moe_routed_scaling_factor,
            softcap=args.moe_router_logit_softcapping,
        )
        return SparseMoE(
            i,
            hidden,
            args.moe_intermediate_size,
            experts,
            top_k,
            router,
            act=GatedActivation(act=args.hidden_act),
            shared_expert=MLP(hidden, args.shared_expert_intermediate_size, args.hidden_act),
        )

    layers = [
        DecoderLayer(attention(i), feed_forward(i), hidden, args.rms_norm_eps) for i in range(args.num_hidden_layers)
    ]
    return CausalLM(
        Backbone(args.vocab_size, hidden, layers, args.rms_norm_eps),
        rotaries[main],
        tie_word_embeddings=args.tie_word_embeddings,
        max_position_embeddings=args.max_position_embeddings,
    )


FAMILY = Family(
    architectures=("LagunaForCausalLM",),
    model_type="laguna",
    args=LagunaArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    # the release's names, then transformers' in-memory ones
    hub_aliases=(
        (".self_attn.gate_proj.", ".self_attn.g_proj."),
        (".mlp.gate.e_score_correction_bias", ".mlp.experts.e_score_correction_bias"),
        (".mlp.shared_expert.", ".mlp.shared_experts."),
    ),
    example="poolside/laguna-XS.2",
)
