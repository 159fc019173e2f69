"""OLMoE (OlmoeForCausalLM): q/k RMSNorm over the whole projection (not per head), optional clipping of
q/k/v, softmax top-k routing."""

from dataclasses import dataclass, field
from typing import ClassVar

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, causal_lm
from localmoe.models.layers import CausalLM, DecoderLayer, RMSNorm
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GatedActivation, SparseMoE, TopKRouter


@dataclass
class OlmoeArgs(ModelArgs):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"num_experts": ("num_local_experts",)}

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    num_experts: int = 64
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    attention_bias: bool = False
    clip_qkv: float | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)


def build(args: OlmoeArgs, layer=DecoderLayer, norm=RMSNorm) -> CausalLM:
    """OLMoE; FlexOlmo (OLMo 2's layer) gives its own `layer` class and `norm`."""
    hidden, experts, top_k = args.hidden_size, args.num_experts, args.num_experts_per_tok
    head_dim = args.attention_head_dim
    layers = [
        layer(
            Attention(
                hidden,
                args.num_attention_heads,
                args.key_value_heads,
                head_dim,
                qkv_bias=args.attention_bias,
                out_bias=args.attention_bias,
                qk_norm="full",
                norm_eps=args.rms_norm_eps,
                clip_qkv=args.clip_qkv,
                norm=norm,
            ),
            SparseMoE(
                i,
                hidden,
                args.intermediate_size,
                experts,
                top_k,
                TopKRouter(hidden, experts, top_k, args.norm_topk_prob),
                act=GatedActivation(act=args.hidden_act),
            ),
            hidden,
            args.rms_norm_eps,
        )
        for i in range(args.num_hidden_layers)
    ]
    return causal_lm(args, layers, head_dim, norm=norm)


FAMILY = Family(
    architectures=("OlmoeForCausalLM",),
    model_type="olmoe",
    args=OlmoeArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    example="allenai/OLMoE-1B-7B-0125-Instruct",
)
