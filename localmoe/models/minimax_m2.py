"""MiniMax-M2 (MiniMaxM2ForCausalLM): grouped-query attention with q/k RMSNorm over the whole projection
and partial rotary, and every layer a MoE whose sigmoid routing picks experts with a correction bias
that does not enter their weights; Mixtral's expert names."""

from dataclasses import dataclass, field
from typing import Any, ClassVar

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, causal_lm
from localmoe.models.layers import CausalLM, DecoderLayer
from localmoe.models.moe import FUSED_EXPERTS, MIXTRAL_EXPERTS, GatedActivation, GroupedTopKRouter, SparseMoE


@dataclass
class MiniMaxM2Args(ModelArgs):
    default_rope_theta: ClassVar[float] = 5_000_000.0
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"num_local_experts": ("num_experts",)}

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    rotary_dim: int | None = None  # older configs: the rotated width instead of partial_rotary_factor
    num_local_experts: int = 256
    num_experts_per_tok: int = 8
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 196608
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "MiniMaxM2Args":
        if config.get("rotary_dim") and config.get("partial_rotary_factor") is None:
            head_dim = config.get("head_dim") or 128
            config = {**config, "partial_rotary_factor": config["rotary_dim"] / head_dim}
        return super().from_config(config)


def build(args: MiniMaxM2Args) -> CausalLM:
    hidden, experts, top_k = args.hidden_size, args.num_local_experts, args.num_experts_per_tok
    head_dim = args.attention_head_dim
    router = lambda: GroupedTopKRouter(  # noqa: E731
        hidden,
        experts,
        top_k,
        scoring="sigmoid",
        n_group=1,
        topk_group=1,
        normalize=True,
        scaling=1.0,
        correction_bias=True,
    )
    layers = [
        DecoderLayer(
            Attention(
                hidden,
                args.num_attention_heads,
                args.key_value_heads,
                head_dim,
                qk_norm="full",
                norm_eps=args.rms_norm_eps,
            ),
            SparseMoE(
                i, hidden, args.intermediate_size, experts, top_k, router(), act=GatedActivation(act=args.hidden_act)
            ),
            hidden,
            args.rms_norm_eps,
        )
        for i in range(args.num_hidden_layers)
    ]
    return causal_lm(args, layers, head_dim)


FAMILY = Family(
    architectures=("MiniMaxM2ForCausalLM",),
    model_type="minimax_m2",
    args=MiniMaxM2Args,
    model=build,
    experts=(PerExpert(MIXTRAL_EXPERTS), FUSED_EXPERTS),
    # the correction bias belongs to the block on disk ("mlp." in transformers' memory), to the router here
    hub_aliases=(
        (".mlp.gate.e_score_correction_bias", ".block_sparse_moe.e_score_correction_bias"),
        (".mlp.gate.e_score_correction_bias", ".mlp.e_score_correction_bias"),
        (".mlp.gate.", ".block_sparse_moe.gate."),
    ),
    keep_float32=("e_score_correction_bias",),
    example="MiniMaxAI/MiniMax-M2",
)
