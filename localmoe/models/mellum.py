"""Mellum2 (MellumForCausalLM, JetBrains' code models): Qwen3-MoE's attention (per-head q/k RMSNorm)
and routing, with layers of two kinds, each kind with its own rotary (sliding-window layers and full
ones), and dense or MoE feed-forward per layer as `mlp_layer_types` says. Its multi-token-prediction layer
(`mtp.*` in Qwen3-Next's names: fc, pre_fc_norm_embedding, pre_fc_norm_hidden, layers.0, norm; at most one) is
loaded as `mtp`, for drafts (see localmoe/models/mtp.py), as transformers' MtpModel builds it (modeling_layers.py,
with conversion_mapping.py's Mellum names): a decoder layer of the kind `mtp_layer_types` gives (sliding by
default, with that kind's rotary) and the feed-forward `mtp_mlp_layer_types` gives (MoE by default); its
final norm's output is passed on to the next draft, as MtpModel chains it (`NormedMTPLayer`)."""

from dataclasses import dataclass
from typing import Any, ClassVar

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, MtpLayout
from localmoe.models.layers import MLP, Backbone, CausalLM, DecoderLayer
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GatedActivation, SparseMoE, TopKRouter
from localmoe.models.mtp import MultiTokenPredictor, NormedMTPLayer
from localmoe.models.qwen3_5_moe import QWEN_MTP
from localmoe.models.rotary import RotaryEmbedding, rope_parameters

ROPE_THETAS = {"full_attention": 500_000.0, "sliding_attention": 10_000.0}


@dataclass
class MellumArgs(ModelArgs):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        "num_experts": ("num_local_experts",),
        "num_mtp_layers": ("num_nextn_predict_layers",),  # the name transformers saves it under
    }

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int = 7168  # dense layers
    moe_intermediate_size: int = 896
    num_key_value_heads: int = 4
    head_dim: int | None = 128
    num_experts: int = 64
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True
    sliding_window: int | None = 1024
    layer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None
    rope_parameters: dict | None = None  # one set per kind of layer
    attention_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    num_mtp_layers: int | None = None  # (transformers saves null for none)
    mtp_layer_types: list[str] | None = None
    mtp_mlp_layer_types: list[str] | None = None

    def __post_init__(self):
        """transformers' defaults for the MTP layers: sliding attention, MoE."""
        self.num_mtp_layers = self.num_mtp_layers or 0
        self.mtp_layer_types = self.mtp_layer_types or ["sliding_attention"] * self.num_mtp_layers
        self.mtp_mlp_layer_types = self.mtp_mlp_layer_types or ["sparse"] * self.num_mtp_layers

    def _contradictions(self):
        yield from super()._contradictions()
        if self.num_mtp_layers > 1:  # transformers' config refuses it too
            yield f"has {self.num_mtp_layers} MTP layers, and Mellum has at most one"
        for name in ("mtp_layer_types", "mtp_mlp_layer_types"):
            if len(getattr(self, name)) < self.num_mtp_layers:
                yield f"lists {len(getattr(self, name))} {name} for its {self.num_mtp_layers} MTP layers"

    def kind(self, i: int) -> str:
        """Layer i's attention, past the model's layers the MTP layers'."""
        if i >= self.num_hidden_layers:
            return self.mtp_layer_types[i - self.num_hidden_layers]
        return self.layer_types[i] if self.layer_types else "full_attention"

    def dense(self, i: int) -> bool:
        if i >= self.num_hidden_layers:
            return self.mtp_mlp_layer_types[i - self.num_hidden_layers] == "dense"
        return bool(self.mlp_layer_types) and self.mlp_layer_types[i] == "dense"

    def rope(self, kind: str) -> dict[str, Any]:
        given = (self.rope_parameters or {}).get(kind) or {"rope_type": "default"}
        config = {"rope_parameters": given, "max_position_embeddings": self.max_position_embeddings}
        return rope_parameters(config, ROPE_THETAS.get(kind, 10_000.0))


def build(args: MellumArgs) -> CausalLM:
    hidden, experts, top_k = args.hidden_size, args.num_experts, args.num_experts_per_tok
    head_dim = args.attention_head_dim
    every = range(args.num_hidden_layers + args.num_mtp_layers)  # the MTP layers numbered on
    kinds = sorted({args.kind(i) for i in every})
    rotaries = {kind: RotaryEmbedding(args.rope(kind), head_dim, args.max_position_embeddings) for kind in kinds}
    # the model's rotary; layers of the other kind use theirs through the step
    main = min(args.kind(i) for i in range(args.num_hidden_layers))

    def feed_forward(i: int):
        if args.dense(i):
            return MLP(hidden, args.intermediate_size, args.hidden_act)
        router = TopKRouter(hidden, experts, top_k, normalize=args.norm_topk_prob)
        return SparseMoE(
            i, hidden, args.moe_intermediate_size, experts, top_k, router, act=GatedActivation(act=args.hidden_act)
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
                sliding_window=args.sliding_window if args.kind(i) == "sliding_attention" else None,
                rotary=None if args.kind(i) == main else rotaries[args.kind(i)],
            ),
            feed_forward(i),
            hidden,
            args.rms_norm_eps,
        )
        for i in every
    ]
    n = args.num_hidden_layers
    mtp = [NormedMTPLayer(block, hidden, args.rms_norm_eps) for block in layers[n:]]
    return CausalLM(
        Backbone(args.vocab_size, hidden, layers[:n], args.rms_norm_eps),
        rotaries[main],
        tie_word_embeddings=args.tie_word_embeddings,
        max_position_embeddings=args.max_position_embeddings,
        mtp=MultiTokenPredictor(mtp, n) if mtp else None,
    )


@dataclass(frozen=True)
class MellumMtpLayout(MtpLayout):
    """Qwen3-Next's names, the count under either name the config may give it."""

    def aliases(self, config: dict[str, Any]) -> list[tuple[str, str]]:
        return super().aliases({**config, self.count: config.get(self.count, config.get("num_mtp_layers"))})


FAMILY = Family(
    architectures=("MellumForCausalLM",),
    model_type="mellum",
    args=MellumArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    mtp=MellumMtpLayout("num_nextn_predict_layers", QWEN_MTP.prefixes),
    example="JetBrains/Mellum2-12B-A2.5B-Base",
)
