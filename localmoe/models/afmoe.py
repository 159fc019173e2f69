"""AFMoE (AfmoeForCausalLM: Arcee's Trinity models, e.g. arcee-ai/Trinity-Mini): sliding-window layers with
rotary and, every `global_attn_every_n_layers`, full attention without position embeddings; per-head q/k
norms and a sigmoid gate on every attention output channel; norms before and after both the attention
and the feed-forward; dense first layers, then experts routed by sigmoid scores with a learned bias
steering the choice, renormalised and scaled, beside shared experts; with `mup_enabled` the embeddings
are scaled by sqrt(hidden)."""

from dataclasses import dataclass, field

import torch
from torch import nn

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, causal_lm
from localmoe.models.layers import MLP, CausalLM, Step, UpcastRMSNorm
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GatedActivation, SparseMoE, biased_sigmoid_router


@dataclass
class AfmoeArgs(ModelArgs):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = 128
    moe_intermediate_size: int = 1408
    num_dense_layers: int = 1
    num_experts: int = 64
    num_experts_per_tok: int = 6
    num_shared_experts: int = 2
    route_scale: float = 1.0
    global_attn_every_n_layers: int = 4
    sliding_window: int = 1024
    layer_types: list[str] | None = None
    mup_enabled: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 16384
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)

    def sliding(self, i: int) -> bool:
        if self.layer_types is not None:
            return self.layer_types[i] == "sliding_attention"
        return (i + 1) % self.global_attn_every_n_layers != 0


class AfmoeDecoderLayer(nn.Module):
    """Norms around each branch: h + post(attention(input_norm(h))), then h + post_mlp(mlp(pre_mlp(h)))."""

    def __init__(self, attention: nn.Module, mlp: nn.Module, hidden: int, eps: float):
        super().__init__()
        self.self_attn, self.mlp = attention, mlp
        self.input_layernorm = UpcastRMSNorm(hidden, eps)
        self.post_attention_layernorm = UpcastRMSNorm(hidden, eps)
        self.pre_mlp_layernorm = UpcastRMSNorm(hidden, eps)
        self.post_mlp_layernorm = UpcastRMSNorm(hidden, eps)

    def forward(self, h: torch.Tensor, step: Step, kv) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), step, kv))
        return h + self.post_mlp_layernorm(self.mlp(self.pre_mlp_layernorm(h)))


def build(args: AfmoeArgs) -> CausalLM:
    hidden, head_dim = args.hidden_size, args.attention_head_dim

    def attention(i: int) -> Attention:
        sliding = args.sliding(i)
        return Attention(
            hidden,
            args.num_attention_heads,
            args.key_value_heads,
            head_dim,
            qkv_bias=args.attention_bias,
            out_bias=args.attention_bias,
            qk_norm="head",
            norm_eps=args.rms_norm_eps,
            norm=UpcastRMSNorm,
            sliding_window=args.sliding_window if sliding else None,
            rope=sliding,
            gate="sigmoid",
        )

    def feed_forward(i: int) -> nn.Module:
        if i < args.num_dense_layers:
            return MLP(hidden, args.intermediate_size, args.hidden_act)
        experts, top_k = args.num_experts, args.num_experts_per_tok
        router = biased_sigmoid_router(hidden, experts, top_k, scaling=args.route_scale)
        shared = MLP(hidden, args.moe_intermediate_size * args.num_shared_experts, args.hidden_act)
        return SparseMoE(
            i,
            hidden,
            args.moe_intermediate_size,
            experts,
            top_k,
            router,
            act=GatedActivation(act=args.hidden_act),
            shared_expert=shared,
        )

    layers = [
        AfmoeDecoderLayer(attention(i), feed_forward(i), hidden, args.rms_norm_eps)
        for i in range(args.num_hidden_layers)
    ]
    return causal_lm(args, layers, head_dim, norm=UpcastRMSNorm, embed_scale=hidden**0.5 if args.mup_enabled else 1.0)


FAMILY = Family(
    architectures=("AfmoeForCausalLM",),
    model_type="afmoe",
    args=AfmoeArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    hub_aliases=(
        (".mlp.gate.weight", ".mlp.router.gate.weight"),
        (".mlp.gate.e_score_correction_bias", ".mlp.expert_bias"),
        (".mlp.shared_expert.", ".mlp.shared_experts."),
    ),
    # transformers keeps AFMoE's norms and expert bias in float32 whatever the compute dtype
    keep_float32=("norm", "e_score_correction_bias"),
    example="arcee-ai/Trinity-Mini",
)
