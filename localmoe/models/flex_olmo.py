"""FlexOlmo (FlexOlmoForCausalLM, e.g. allenai/FlexOlmo-7x7B-1T): OLMo 2's layer (q/k RMSNorm over the
whole projection; the norms after attention and after the feed-forward, inside each residual branch,
none before) with OLMoE's softmax top-k routing."""

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, causal_lm
from localmoe.models.layers import CausalLM, Step, UpcastRMSNorm
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GatedActivation, SparseMoE, TopKRouter


@dataclass
class FlexOlmoArgs(ModelArgs):
    default_rope_theta: ClassVar[float] = 500_000.0
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"num_experts": ("num_local_experts",)}

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    num_experts: int = 7
    num_experts_per_tok: int = 5
    norm_topk_prob: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)


class PostNormDecoderLayer(nn.Module):
    """h + norm(attention(h)), then h + norm(mlp(h)) (OLMo 2)."""

    def __init__(self, attention: nn.Module, mlp: nn.Module, hidden: int, eps: float):
        super().__init__()
        self.self_attn, self.mlp = attention, mlp
        self.post_attention_layernorm = UpcastRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = UpcastRMSNorm(hidden, eps)

    def forward(self, h: torch.Tensor, step: Step, kv) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(h, step, kv))
        return h + self.post_feedforward_layernorm(self.mlp(h))


def build(args: FlexOlmoArgs) -> CausalLM:
    hidden, experts, top_k = args.hidden_size, args.num_experts, args.num_experts_per_tok
    head_dim = args.attention_head_dim
    layers = [
        PostNormDecoderLayer(
            Attention(
                hidden,
                args.num_attention_heads,
                args.key_value_heads,
                head_dim,
                qkv_bias=args.attention_bias,
                out_bias=args.attention_bias,
                qk_norm="full",
                norm_eps=args.rms_norm_eps,
                norm=UpcastRMSNorm,
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
    return causal_lm(args, layers, head_dim, norm=UpcastRMSNorm)


FAMILY = Family(
    architectures=("FlexOlmoForCausalLM",),
    model_type="flex_olmo",
    args=FlexOlmoArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    example="allenai/FlexOlmo-7x7B-1T",
)
