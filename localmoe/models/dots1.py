"""dots.llm1 (Dots1ForCausalLM, rednote-hilab): Qwen3's attention (per-head q/k RMSNorm, sliding windows
on the layers `layer_types` marks), dense first layers, and DeepSeek-V3's MoE: sigmoid routing whose
correction bias steers the choice of experts, over the best groups, plus shared experts."""

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, causal_lm
from localmoe.models.layers import MLP, CausalLM, DecoderLayer
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, sigmoid_moe


@dataclass
class Dots1Args(ModelArgs):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"n_routed_experts": ("num_local_experts",)}

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    num_key_value_heads: int | None = 32
    head_dim: int | None = None
    moe_intermediate_size: int = 1408
    n_shared_experts: int | None = None
    n_group: int | None = 1
    topk_group: int | None = 1
    first_k_dense_replace: int | None = 0
    norm_topk_prob: bool | None = False
    routed_scaling_factor: float = 1.0
    sliding_window: int | None = 4096
    max_window_layers: int | None = 62
    layer_types: list[str] | None = None
    attention_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)

    def window(self, i: int) -> int | None:
        """Layer i's sliding window, from `layer_types`, or as transformers derives them without it."""
        if self.layer_types is not None:
            sliding = self.layer_types[i] == "sliding_attention"
        else:
            sliding = self.sliding_window is not None and i >= (self.max_window_layers or 0)
        return self.sliding_window if sliding else None


def build(args: Dots1Args) -> CausalLM:
    hidden = args.hidden_size
    head_dim = args.attention_head_dim

    def feed_forward(i: int) -> nn.Module:
        if i < (args.first_k_dense_replace or 0):
            return MLP(hidden, args.intermediate_size, args.hidden_act)
        return sigmoid_moe(
            i,
            hidden,
            args.moe_intermediate_size,
            args.n_routed_experts,
            args.num_experts_per_tok,
            shared=args.moe_intermediate_size * (args.n_shared_experts or 0),
            act=args.hidden_act,
            n_group=args.n_group or 1,
            topk_group=args.topk_group or 1,
            normalize=bool(args.norm_topk_prob),
            scaling=args.routed_scaling_factor,
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
                sliding_window=args.window(i),
            ),
            feed_forward(i),
            hidden,
            args.rms_norm_eps,
        )
        for i in range(args.num_hidden_layers)
    ]
    return causal_lm(args, layers, head_dim)


FAMILY = Family(
    architectures=("Dots1ForCausalLM",),
    model_type="dots1",
    args=Dots1Args,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    hub_aliases=((".mlp.shared_expert.", ".mlp.shared_experts."),),
    keep_float32=("e_score_correction_bias",),
    example="rednote-hilab/dots.llm1.inst",
)
