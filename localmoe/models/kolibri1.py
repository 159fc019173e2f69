"""Kolibri-1 (Kolibri1ForCausalLM, e.g. Aleph-Alpha/Kolibri-1): EXAONE 4's attention (per-head q/k
RMSNorm; sliding-window layers with rotary, global ones without positions, as `layer_types` says),
GLM-4's sandwich layer (an RMSNorm after attention and after the MoE, inside each residual branch, beside
the ones before), and an MoE on every layer: the top k of the router's logits plus a learned correction
bias, weighted by the sigmoid of their logits (optionally renormalised), plus a shared expert."""

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, causal_lm
from localmoe.models.layers import MLP, CausalLM, RMSNorm, Step
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GatedActivation, Routing, SparseMoE


@dataclass
class Kolibri1Args(ModelArgs):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"num_experts": ("num_local_experts",)}

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 4
    head_dim: int = 128
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    num_experts: int = 384
    num_experts_per_tok: int = 6
    norm_topk_prob: bool = False
    sliding_window: int | None = 513
    layer_types: list[str] | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)

    def sliding(self, i: int) -> bool:
        if self.layer_types is None:  # transformers' default: every fifth layer global
            return (i + 1) % 5 != 0
        return self.layer_types[i] == "sliding_attention"

    def _contradictions(self):
        yield from super()._contradictions()
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            yield f"lists {len(self.layer_types)} layer_types for {self.num_hidden_layers} layers"
        if self.sliding_window is None and any(map(self.sliding, range(self.num_hidden_layers))):
            yield "has sliding-attention layers and no sliding_window"


class LogitBiasRouter(nn.Module):
    """The top k of the logits plus a correction bias, weighted by the sigmoid of their logits, in float32."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, normalize: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.e_score_correction_bias = nn.Parameter(torch.empty(num_experts))
        self.top_k, self.normalize = top_k, normalize

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).sigmoid()

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.logits(x)
        ids = (logits + self.e_score_correction_bias.float()).topk(self.top_k, dim=-1).indices
        weights = logits.gather(1, ids).sigmoid()
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(weights, ids, logits.sigmoid())


class SandwichDecoderLayer(nn.Module):
    """h + norm(attention(norm(h))), then h + norm(mlp(norm(h))), with GLM-4's names for the four norms."""

    def __init__(self, attention: nn.Module, mlp: nn.Module, hidden: int, eps: float):
        super().__init__()
        self.self_attn, self.mlp = attention, mlp
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_self_attn_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.post_mlp_layernorm = RMSNorm(hidden, eps)

    def forward(self, h: torch.Tensor, step: Step, kv) -> torch.Tensor:
        h = h + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(h), step, kv))
        return h + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(h)))


def build(args: Kolibri1Args) -> CausalLM:
    hidden, head_dim, experts, top_k = (
        args.hidden_size,
        args.attention_head_dim,
        args.num_experts,
        args.num_experts_per_tok,
    )

    def layer(i: int) -> SandwichDecoderLayer:
        sliding = args.sliding(i)
        attention = Attention(
            hidden,
            args.num_attention_heads,
            args.key_value_heads,
            head_dim,
            qk_norm="head",
            norm_eps=args.rms_norm_eps,
            sliding_window=args.sliding_window if sliding else None,
            rope=args.sliding_window is None or sliding,  # global layers of a model with windows: no positions
        )
        moe = SparseMoE(
            i,
            hidden,
            args.moe_intermediate_size,
            experts,
            top_k,
            LogitBiasRouter(hidden, experts, top_k, args.norm_topk_prob),
            act=GatedActivation(act=args.hidden_act),
            shared_expert=MLP(hidden, args.shared_expert_intermediate_size, args.hidden_act),
        )
        return SandwichDecoderLayer(attention, moe, hidden, args.rms_norm_eps)

    return causal_lm(args, [layer(i) for i in range(args.num_hidden_layers)], head_dim)


FAMILY = Family(
    architectures=("Kolibri1ForCausalLM",),
    model_type="kolibri1",
    args=Kolibri1Args,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    hub_aliases=(
        (".mlp.shared_expert.", ".mlp.shared_experts."),
        (".mlp.gate.e_score_correction_bias", ".moe.router.expert_bias"),
        (".post_self_attn_layernorm.", ".post_attn_norm."),
        (".post_mlp_layernorm.", ".post_ffn_norm."),
    ),
    keep_float32=("e_score_correction_bias",),
    example="Aleph-Alpha/Kolibri-1",
)
