"""Lara-4-Mini (LaraMiniForCausalLM, translated): in each period of five layers two are Gated DeltaNet
linear attention (Qwen3.5's, its input projections fused into one `in_proj` on the Hub, its gated norm
called `out_norm`), two sliding-window attention with rotary and one full attention without position
embeddings, both with q/k norms; every layer MoE with renormalised softmax top-k routing (in float32)
and a shared expert added unweighted. Its norms scale in float32."""

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from localmoe.models import qwen3_5_moe
from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, causal_lm
from localmoe.models.gated_deltanet import DELTANET_ALIASES, GatedDeltaNet
from localmoe.models.layers import MLP, CausalLM, DecoderLayer, UpcastRMSNorm
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GatedActivation, SparseMoE, TopKRouter

PATTERN = ("linear_attention", "sliding_attention", "linear_attention", "full_attention", "sliding_attention")


@dataclass
class LaraMiniArgs(qwen3_5_moe.Qwen3_5MoeArgs):
    default_rope: ClassVar[dict] = {}  # the whole head rotates

    num_key_value_heads: int = 4
    head_dim: int | None = 128
    linear_num_key_heads: int = 8
    linear_num_value_heads: int = 16
    num_experts: int = 128
    num_experts_per_tok: int = 4
    norm_topk_prob: bool = True
    sliding_window: int | None = 512
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = [PATTERN[i % len(PATTERN)] for i in range(self.num_hidden_layers)]


def token_mixer(args: LaraMiniArgs, i: int) -> nn.Module:
    kind = args.layer_types[i]
    if kind == "linear_attention":
        return GatedDeltaNet(args, fused=True, norm=UpcastRMSNorm)
    sliding = kind == "sliding_attention"
    return Attention(
        args.hidden_size,
        args.num_attention_heads,
        args.key_value_heads,
        args.attention_head_dim,
        qkv_bias=args.attention_bias,
        out_bias=args.attention_bias,
        qk_norm="head",
        norm_eps=args.rms_norm_eps,
        norm=UpcastRMSNorm,
        sliding_window=args.sliding_window if sliding else None,
        rope=sliding,
    )


def sparse_moe(args: LaraMiniArgs, i: int) -> SparseMoE:
    hidden, experts, top_k = args.hidden_size, args.num_experts, args.num_experts_per_tok
    return SparseMoE(
        i,
        hidden,
        args.moe_intermediate_size,
        experts,
        top_k,
        TopKRouter(hidden, experts, top_k, normalize=args.norm_topk_prob),
        act=GatedActivation(act=args.hidden_act),
        shared_expert=MLP(hidden, args.shared_expert_intermediate_size, args.hidden_act),
    )


def build(args: LaraMiniArgs) -> CausalLM:
    layers = [
        DecoderLayer(token_mixer(args, i), sparse_moe(args, i), args.hidden_size, args.rms_norm_eps, norm=UpcastRMSNorm)
        for i in range(args.num_hidden_layers)
    ]
    return causal_lm(args, layers, args.attention_head_dim, norm=UpcastRMSNorm)


FAMILY = Family(
    architectures=("LaraMiniForCausalLM",),
    model_type="lara_mini",
    args=LaraMiniArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    hub_aliases=(*DELTANET_ALIASES, (".self_attn.norm.", ".linear_attn.out_norm.")),
    keep_float32=("mlp.gate.weight",),
    example="translated/Lara-4-Mini-Base",
)
