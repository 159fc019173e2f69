"""Mixtral (MixtralForCausalLM): softmax top-k routing with renormalised weights, optional sliding window."""

from dataclasses import dataclass, field
from typing import ClassVar

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, causal_lm
from localmoe.models.layers import CausalLM, DecoderLayer
from localmoe.models.moe import FUSED_EXPERTS, MIXTRAL_EXPERTS, GatedActivation, SparseMoE, TopKRouter


@dataclass
class MixtralArgs(ModelArgs):
    default_rope_theta: ClassVar[float] = 1_000_000.0

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 8
    head_dim: int | None = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096 * 32
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)


def build(args: MixtralArgs) -> CausalLM:
    hidden, experts, top_k = args.hidden_size, args.num_local_experts, args.num_experts_per_tok
    head_dim = args.attention_head_dim
    layers = [
        DecoderLayer(
            Attention(
                hidden,
                args.num_attention_heads,
                args.key_value_heads,
                head_dim,
                sliding_window=args.sliding_window,
            ),
            SparseMoE(
                i,
                hidden,
                args.intermediate_size,
                experts,
                top_k,
                TopKRouter(hidden, experts, top_k, normalize=True),
                act=GatedActivation(act=args.hidden_act),
            ),
            hidden,
            args.rms_norm_eps,
        )
        for i in range(args.num_hidden_layers)
    ]
    return causal_lm(args, layers, head_dim)


FAMILY = Family(
    architectures=("MixtralForCausalLM",),
    model_type="mixtral",
    args=MixtralArgs,
    model=build,
    experts=(
        PerExpert(MIXTRAL_EXPERTS),
        FUSED_EXPERTS,
    ),
    hub_aliases=((".mlp.gate.", ".block_sparse_moe.gate."),),
    example="mistralai/Mixtral-8x7B-Instruct-v0.1",
)
