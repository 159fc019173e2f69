"""MiMo-V2-Flash (MiMoV2FlashForCausalLM, Xiaomi): global layers and sliding-window layers, each kind
with its own rotary on part of the head; the windowed layers have twice the KV heads and attention
sinks; values are narrower than queries and keys (`v_head_dim`) and scaled by `attention_value_scale`;
a dense first layer, then MoE layers with DeepSeek-V3's sigmoid routing (a correction bias steers the
choice of experts, over the best groups) and no shared expert. Its multi-token-prediction layers
(`model.mtp.layers.{k}`, three in the release) are sliding-window layers with a dense MLP (vLLM's
mimo_v2_flash_mtp.py, SGLang's mimo_v2_flash_nextn.py: MiMoV2MTPLayer), loaded as `mtp` for drafts (see
localmoe/models/mtp.py); each passes its final norm's output on, as vLLM's mimo_v2_mtp.py returns it."""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, MtpLayout
from localmoe.models.layers import MLP, Backbone, CausalLM, DecoderLayer
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, sigmoid_moe
from localmoe.models.mtp import MultiTokenPredictor, NormedMTPLayer
from localmoe.models.rotary import RotaryEmbedding, rope_parameters

# transformers' rotary per kind of layer where the config gives none (the release's thetas)
DEFAULT_ROPE = {
    "full_attention": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.334},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.334},
}


@dataclass
class MiMoV2FlashArgs(ModelArgs):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"n_routed_experts": ("num_local_experts",)}

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 4
    head_dim: int = 192
    v_head_dim: int = 128
    attention_value_scale: float | None = 0.707
    sliding_window: int = 129
    sliding_window_size: int | None = None  # the release's spelling: the window less the query itself
    layer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None
    rope_parameters: dict | None = None  # one set per kind of layer
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float | None = 1.0
    attention_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0

    def __post_init__(self):
        if self.sliding_window_size is not None:
            self.sliding_window = self.sliding_window_size + 1
        if self.layer_types is None:
            self.layer_types = [
                "full_attention" if i == 0 or (i + 1) % 6 == 0 else "sliding_attention"
                for i in range(self.num_hidden_layers)
            ]
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["dense"] + ["sparse"] * (self.num_hidden_layers - 1)

    def rope(self, kind: str) -> dict[str, Any]:
        given = (self.rope_parameters or DEFAULT_ROPE)[kind]
        # transformers' default rotary (not the scaled kinds) covers a third of the head unless told otherwise
        plain = given.get("rope_type", "default") == "default"
        defaults = {"partial_rotary_factor": 0.334} if plain else {}
        return rope_parameters({"rope_parameters": given}, DEFAULT_ROPE[kind]["rope_theta"], defaults)


class ScaledValueAttention(Attention):
    """Attention whose values are multiplied by a constant as they are projected."""

    def __init__(self, *args, value_scale: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.value_scale = value_scale

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(x)
        return q, k, v * self.value_scale


def build(args: MiMoV2FlashArgs) -> CausalLM:
    hidden = args.hidden_size
    kinds = sorted(set(args.layer_types))
    # the MTP layers are sliding-window ones whatever the backbone's kinds
    needed = kinds + ["sliding_attention"] * (args.num_nextn_predict_layers > 0)
    rotaries = {kind: RotaryEmbedding(args.rope(kind), args.head_dim, args.max_position_embeddings) for kind in needed}
    main = kinds[0]  # the model's rotary; layers of the other kind use theirs through the step

    def attention(kind: str) -> nn.Module:
        sliding = kind == "sliding_attention"
        return ScaledValueAttention(
            hidden,
            args.num_attention_heads,
            args.num_key_value_heads * (2 if sliding else 1),
            args.head_dim,
            qkv_bias=args.attention_bias,
            sliding_window=args.sliding_window if sliding else None,
            sinks=sliding,
            rotary=None if kind == main else rotaries[kind],
            v_head_dim=args.v_head_dim,
            value_scale=1.0 if args.attention_value_scale is None else args.attention_value_scale,
        )

    def feed_forward(i: int) -> nn.Module:
        if args.mlp_layer_types[i] == "dense":
            return MLP(hidden, args.intermediate_size, args.hidden_act)
        return sigmoid_moe(
            i,
            hidden,
            args.moe_intermediate_size,
            args.n_routed_experts,
            args.num_experts_per_tok,
            act=args.hidden_act,
            n_group=args.n_group,
            topk_group=args.topk_group,
            normalize=args.norm_topk_prob,
            scaling=1.0 if args.routed_scaling_factor is None else args.routed_scaling_factor,
        )

    layers = [
        DecoderLayer(attention(args.layer_types[i]), feed_forward(i), hidden, args.rms_norm_eps)
        for i in range(args.num_hidden_layers)
    ]
    mtp = [
        NormedMTPLayer(
            DecoderLayer(
                attention("sliding_attention"),
                MLP(hidden, args.intermediate_size, args.hidden_act),
                hidden,
                args.rms_norm_eps,
            ),
            hidden,
            args.rms_norm_eps,
        )
        for _ in range(args.num_nextn_predict_layers)
    ]
    return CausalLM(
        Backbone(args.vocab_size, hidden, layers, args.rms_norm_eps),
        rotaries[main],
        tie_word_embeddings=args.tie_word_embeddings,
        max_position_embeddings=args.max_position_embeddings,
        mtp=MultiTokenPredictor(mtp, args.num_hidden_layers) if mtp else None,
    )


# the release's MTP layers, `model.mtp.layers.{k}.*` (the decoder layer's tensors directly under that prefix,
# its second norm named pre_mlp_layernorm), seen under DeepSeek-V3's names
MIMO_MTP = MtpLayout(
    "num_nextn_predict_layers",
    (
        ("model.layers.{layer}.final_layernorm.", "model.mtp.layers.{depth}.final_layernorm."),
        ("model.layers.{layer}.post_attention_layernorm.", "model.mtp.layers.{depth}.pre_mlp_layernorm."),
        ("model.layers.{layer}.", "model.mtp.layers.{depth}."),
    ),
)


FAMILY = Family(
    architectures=("MiMoV2FlashForCausalLM",),
    model_type="mimo_v2_flash",
    args=MiMoV2FlashArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    hub_aliases=((".self_attn.sinks", ".self_attn.attention_sink_bias"),),
    # the release stores the router weight in float32, like the correction bias
    keep_float32=("e_score_correction_bias", ".mlp.gate.weight"),
    mtp=MIMO_MTP,
    example="XiaomiMiMo/MiMo-V2-Flash",
)
