"""Muse Spark's language model (MuseSparkForConditionalGeneration, e.g. meta-models/Muse-Spark-Open-816B-A42B;
transformers defines it only inside the multimodal model, whose vision and audio towers stay on disk):
embeddings RMS-normalised; attention with q/k RMS-normalised per head without a scale (queries then
times `qk_scale_factor`), each head's output normalised the same way and gated per channel by a sigmoid,
a sliding window or, every fourth layer counted from the last, the whole context without rotary
(`layer_rope_theta` 0; transformers rotates the others at the global base whatever theta they list);
norms before and after attention and the feed-forward, the residual sums weighed by learned gates; MoE
experts working in a narrower pooled space (pre_expert_proj, a norm, post_expert_proj), each expert's
output RMS-normalised before its router weight (sigmoid of scaled logits, a correction bias steering
the choice, renormalised); logits scaled by `output_multiplier`, then soft-capped."""

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from localmoe.models.attention import Attention
from localmoe.models.family import Family, ModelArgs, Multimodal
from localmoe.models.layers import (
    MLP,
    Backbone,
    CausalLM,
    RMSNorm,
    Step,
    UpcastRMSNorm,
    ZeroCenteredRMSNorm,
    rms_normalize,
)
from localmoe.models.moe import FUSED_EXPERTS, GatedActivation, GroupedTopKRouter, Routing, SparseMoE
from localmoe.models.rotary import RotaryEmbedding


@dataclass
class MuseSparkTextArgs(ModelArgs):
    default_rope_theta: ClassVar[float] = 500_000.0

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int = 16384  # dense layers
    num_key_value_heads: int = 16
    head_dim: int = 64
    moe_intermediate_size: int = 4096
    moe_hidden_size: int = 4096
    num_local_experts: int = 256
    num_experts_per_tok: int = 8
    routed_scaling_factor: float = 1.0
    mlp_layer_types: list[str] | None = None
    layer_types: list[str] | None = None
    layer_rope_theta: list[float] | None = None
    sliding_window: int | None = 2048
    qk_scale_factor: float = 5.4730064863875
    output_multiplier: float = 0.1767766952966369
    final_logit_softcapping: float = 20.0
    residual_gate_temperature: float = 0.3
    post_norm_eps: float = 1e-8
    attention_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 1048576
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)

    def __post_init__(self):
        layers = self.num_hidden_layers
        every_fourth_from_last = [(layers - 1 - i) % 4 == 0 for i in range(layers)]
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["sparse"] * layers
        if self.layer_types is None:
            self.layer_types = ["full_attention" if last else "sliding_attention" for last in every_fourth_from_last]
        if self.layer_rope_theta is None:
            self.layer_rope_theta = [0 if last else self.rope["rope_theta"] for last in every_fourth_from_last]

    def _contradictions(self):
        yield from super()._contradictions()
        for name in ("mlp_layer_types", "layer_types", "layer_rope_theta"):
            if len(getattr(self, name)) != self.num_hidden_layers:
                yield f"lists {len(getattr(self, name))} {name} for {self.num_hidden_layers} layers"


class UnitRMSNorm(RMSNorm):
    """RMS normalisation without a learned scale (its weight is ones, not stored)."""

    def __init__(self, dim: int, eps: float):
        nn.Module.__init__(self)
        self.eps = eps
        with torch.device("cpu"):  # real values even when the model is being built on `meta`
            self.register_buffer("weight", torch.ones(dim), persistent=False)  # read by Attention's q/k norm

    def scaled(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.eps)


