"""Step-3.7-Flash (the language model of Step3p7ForConditionalGeneration; transformers defines no
text-only class): global and sliding-window layers, each kind with its own rotary (on part of the
head where the config says) and the windowed layers with their own number of query heads; per-head
q/k RMSNorm; each head's output scaled by a sigmoid gate of its own (`g_proj`); norms that scale by
1 + weight; dense first layers, then MoE layers with sigmoid routing whose correction bias steers the
choice of experts, the routed sum scaled, plus a shared expert; on some layers the SwiGLU of the
experts clamps act(gate) and up (`swiglu_limits`, `swiglu_limits_shared`). The routed experts are
stored stacked per layer and role (`moe.gate_proj` [E, I, H]).

Its multi-token-prediction layers (`model.layers.{num_hidden_layers + k}.*`: enorm, hnorm, eh_proj,
transformer.shared_head.norm (the releases' name; `shared_head.norm` is read too, as vLLM's step3p5_mtp.py
strips `.transformer.` where it is there), norms that scale by 1 + weight, and a decoder layer of the model's
kind) are loaded as `mtp`
for drafts, as vLLM's step3p5_mtp.py (Step3p5AMultiTokenPredictorLayer) and SGLang's step3p5_mtp.py (which
serves Step3p7ForConditionalGeneration too) build them: the layer's kind of attention, MLP and SwiGLU clamps
are the entries past the model's layers in the release's per-layer lists (transformers keeps the first two as
`mtp_layer_types` and `mtp_mlp_layer_types`), and the output before shared_head.norm is passed on (SGLang's
chain_mtp_hidden_states). Both read an LM head of the layer's own, `transformer.shared_head.output`; the model's is used
here, as transformers' MtpModel does (a release's copy of the head is the same tensor)."""

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import Stacked
from localmoe.models.family import Family, ModelArgs, Multimodal
from localmoe.models.layers import Backbone, CausalLM, DecoderLayer, ZeroCenteredRMSNorm
from localmoe.models.moe import GatedActivation, GatedMLP, GroupedTopKRouter, SparseMoE
from localmoe.models.mtp import MTPLayer, MultiTokenPredictor
from localmoe.models.rotary import RotaryEmbedding, rope_parameters

EXPERTS = {role: f"model.layers.{{layer}}.moe.{role}_proj.weight" for role in ("gate", "up", "down")}


@dataclass
class Step3p7Args(ModelArgs):
    # the release's (remote-code) names for the same fields, which transformers also reads
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        "n_routed_experts": ("moe_num_experts", "num_local_experts"),
        "num_experts_per_tok": ("moe_top_k",),
        "share_expert_dim": ("share_expert_dims",),
        "num_key_value_heads": ("num_attention_groups",),
        "num_nextn_predict_layers": ("num_mtp_layers",),
    }

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 8
    head_dim: int = 128
    num_sliding_attention_heads: int | None = None
    attention_other_setting: dict | None = None  # older configs: the sliding layers' head count
    per_layer_config: dict | None = None  # as transformers saves it: {layer: {num_attention_heads}}
    query_pre_attn_scalar: float | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None
    moe_layers_enum: str | list | None = None  # older configs: the MoE layers' indices
    num_nextn_predict_layers: int = 0
    mtp_layer_types: list[str] | None = None  # as transformers saves them: the MTP layers' kinds
    mtp_mlp_layer_types: list[str] | None = None
    rope_parameters: dict | None = None  # one set per kind of layer
    rope_theta: float | list | None = None  # older configs: per layer, or one for all
    partial_rotary_factors: list | None = None  # older configs: per layer
    rope_scaling: dict | None = None  # older configs: the global layers' scaling
    moe_intermediate_size: int = 1280
    n_routed_experts: int = 288
    num_experts_per_tok: int = 8
    share_expert_dim: int = 1280
    moe_router_scaling_factor: float = 1.0
    swiglu_limits: list | None = None
    swiglu_limits_shared: list | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = False

    def __post_init__(self):
        # older configs list the multi-token-prediction layers after the others in their per-layer lists: the
        # kinds of theirs are kept apart; the clamps stay listed, layer i's at i (vLLM's Step3p5DecoderLayer
        # reads index num_hidden_layers + k for MTP layer k)
        layers, padded = self.num_hidden_layers, self.num_hidden_layers + self.num_nextn_predict_layers
        for name, mtp_name in (("layer_types", "mtp_layer_types"), ("mlp_layer_types", "mtp_mlp_layer_types")):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) == padded:
                setattr(self, name, value[:layers])
                setattr(self, mtp_name, value[layers:])
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * layers
        count = self.num_nextn_predict_layers
        if not isinstance(self.mtp_layer_types, list) or len(self.mtp_layer_types) != count:
            self.mtp_layer_types = ["full_attention"] * count  # transformers' default
        enum = self.moe_layers_enum
        items = enum.split(",") if isinstance(enum, str) else enum
        moe = {int(i) for i in items if str(i).strip()} if enum is not None else set(range(3, layers))
        kinds = ["sparse" if i in moe else "dense" for i in range(padded)]
        if self.mlp_layer_types is None:
            self.mlp_layer_types = kinds[:layers]
        if not isinstance(self.mtp_mlp_layer_types, list) or len(self.mtp_mlp_layer_types) != count:
            self.mtp_mlp_layer_types = kinds[layers:]
        if self.num_sliding_attention_heads is None:
            other = self.attention_other_setting or {}
            self.num_sliding_attention_heads = other.get("num_attention_heads", self.num_attention_heads)
        if self.query_pre_attn_scalar is None:
            self.query_pre_attn_scalar = self.head_dim

    def heads(self, i: int) -> int:
        if self.per_layer_config is not None:
            return self.per_layer_config.get(str(i), {}).get("num_attention_heads", self.num_attention_heads)
        return (
            self.num_sliding_attention_heads if self.layer_types[i] == "sliding_attention" else self.num_attention_heads
        )

    def rope(self, kind: str) -> dict[str, Any]:
        """The rotary settings of a kind of layer: as saved per kind, or from an older config's per-layer
        lists (the first layer of the kind speaks for all)."""
        given = self.rope_parameters or {}
        if isinstance(given.get(kind), dict):
            params = dict(given[kind])
        else:
            i = [*self.layer_types, *self.mtp_layer_types].index(kind)  # the MTP layers' entries follow
            theta = self.rope_theta[i] if isinstance(self.rope_theta, list) else self.rope_theta
            params = {"rope_type": "default", "rope_theta": 10_000.0 if theta is None else theta}
            if self.partial_rotary_factors:
                params["partial_rotary_factor"] = self.partial_rotary_factors[i]
            if self.rope_scaling and kind == "full_attention":
                params.update(self.rope_scaling)
        return rope_parameters(
            {"rope_parameters": params, "max_position_embeddings": self.max_position_embeddings}, 10_000.0
        )

    def limit(self, limits: list | None, i: int) -> float | None:
        """Layer i's SwiGLU clamp from a per-layer list; a zero or missing entry means none."""
        return (limits[i] or None) if limits and i < len(limits) else None


