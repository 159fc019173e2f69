"""Mellum2 (MellumForCausalLM, JetBrains' code models): Qwen3-MoE's attention (per-head q/k RMSNorm)
and routing, with layers of two kinds, each kind with its own rotary (sliding-window layers and full
ones), and dense or MoE feed-forward per layer as `mlp_layer_types` says. The multi-token-prediction
head (mtp.*) is not used."""

from dataclasses import dataclass
from typing import Any, ClassVar

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs
from localmoe.models.layers import MLP, Backbone, CausalLM, DecoderLayer
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GatedActivation, SparseMoE, TopKRouter
from localmoe.models.rotary import RotaryEmbedding, rope_parameters

ROPE_THETAS = {"full_attention": 500_000.0, "sliding_attention": 10_000.0}


@dataclass
class MellumArgs(ModelArgs):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"num_experts": ("num_local_experts",)}

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int = 7168  # dense layers
    moe_intermediate_size: int = 896
    num_key_value_heads: int = 4
    head_dim: int | None = 128
    num_experts: int = 64
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True
    sliding_window: int | None = 1024
    layer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None
    rope_parameters: dict | None = None  # one set per kind of layer
    attention_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False

    def kind(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else "full_attention"

    def rope(self, kind: str) -> dict[str, Any]:
        given = (self.rope_parameters or {}).get(kind) or {"rope_type": "default"}
        config = {"rope_parameters": given, "max_position_embeddings": self.max_position_embeddings}
        return rope_parameters(config, ROPE_THETAS.get(kind, 10_000.0))


def build(args: MellumArgs) -> CausalLM:
    hidden, experts, top_k = args.hidden_size, args.num_experts, args.num_experts_per_tok
    head_dim = args.attention_head_dim
    kinds = sorted({args.kind(i) for i in range(args.num_hidden_layers)})
    rotaries = {kind: RotaryEmbedding(args.rope(kind), head_dim, args.max_position_embeddings) for kind in kinds}
    main = kinds[0]  # the model's rotary; layers of the other kind use theirs through the step

    def feed_forward(i: int):
        if args.mlp_layer_types and args.mlp_layer_types[i] == "dense":
            return MLP(hidden, args.intermediate_size, args.hidden_act)
        router = TopKRouter(hidden, experts, top_k, normalize=args.norm_topk_prob)
        return SparseMoE(
            i, hidden, args.moe_intermediate_size, experts, top_k, router, act=GatedActivation(act=args.hidden_act)
        )

    layers = [
        DecoderLayer(
            Attention(
                hidden,
                args.num_attention_heads,
                args.key_value_heads,
                head_dim,
                qkv_bias=args.attention_bias,
                out_bias=args.attention_bias,
                qk_norm="head",
                norm_eps=args.rms_norm_eps,
                sliding_window=args.sliding_window if args.kind(i) == "sliding_attention" else None,
                rotary=None if args.kind(i) == main else rotaries[args.kind(i)],
            ),
            feed_forward(i),
            hidden,
            args.rms_norm_eps,
        )
        for i in range(args.num_hidden_layers)
    ]
    return CausalLM(
        Backbone(args.vocab_size, hidden, layers, args.rms_norm_eps),
        rotaries[main],
        tie_word_embeddings=args.tie_word_embeddings,
        max_position_embeddings=args.max_position_embeddings,
    )


FAMILY = Family(
    architectures=("MellumForCausalLM",),
    model_type="mellum",
    args=MellumArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    example="JetBrains/Mellum2-12B-A2.5B-Base",
)
