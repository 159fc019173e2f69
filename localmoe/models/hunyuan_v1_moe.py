"""Hunyuan-A13B (HunYuanMoEV1ForCausalLM): per-head q/k RMSNorm after the rotary, NTK-alpha rotary, and
MoE layers whose routed experts and one shared MLP are as wide as `intermediate_size`; softmax top-k
routing renormalised, the router kept in float32."""

from dataclasses import dataclass, field

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, causal_lm
from localmoe.models.layers import MLP, CausalLM, DecoderLayer
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GatedActivation, SparseMoE, TopKRouter


@dataclass
class HunyuanMoeArgs(ModelArgs):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    num_experts: int = 1
    moe_topk: int | list[int] = 1  # one number, or one per layer
    attention_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)

    def top_k(self, i: int) -> int:
        return self.moe_topk[i] if isinstance(self.moe_topk, list) else self.moe_topk


def build(args: HunyuanMoeArgs) -> CausalLM:
    hidden, experts = args.hidden_size, args.num_experts
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
                qk_norm="head_after_rope",
                norm_eps=args.rms_norm_eps,
            ),
            SparseMoE(
                i,
                hidden,
                args.intermediate_size,
                experts,
                args.top_k(i),
                TopKRouter(hidden, experts, args.top_k(i), normalize=True),
                act=GatedActivation(act=args.hidden_act),
                shared_expert=MLP(hidden, args.intermediate_size, args.hidden_act),
            ),
            hidden,
            args.rms_norm_eps,
        )
        for i in range(args.num_hidden_layers)
    ]
    return causal_lm(args, layers, head_dim)


FAMILY = Family(
    architectures=("HunYuanMoEV1ForCausalLM",),
    model_type="hunyuan_v1_moe",
    args=HunyuanMoeArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    hub_aliases=(
        (".mlp.gate.weight", ".mlp.gate.wg.weight"),
        (".mlp.shared_expert.", ".mlp.shared_mlp."),
        (".self_attn.q_norm.", ".self_attn.query_layernorm."),
        (".self_attn.k_norm.", ".self_attn.key_layernorm."),
    ),
    keep_float32=("mlp.gate.weight",),
    example="tencent/Hunyuan-A13B-Instruct",
)
