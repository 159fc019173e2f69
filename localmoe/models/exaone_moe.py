"""K-EXAONE (ExaoneMoeForCausalLM, LG AI Research): sliding-window layers with rotary and global layers
without positions (NoPE) as `layer_types` alternates them, per-head q/k RMSNorm, dense layers as
`mlp_layer_types` says, and DeepSeek-V3's MoE: sigmoid routing whose correction bias steers the choice
of experts, plus shared experts. Its multi-token-prediction layers (`mtp.*`, in Qwen3-Next's layout: fc,
pre_fc_norm_embedding, pre_fc_norm_hidden, layers.K, norm; transformers drops them) are loaded as `mtp`, for
drafts (see localmoe/models/mtp.py): each a decoder layer with a dense MLP, its attention of the kind
`mtp_layer_types` gives (the release's: full, so without positions) with the window `mtp_sliding_windows`
gives (vLLM's exaone_moe_mtp.py and exaone_moe.py with is_mtp; SGLang's exaone_moe.py). As vLLM's returns
it, the output of its final norm is passed on to the next draft (`NormedMTPLayer`)."""

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from localmoe.errors import LocalMoEError
from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, MtpLayout, causal_lm
from localmoe.models.layers import MLP, CausalLM, DecoderLayer
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, sigmoid_moe
from localmoe.models.mtp import NormedMTPLayer
from localmoe.models.qwen3_5_moe import QWEN_MTP


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
    num_nextn_predict_layers: int = 0
    mtp_layer_types: list[str] | None = None
    mtp_sliding_windows: list[int] | None = None  # 0: no window
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

    def mtp_window(self, k: int) -> int | None:
        """MTP layer k's sliding window, None where it attends to every position (vLLM and SGLang read the
        kind from mtp_layer_types, which they need; without it, full attention, as the release says)."""
        if (self.mtp_layer_types or [])[k : k + 1] != ["sliding_attention"]:
            return None
        windows = self.mtp_sliding_windows or []
        return windows[k] if k < len(windows) and windows[k] else self.sliding_window

    def _contradictions(self):
        yield from super()._contradictions()
        for name in ("mtp_layer_types", "mtp_sliding_windows"):
            listed = getattr(self, name)
            if listed is not None and len(listed) < self.num_nextn_predict_layers:
                yield f"lists {len(listed)} {name} for its {self.num_nextn_predict_layers} MTP layers"


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

    def attention(window: int | None) -> Attention:
        return Attention(
            hidden,
            args.num_attention_heads,
            args.key_value_heads,
            head_dim,
            qk_norm="head",
            norm_eps=args.rms_norm_eps,
            sliding_window=window,
            # global layers of a model with windows attend without positions
            rope=args.sliding_window is None or window is not None,
        )

    layers = [
        DecoderLayer(
            attention(args.sliding_window if args.sliding(i) else None), feed_forward(i), hidden, args.rms_norm_eps
        )
        for i in range(args.num_hidden_layers)
    ]
    mtp = [
        DecoderLayer(
            attention(args.mtp_window(k)),
            MLP(hidden, args.intermediate_size, args.hidden_act),
            hidden,
            args.rms_norm_eps,
        )
        for k in range(args.num_nextn_predict_layers)
    ]
    return causal_lm(args, layers, head_dim, mtp=mtp, mtp_layer=NormedMTPLayer)


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
    mtp=MtpLayout("num_nextn_predict_layers", QWEN_MTP.prefixes),  # Qwen3-Next's (vLLM's exaone_moe_mtp.py)
    example="LGAI-EXAONE/K-EXAONE-236B-A23B",
)
