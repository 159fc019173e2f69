"""Hy3 (HYV3ForCausalLM, Tencent): grouped-query attention with per-head q/k RMSNorm, a dense first
layer (or as `mlp_layer_types` says), and MoE layers whose sigmoid routing picks experts with a
correction bias, renormalises the chosen weights and scales them by `router_scaling_factor`, plus a
shared expert. transformers adds the shared expert in float32 (`enable_moe_fp32_combine`): for a
single addition that rounds exactly as adding in the compute dtype does.

Its multi-token-prediction layer (`model.layers.{num_hidden_layers}.*`: enorm, hnorm, eh_proj, an MoE decoder
layer of the model's kind, final_layernorm) is loaded as `mtp` for drafts, as vLLM's hy_v3_mtp.py
(HYV3MultiTokenPredictorLayer) builds it: its output passes final_layernorm, then goes to the LM head as it is
and to the next draft (`NormedMTPLayer`); the model's embedding and LM head serve it."""

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, causal_lm
from localmoe.models.layers import MLP, CausalLM, DecoderLayer
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, sigmoid_moe
from localmoe.models.mtp import NormedMTPLayer


@dataclass
class HYV3Args(ModelArgs):
    default_rope_theta: ClassVar[float] = 11_158_840.0
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"num_experts": ("num_local_experts",)}

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 8
    head_dim: int | None = 128
    moe_intermediate_size: int = 1536
    num_experts: int = 192
    num_experts_per_tok: int = 8
    num_shared_experts: int = 1
    router_scaling_factor: float = 2.826
    mlp_layer_types: list[str] | None = None
    attention_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0  # a config that does not say so promises none
    rope: dict = field(default_factory=dict)

    def is_dense(self, i: int) -> bool:
        # the MTP layer past the list is an MoE one (vLLM: from first_k_dense_replace on, every layer)
        if self.mlp_layer_types is not None:
            return i < len(self.mlp_layer_types) and self.mlp_layer_types[i] == "dense"
        return i == 0


def build(args: HYV3Args) -> CausalLM:
    hidden = args.hidden_size
    head_dim = args.attention_head_dim

    def feed_forward(i: int) -> nn.Module:
        if args.is_dense(i):
            return MLP(hidden, args.intermediate_size, args.hidden_act)
        return sigmoid_moe(
            i,
            hidden,
            args.moe_intermediate_size,
            args.num_experts,
            args.num_experts_per_tok,
            shared=args.moe_intermediate_size * args.num_shared_experts,
            act=args.hidden_act,
            scaling=args.router_scaling_factor,
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
            ),
            feed_forward(i),
            hidden,
            args.rms_norm_eps,
        )
        for i in range(args.num_hidden_layers + args.num_nextn_predict_layers)
    ]
    backbone, mtp = layers[: args.num_hidden_layers], layers[args.num_hidden_layers :]
    return causal_lm(args, backbone, head_dim, mtp=mtp, mtp_layer=NormedMTPLayer)


FAMILY = Family(
    architectures=("HYV3ForCausalLM",),
    model_type="hy_v3",
    args=HYV3Args,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    # on disk the correction bias belongs to the block, the router is `router.gate`, the shared expert `shared_mlp`
    hub_aliases=(
        (".mlp.gate.e_score_correction_bias", ".mlp.expert_bias"),
        (".mlp.gate.e_score_correction_bias", ".mlp.e_score_correction_bias"),
        (".mlp.gate.weight", ".mlp.router.gate.weight"),
        (".mlp.shared_expert.", ".mlp.shared_mlp."),
        (".mlp.shared_expert.", ".mlp.shared_experts."),
    ),
    keep_float32=("e_score_correction_bias", ".mlp.gate.weight"),
    example="tencent/Hy3-preview",
)
