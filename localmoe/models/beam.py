"""Beam (BeamForCausalLM, e.g. reflection/Beam-1.0-501B-A23B): Qwen3-MoE's attention (per-head q/k
RMSNorm) with a sigmoid output gate per channel plus a learned bias per head; sliding-window layers
with rotary and global ones without positions, whose queries grow with the position (scalable softmax,
(1 + (position + 1) / 2048) ** 0.1), each kind with its own `rope_parameters` (None: no rotary); norms
before and after attention and the feed-forward inside each residual branch, and the residual sums
scaled by depth; dense or MoE feed-forward as `mlp_layer_types` says, the MoE DeepSeek-V3's grouped
sigmoid routing without shared experts; logits soft-capped. Its norms scale in float32."""

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs
from localmoe.models.layers import MLP, Backbone, CausalLM, Step, UpcastRMSNorm
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GatedActivation, GroupedTopKRouter, SparseMoE
from localmoe.models.rotary import RotaryEmbedding, rope_parameters


@dataclass
class BeamArgs(ModelArgs):
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int = 20480  # dense layers
    num_key_value_heads: int = 8
    head_dim: int = 128
    moe_intermediate_size: int = 2560
    num_experts: int = 256
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True
    n_group: int | None = 8
    topk_group: int | None = 4
    routed_scaling_factor: float = 2.5
    sliding_window: int | None = 512
    layer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None
    rope_parameters: dict | None = None  # one set per kind of layer; None: no rotary
    final_logit_softcapping: float | None = 30.0
    attention_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False

    def __post_init__(self):
        layers = self.num_hidden_layers
        if self.layer_types is None:  # every sixth layer global, and the last
            self.layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)]
            self.layer_types[-1] = "full_attention"
        if self.mlp_layer_types is None:  # three dense layers first
            self.mlp_layer_types = ["dense" if i < 3 else "sparse" for i in range(layers)]
        if self.rope_parameters is None:
            self.rope_parameters = {"sliding_attention": {"rope_type": "default"}, "full_attention": None}

    def rope(self, kind: str) -> dict[str, Any] | None:
        given = self.rope_parameters.get(kind)
        if given is None:
            return None
        return rope_parameters({"rope_parameters": given, "max_position_embeddings": self.max_position_embeddings}, 1e4)

    def _contradictions(self):
        yield from super()._contradictions()
        for name in ("layer_types", "mlp_layer_types"):
            if len(getattr(self, name)) != self.num_hidden_layers:
                yield f"lists {len(getattr(self, name))} {name} for {self.num_hidden_layers} layers"
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            yield "has sliding-attention layers and no sliding_window"


def scalable_softmax(positions: torch.Tensor) -> torch.Tensor:
    """Beam's query scale on layers without rotary, (1 + (position + 1) / 2048) ** 0.1, as it computes it."""
    return torch.exp(0.1 * torch.log1p((positions.float() + 1) / 2048))


class DepthScaledDecoderLayer(nn.Module):
    """Norms before and after attention and the feed-forward; the n-th residual sum (n = 2 (i + 1) for
    layer i's attention, one more for its feed-forward) weighs the branch by 1/sqrt(n) and the residual
    by sqrt((n - 1) / n)."""

    def __init__(self, attention: nn.Module, mlp: nn.Module, hidden: int, eps: float, i: int):
        super().__init__()
        self.self_attn, self.mlp = attention, mlp
        self.input_layernorm = UpcastRMSNorm(hidden, eps)
        self.post_attention_layernorm = UpcastRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = UpcastRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = UpcastRMSNorm(hidden, eps)
        self.sums = 2 * (i + 1)

    def forward(self, h: torch.Tensor, step: Step, kv) -> torch.Tensor:
        h = depth_scaled(self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), step, kv)), h, self.sums)
        return depth_scaled(
            self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h))), h, self.sums + 1
        )


def depth_scaled(branch: torch.Tensor, residual: torch.Tensor, n: int) -> torch.Tensor:
    return branch * (1.0 / math.sqrt(n)) + residual * math.sqrt((n - 1) / n)


def build(args: BeamArgs) -> CausalLM:
    hidden, head_dim, experts, top_k = args.hidden_size, args.head_dim, args.num_experts, args.num_experts_per_tok
    kinds = sorted(set(args.layer_types))
    rotaries = {
        kind: RotaryEmbedding(args.rope(kind), head_dim, args.max_position_embeddings)
        for kind in kinds
        if args.rope(kind)
    }
    main = next(iter(rotaries), None)  # the model's rotary; layers of another kind use theirs through the step

    def attention(i: int) -> Attention:
        kind = args.layer_types[i]
        return Attention(
            hidden,
            args.num_attention_heads,
            args.key_value_heads,
            head_dim,
            qkv_bias=args.attention_bias,
            out_bias=args.attention_bias,
            qk_norm="head",
            norm_eps=args.rms_norm_eps,
            norm=UpcastRMSNorm,
            sliding_window=args.sliding_window if kind == "sliding_attention" else None,
            rotary=None if kind == main else rotaries.get(kind),
            rope=kind in rotaries,
            query_scale=None if kind in rotaries else scalable_softmax,
            gate="sigmoid",
            gate_bias=True,
        )

    def feed_forward(i: int) -> nn.Module:
        if args.mlp_layer_types[i] == "dense":
            return MLP(hidden, args.intermediate_size, args.hidden_act)
        router = GroupedTopKRouter(
            hidden,
            experts,
            top_k,
            scoring="sigmoid",
            n_group=args.n_group or 1,
            topk_group=args.topk_group or 1,
            normalize=args.norm_topk_prob,
            scaling=args.routed_scaling_factor,
            correction_bias=True,
        )
        return SparseMoE(
            i, hidden, args.moe_intermediate_size, experts, top_k, router, act=GatedActivation(act=args.hidden_act)
        )

    layers = [
        DepthScaledDecoderLayer(attention(i), feed_forward(i), hidden, args.rms_norm_eps, i)
        for i in range(args.num_hidden_layers)
    ]
    # without any layer with rotary, the model's rotary is computed and never read
    default = {"rope_type": "default", "rope_theta": 1e4}
    return CausalLM(
        Backbone(args.vocab_size, hidden, layers, args.rms_norm_eps, norm=UpcastRMSNorm),
        rotaries.get(main) or RotaryEmbedding(default, head_dim, args.max_position_embeddings),
        tie_word_embeddings=args.tie_word_embeddings,
        max_position_embeddings=args.max_position_embeddings,
        logit_softcap=args.final_logit_softcapping,
    )


FAMILY = Family(
    architectures=("BeamForCausalLM",),
    model_type="beam",
    args=BeamArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    keep_float32=("e_score_correction_bias", "mlp.gate.weight"),
    example="reflection/Beam-1.0-501B-A23B",
)