def clamped(act: str, limit: float | None) -> GatedActivation:
    return GatedActivation(act=act) if limit is None else GatedActivation("glu_clamped_after", act, limit=limit)


def build(args: Step3p7Args) -> CausalLM:
    hidden, eps = args.hidden_size, args.rms_norm_eps
    kinds = sorted({*args.layer_types, *args.mtp_layer_types})
    rotaries = {kind: RotaryEmbedding(args.rope(kind), args.head_dim, args.max_position_embeddings) for kind in kinds}
    main = kinds[0]  # the model's rotary; layers of the other kind use theirs through the step

    def attention(kind: str, heads: int) -> nn.Module:
        return Attention(
            hidden,
            heads,
            args.num_key_value_heads,
            args.head_dim,
            qkv_bias=args.attention_bias,
            out_bias=args.attention_bias,
            qk_norm="head",
            norm_eps=eps,
            sliding_window=args.sliding_window if kind == "sliding_attention" else None,
            norm=ZeroCenteredRMSNorm,
            rotary=None if kind == main else rotaries[kind],
            scale=args.query_pre_attn_scalar**-0.5,
            gate="sigmoid",
            gate_per_head=True,
        )

    def feed_forward(i: int, kind: str) -> nn.Module:
        shared_glu = clamped("silu", args.limit(args.swiglu_limits_shared, i))
        if kind == "dense":
            return GatedMLP(hidden, args.intermediate_size, shared_glu, args.mlp_bias)
        router = GroupedTopKRouter(
            hidden,
            args.n_routed_experts,
            args.num_experts_per_tok,
            scoring="sigmoid",
            n_group=1,
            topk_group=1,
            normalize=True,
            scaling=args.moe_router_scaling_factor,
            correction_bias=True,
        )
        return SparseMoE(
            i,
            hidden,
            args.moe_intermediate_size,
            args.n_routed_experts,
            args.num_experts_per_tok,
            router,
            act=clamped("silu", args.limit(args.swiglu_limits, i)),
            shared_expert=GatedMLP(hidden, args.share_expert_dim, shared_glu, args.mlp_bias),
        )

    layers = [
        DecoderLayer(
            attention(args.layer_types[i], args.heads(i)),
            feed_forward(i, args.mlp_layer_types[i]),
            hidden,
            eps,
            norm=ZeroCenteredRMSNorm,
        )
        for i in range(args.num_hidden_layers)
    ]
    heads = {"sliding_attention": args.num_sliding_attention_heads}
    mtp = [
        MTPLayer(
            DecoderLayer(
                attention(kind, heads.get(kind, args.num_attention_heads)),
                feed_forward(args.num_hidden_layers + k, mlp_kind),
                hidden,
                eps,
                norm=ZeroCenteredRMSNorm,
            ),
            hidden,
            eps,
            ZeroCenteredRMSNorm,
        )
        for k, (kind, mlp_kind) in enumerate(zip(args.mtp_layer_types, args.mtp_mlp_layer_types, strict=True))
    ]
    return CausalLM(
        Backbone(args.vocab_size, hidden, layers, eps, norm=ZeroCenteredRMSNorm),
        rotaries[main],
        tie_word_embeddings=args.tie_word_embeddings,
        max_position_embeddings=args.max_position_embeddings,
        mtp=MultiTokenPredictor(mtp, args.num_hidden_layers) if mtp else None,
    )


FAMILY = Family(
    architectures=(),
    model_type="step3p5",
    args=Step3p7Args,
    model=build,
    experts=(Stacked(EXPERTS),),
    hub_aliases=(
        (".self_attn.gate_proj.", ".self_attn.g_proj."),
        (".mlp.gate.e_score_correction_bias", ".moe.router_bias"),
        (".mlp.gate.", ".moe.gate."),
        (".mlp.shared_expert.", ".share_expert."),
        (".shared_head.norm.", ".transformer.shared_head.norm."),  # the MTP layers' final norm, as released
    ),
    keep_float32=("e_score_correction_bias",),
    # the vision tower (vision_model.*, vit_large_projector.*) stays on disk
    multimodal=(Multimodal("Step3p7ForConditionalGeneration", (("model.", "model."), ("lm_head.", "lm_head."))),),
    example="stepfun-ai/Step-3.7-Flash",
)
