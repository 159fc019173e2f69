"""Qwen3.5-MoE (Qwen3_5MoeForCausalLM, and the language model of Qwen3_5MoeForConditionalGeneration,
e.g. Qwen/Qwen3.5-35B-A3B): three layers in four are Gated DeltaNet linear attention, the fourth full
attention with an output gate and partial rotary; norms scale by 1 + weight; every layer is MoE with
renormalised softmax top-k routing and a sigmoid-gated shared expert. The multi-token-prediction layers
(`mtp.*`: fc, pre_fc_norm_embedding, pre_fc_norm_hidden, layers.K (full attention and MoE), norm) are
loaded as `mtp`, for drafts (see localmoe/models/mtp.py); the model's embedding and LM head serve them."""

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, MtpLayout, Multimodal, causal_lm
from localmoe.models.gated_deltanet import DELTANET_ALIASES, GatedDeltaNet
from localmoe.models.layers import MLP, CausalLM, DecoderLayer, ZeroCenteredRMSNorm
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GatedActivation, SparseMoE, TopKRouter
from localmoe.models.mtp import NormedMTPLayer


@dataclass
class Qwen3_5MoeArgs(ModelArgs):
    default_rope: ClassVar[dict] = {"partial_rotary_factor": 0.25}
    # Qwen3.5's configs name the MTP layers' count so; vLLM reads Qwen3-Next's under the other name too
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"mtp_num_hidden_layers": ("num_nextn_predict_layers",)}

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 2
    head_dim: int | None = 256
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    num_experts: int = 256
    num_experts_per_tok: int = 8
    layer_types: list[str] | None = None
    full_attention_interval: int = 4
    attention_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    mtp_num_hidden_layers: int = 0
    rope: dict = field(default_factory=dict)

    def linear(self, i: int) -> bool:
        if self.layer_types:
            return self.layer_types[i] == "linear_attention"
        return (i + 1) % self.full_attention_interval != 0


def token_mixer(args: Qwen3_5MoeArgs, i: int, grouped: bool = False) -> nn.Module:
    """Layer i's Gated DeltaNet (with Qwen3-Next's `grouped` projections) or gated full attention."""
    if args.linear(i):
        return GatedDeltaNet(args, grouped)
    return gated_attention(args)


def gated_attention(args: Qwen3_5MoeArgs, kind: type[Attention] = Attention, **extra) -> Attention:
    """The full attention layers' (and the MTP layers'): an Attention, or a subclass `kind` given `extra`
    arguments of its own (Qwen4-Exp's indexed attention)."""
    return kind(
        args.hidden_size,
        args.num_attention_heads,
        args.key_value_heads,
        args.attention_head_dim,
        qkv_bias=args.attention_bias,
        out_bias=args.attention_bias,
        qk_norm="head",
        norm_eps=args.rms_norm_eps,
        output_gate=True,
        norm=ZeroCenteredRMSNorm,
        **extra,
    )


def sparse_moe(args: Qwen3_5MoeArgs, i: int, normalize: bool = True) -> SparseMoE:
    """Softmax top-k routed experts with a sigmoid-gated shared expert."""
    hidden, experts, top_k = args.hidden_size, args.num_experts, args.num_experts_per_tok
    return SparseMoE(
        i,
        hidden,
        args.moe_intermediate_size,
        experts,
        top_k,
        TopKRouter(hidden, experts, top_k, normalize=normalize),
        act=GatedActivation(act=args.hidden_act),
        shared_expert=MLP(hidden, args.shared_expert_intermediate_size, args.hidden_act),
        shared_expert_gate=True,
    )


def decoder(args: Qwen3_5MoeArgs, layers: list[DecoderLayer], feed_forward) -> CausalLM:
    """The model around `layers`, with its MTP layers: full attention, and the feed-forward
    `feed_forward(layer index, MTP depth)` gives; each passes its final norm's output on to the next draft,
    as vLLM's qwen3_5_mtp.py and qwen3_next_mtp.py and SGLang's qwen3_5_mtp.py return it."""
    first = args.num_hidden_layers
    mtp = [
        DecoderLayer(
            gated_attention(args), feed_forward(first + k, k), args.hidden_size, args.rms_norm_eps, ZeroCenteredRMSNorm
        )
        for k in range(args.mtp_num_hidden_layers)
    ]
    return causal_lm(args, layers, args.attention_head_dim, norm=ZeroCenteredRMSNorm, mtp=mtp, mtp_layer=NormedMTPLayer)


def build(args: Qwen3_5MoeArgs) -> CausalLM:
    layers = [
        DecoderLayer(
            token_mixer(args, i), sparse_moe(args, i), args.hidden_size, args.rms_norm_eps, norm=ZeroCenteredRMSNorm
        )
        for i in range(args.num_hidden_layers)
    ]
    return decoder(args, layers, lambda i, _: sparse_moe(args, i))


# Qwen3-Next's and Qwen3.5's MTP layers, `mtp.*`, seen under DeepSeek-V3's names with the final norm of a
# NormedMTPLayer (K-EXAONE and Mellum store theirs so too)
QWEN_MTP = MtpLayout(
    "mtp_num_hidden_layers",
    (
        ("model.layers.{layer}.enorm.", "mtp.pre_fc_norm_embedding."),
        ("model.layers.{layer}.hnorm.", "mtp.pre_fc_norm_hidden."),
        ("model.layers.{layer}.eh_proj.", "mtp.fc."),
        ("model.layers.{layer}.final_layernorm.", "mtp.norm."),
        ("model.layers.{layer}.", "mtp.layers.{depth}."),
    ),
)


FAMILY = Family(
    architectures=("Qwen3_5MoeForCausalLM",),
    model_type="qwen3_5_moe_text",
    args=Qwen3_5MoeArgs,
    model=build,
    experts=(FUSED_EXPERTS, PerExpert(MLP_EXPERTS)),
    hub_aliases=DELTANET_ALIASES,
    # the vision tower is left on disk
    multimodal=(
        Multimodal(
            "Qwen3_5MoeForConditionalGeneration",
            (("model.", "model.language_model."), ("lm_head.", "lm_head."), ("mtp.", "mtp.")),
        ),
    ),
    mtp=QWEN_MTP,
    example="Qwen/Qwen3.5-35B-A3B",
)