class InputScaledRMSNorm(RMSNorm):
    """Scales by 1 + weight first (rounded to the input's dtype), then normalises."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize((x.float() * (1 + self.weight.float())).to(x.dtype), self.eps)


class ResidualGate(nn.Module):
    """alpha * residual + beta * branch, beta = sigmoid(gate / temperature), alpha = sqrt(sigmoid(-gate /
    temperature) (1 + beta)) (at least sqrt(1e-3)), per channel, in float32."""

    def __init__(self, hidden: int, temperature: float):
        super().__init__()
        self.gate = nn.Parameter(torch.empty(hidden))
        self.temperature = temperature

    def forward(self, residual: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        w = self.gate.float() / self.temperature
        beta = torch.sigmoid(w)
        alpha = torch.sqrt(torch.clamp(torch.sigmoid(-w) * (1.0 + beta), min=1e-3))
        return (alpha * residual + beta * branch).to(residual.dtype)


class PooledMoE(SparseMoE):
    """Routed on the hidden states, computed in the pooled space: pre_expert_proj and a norm down to it,
    each expert's output normalised before its weight, the weighted sum back through post_expert_proj."""

    def __init__(self, i: int, args: MuseSparkTextArgs):
        hidden, pooled, experts, top_k = (
            args.hidden_size,
            args.moe_hidden_size,
            args.num_local_experts,
            args.num_experts_per_tok,
        )
        router = GroupedTopKRouter(
            hidden,
            experts,
            top_k,
            scoring="sigmoid",
            n_group=1,
            topk_group=1,
            normalize=True,
            scaling=args.routed_scaling_factor,
            correction_bias=True,
            norm_eps=1e-15,
            logit_scale=args.output_multiplier,
        )
        act = GatedActivation(act=args.hidden_act)
        super().__init__(i, pooled, args.moe_intermediate_size, experts, top_k, router, act=act, per_choice=True)
        self.pre_expert_proj = nn.Linear(hidden, pooled, bias=False)
        self.pre_expert_norm = ZeroCenteredRMSNorm(pooled, args.rms_norm_eps)
        self.post_expert_norm = InputScaledRMSNorm(pooled, args.post_norm_eps)
        self.post_expert_proj = nn.Linear(pooled, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        routing: Routing = self.gate(flat)
        pooled = self.pre_expert_norm(self.pre_expert_proj(flat))
        outputs = self.post_expert_norm(self.experts(self.layer_idx, pooled, routing, routed=flat))  # [T, k, P]
        combined = (outputs.float() * routing.weights.unsqueeze(-1)).sum(dim=1).to(pooled.dtype)
        return self.post_expert_proj(combined).view(x.shape)


class GatedResidualDecoderLayer(nn.Module):
    def __init__(self, args: MuseSparkTextArgs, i: int):
        super().__init__()
        hidden, eps, post_eps = args.hidden_size, args.rms_norm_eps, args.post_norm_eps
        sliding = args.layer_types[i] == "sliding_attention"
        self.self_attn = Attention(
            hidden,
            args.num_attention_heads,
            args.key_value_heads,
            args.head_dim,
            qkv_bias=args.attention_bias,
            out_bias=args.attention_bias,
            qk_norm="head",
            norm_eps=eps,
            norm=UnitRMSNorm,
            sliding_window=args.sliding_window if sliding else None,
            rope=bool(args.layer_rope_theta[i]),
            scale=args.head_dim**-0.5 * args.qk_scale_factor,
            gate="sigmoid",
            output_norm_eps=eps,
        )
        self.mlp = (
            PooledMoE(i, args)
            if args.mlp_layer_types[i] == "sparse"
            else MLP(hidden, args.intermediate_size, args.hidden_act)
        )
        self.input_layernorm = ZeroCenteredRMSNorm(hidden, eps)
        self.post_attention_layernorm = UnitRMSNorm(hidden, post_eps)
        self.pre_feedforward_layernorm = ZeroCenteredRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = InputScaledRMSNorm(hidden, post_eps)
        self.post_attention_residual_gate = ResidualGate(hidden, args.residual_gate_temperature)
        self.post_feedforward_residual_gate = ResidualGate(hidden, args.residual_gate_temperature)

    def forward(self, h: torch.Tensor, step: Step, kv) -> torch.Tensor:
        attended = self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), step, kv))
        h = self.post_attention_residual_gate(h, attended)
        fed = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return self.post_feedforward_residual_gate(h, fed)


class MuseSparkTextLM(CausalLM):
    """Embeddings RMS-normalised without a scale; logits times `output_multiplier`, then soft-capped."""

    def __init__(self, *args, eps: float, output_multiplier: float, softcap: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps, self.output_multiplier, self.softcap = eps, output_multiplier, softcap

    def embed(self, ids: torch.Tensor, step: Step) -> torch.Tensor:
        return rms_normalize(self.model.embed_tokens(ids), self.eps)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = super().logits(h) * self.output_multiplier
        return torch.tanh(logits / self.softcap) * self.softcap


def build(args: MuseSparkTextArgs) -> CausalLM:
    layers = [GatedResidualDecoderLayer(args, i) for i in range(args.num_hidden_layers)]
    return MuseSparkTextLM(
        Backbone(args.vocab_size, args.hidden_size, layers, args.rms_norm_eps, norm=UpcastRMSNorm),
        RotaryEmbedding(args.rope, args.head_dim, args.max_position_embeddings),
        tie_word_embeddings=args.tie_word_embeddings,
        max_position_embeddings=args.max_position_embeddings,
        eps=args.rms_norm_eps,
        output_multiplier=args.output_multiplier,
        softcap=args.final_logit_softcapping,
    )


FAMILY = Family(
    architectures=(),
    model_type="muse_spark_text",
    args=MuseSparkTextArgs,
    model=build,
    experts=(FUSED_EXPERTS,),  # as transformers keeps them, which it reads the release as
    hub_aliases=((".mlp.post_expert_norm.", ".mlp.experts.post_expert_norm."),),
    keep_float32=("residual_gate", "mlp.gate.weight", "e_score_correction_bias"),
    multimodal=(
        Multimodal(
            "MuseSparkForConditionalGeneration",
            (("model.", "model.language_model."), ("lm_head.", "lm_head.")),
        ),
    ),
    example="meta-models/Muse-Spark-Open-816B-A42B",
)
