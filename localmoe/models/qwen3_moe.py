"""Qwen3-MoE (Qwen3MoeForCausalLM): per-head q/k RMSNorm, optional top-k renormalisation, and dense
layers where `mlp_only_layers` or `decoder_sparse_step` say so."""

from dataclasses import dataclass, field
from typing import ClassVar

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, causal_lm
from localmoe.models.layers import MLP, CausalLM, DecoderLayer
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GatedActivation, SparseMoE, TopKRouter


@dataclass
class Qwen3MoeArgs(ModelArgs):
    # Hub configs say num_experts; transformers 5 saves the same value as num_local_experts.
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"num_experts": ("num_local_experts",)}

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 4
    head_dim: int | None = None
    moe_intermediate_size: int = 768
    num_experts: int = 128
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    max_position_embeddings: int = 32768
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)

    def is_moe_layer(self, i: int) -> bool:
        return (
            i not in (self.mlp_only_layers or []) and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0
        )


def build(args: Qwen3MoeArgs) -> CausalLM:
    head_dim = args.attention_head_dim
    window = args.sliding_window if args.use_sliding_window else None

    def feed_forward(i: int):
        if not args.is_moe_layer(i):
            return MLP(args.hidden_size, args.intermediate_size, args.hidden_act)
        router = TopKRouter(args.hidden_size, args.num_experts, args.num_experts_per_tok, args.norm_topk_prob)
        return SparseMoE(
            i,
            args.hidden_size,
            args.moe_intermediate_size,
            args.num_experts,
            args.num_experts_per_tok,
            router,
            act=GatedActivation(act=args.hidden_act),
        )

    layers = [
        DecoderLayer(
            Attention(
                args.hidden_size,
                args.num_attention_heads,
                args.key_value_heads,
                head_dim,
                qkv_bias=args.attention_bias,
                out_bias=args.attention_bias,
                qk_norm="head",
                norm_eps=args.rms_norm_eps,
                sliding_window=window,
            ),
            feed_forward(i),
            args.hidden_size,
            args.rms_norm_eps,
        )
        for i in range(args.num_hidden_layers)
    ]
    return causal_lm(args, layers, head_dim)


FAMILY = Family(
    architectures=("Qwen3MoeForCausalLM",),
    model_type="qwen3_moe",
    args=Qwen3MoeArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    example="Qwen/Qwen3-30B-A3B-Instruct-2507",
)
