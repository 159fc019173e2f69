"""GLM-4.5 and GLM-4.5-Air (Glm4MoeForCausalLM): grouped-query attention with q/k/v biases, rotary on
part of each head (half by default), optional per-head q/k norm, dense first layers, shared experts,
and DeepSeek-V3's sigmoid routing with a correction bias. Its multi-token-prediction layers are stored as
DeepSeek-V3's (`model.layers.{num_hidden_layers}.*`) and loaded as `mtp` (see localmoe/models/mtp.py)."""

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import DEEPSEEK_MTP, Family, ModelArgs, causal_lm
from localmoe.models.layers import MLP, CausalLM, DecoderLayer
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, sigmoid_moe
from localmoe.models.mtp import NormedMTPLayer


@dataclass
class Glm4MoeArgs(ModelArgs):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"n_routed_experts": ("num_local_experts",)}
    default_rope: ClassVar[dict] = {"partial_rotary_factor": 0.5}

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 8
    head_dim: int | None = None
    moe_intermediate_size: int = 1408
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    n_routed_experts: int = 128
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    use_qk_norm: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0  # transformers says 1; a config that does not say so promises none
    rope: dict = field(default_factory=dict)


def build(args: Glm4MoeArgs, attention: type[Attention] = Attention) -> CausalLM:
    """The model; `attention` is the attention class, for families that store its weights otherwise."""
    hidden = args.hidden_size
    head_dim = args.attention_head_dim
    layers = [
        DecoderLayer(
            attention(
                hidden,
                args.num_attention_heads,
                args.key_value_heads,
                head_dim,
                qkv_bias=args.attention_bias,
                qk_norm="head" if args.use_qk_norm else None,
                norm_eps=args.rms_norm_eps,
            ),
            feed_forward(args, i),
            hidden,
            args.rms_norm_eps,
        )
        for i in range(args.num_hidden_layers + args.num_nextn_predict_layers)
    ]
    mtp = layers[args.num_hidden_layers :]  # each passing its final norm's output on, as DeepSeek-V3's do
    return causal_lm(args, layers[: args.num_hidden_layers], head_dim, mtp=mtp, mtp_layer=NormedMTPLayer)


def feed_forward(args: Glm4MoeArgs, i: int) -> nn.Module:
    """Layer i's dense MLP, or its MoE block (see `sigmoid_moe`)."""
    if i < args.first_k_dense_replace:
        return MLP(args.hidden_size, args.intermediate_size, args.hidden_act)
    return sigmoid_moe(
        i,
        args.hidden_size,
        args.moe_intermediate_size,
        args.n_routed_experts,
        args.num_experts_per_tok,
        shared=args.moe_intermediate_size * args.n_shared_experts,
        act=args.hidden_act,
        n_group=args.n_group,
        topk_group=args.topk_group,
        normalize=args.norm_topk_prob,
        scaling=args.routed_scaling_factor,
    )


FAMILY = Family(
    architectures=("Glm4MoeForCausalLM",),
    model_type="glm4_moe",
    args=Glm4MoeArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    hub_aliases=((".mlp.shared_expert.", ".mlp.shared_experts."),),
    keep_float32=("e_score_correction_bias",),
    mtp=DEEPSEEK_MTP,
    example="zai-org/GLM-4.5-Air",
)
