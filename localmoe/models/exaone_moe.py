"""K-EXAONE (ExaoneMoeForCausalLM, LG AI Research): sliding-window layers with rotary and global layers
without positions (NoPE) as `layer_types` alternates them, per-head q/k RMSNorm, dense layers as
`mlp_layer_types` says, and DeepSeek-V3's MoE: sigmoid routing whose correction bias steers the choice
of experts, plus shared experts. The multi-token-prediction layers (mtp.*) are not used."""

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from localmoe.errors import LocalMoEError
from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, causal_lm
from localmoe.models.layers import MLP, CausalLM, DecoderLayer
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, sigmoid_moe


@dataclass
class ExaoneMoeArgs(ModelArgs):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"num_experts": ("num_local_experts",)}

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 32
    head_dim: int | None = None
    moe_intermediate_size: int = 1024
    num_experts: int = 64
    num_experts_per_tok: int = 8
    num_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 1
    mlp_layer_types: list[str] | None = None
    sliding_window: int | None = 4096
    sliding_window_pattern: int | str | None = 4
    layer_types: list[str] | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mlp_layer_types is None:
            self.mlp_layer_types = [
                "dense" if i < self.first_k_dense_replace else "sparse" for i in range(self.num_hidden_layers)
            ]
        if self.layer_types is None:
            if self.sliding_window is None:  # (transformers 5.24 divides by a zero pattern here and fails)
                self.layer_types = ["full_attention"] * self.num_hidden_layers
            elif isinstance(self.sliding_window_pattern, int) and self.sliding_window_pattern > 0:
                pattern = self.sliding_window_pattern
                self.layer_types = [
                    "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                    for i in range(self.num_hidden_layers)
                ]
            else:
                raise LocalMoEError(
                    f"K-EXAONE's config has no layer_types and a sliding_window_pattern "
                    f"({self.sliding_window_pattern!r}) transformers does not read either: the config is damaged"
                )

    def sliding(self, i: int) -> bool:
        return self.layer_types[i] == "sliding_attention"


def build(args: ExaoneMoeArgs) -> CausalLM:
    hidden = args.hidden_size
    head_dim = args.attention_head_dim

    def feed_forward(i: int) -> nn.Module:
        if args.mlp_layer_types[i] == "dense":
            return MLP(hidden, args.intermediate_size, args.hidden_act)
        return sigmoid_moe(
            i,
            hidden,
            args.moe_intermediate_size,
            args.num_experts,
            args.num_experts_per_tok,
            shared=args.moe_intermediate_size * args.num_shared_experts,
            act=args.hidden_act,
            n_group=args.n_group,
            topk_group=args.topk_group,
            normalize=args.norm_topk_prob,
            scaling=args.routed_scaling_factor,
        )

    layers = [
        DecoderLayer(
            Attention(
                hidden,
                args.num_attention_heads,
                args.key_value_heads,
                head_dim,
                qk_norm="head",
                norm_eps=args.rms_norm_eps,
                sliding_window=args.sliding_window if args.sliding(i) else None,
                # global layers of a model with windows attend without positions
                rope=args.sliding_window is None or args.sliding(i),
            ),
            feed_forward(i),
            hidden,
            args.rms_norm_eps,
        )
        for i in range(args.num_hidden_layers)
    ]
    return causal_lm(args, layers, head_dim)


FAMILY = Family(
    architectures=("ExaoneMoeForCausalLM",),
    model_type="exaone_moe",
    args=ExaoneMoeArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    hub_aliases=(
        (".mlp.gate.e_score_correction_bias", ".mlp.e_score_correction_bias"),
        (".mlp.shared_expert.", ".mlp.shared_experts."),
    ),
    keep_float32=("e_score_correction_bias",),
    example="LGAI-EXAONE/K-EXAONE-236B-A23B",
)
