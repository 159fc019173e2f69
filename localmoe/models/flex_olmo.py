"""FlexOlmo (FlexOlmoForCausalLM, e.g. allenai/FlexOlmo-7x7B-1T): OLMo 2's layer (q/k RMSNorm over the
whole projection; the norms after attention and after the feed-forward, inside each residual branch,
none before) with OLMoE's softmax top-k routing."""

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from localmoe.models import olmoe
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs
from localmoe.models.layers import CausalLM, Step, UpcastRMSNorm
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS


@dataclass
class FlexOlmoArgs(ModelArgs):
    default_rope_theta: ClassVar[float] = 500_000.0
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"num_experts": ("num_local_experts",)}
    clip_qkv: ClassVar[None] = None  # OLMo 2 does not clip q/k/v (OLMoE's build reads it)

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    num_experts: int = 7
    num_experts_per_tok: int = 5
    norm_topk_prob: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)


class PostNormDecoderLayer(nn.Module):
    """h + norm(attention(h)), then h + norm(mlp(h)) (OLMo 2)."""

    def __init__(self, attention: nn.Module, mlp: nn.Module, hidden: int, eps: float):
        super().__init__()
        self.self_attn, self.mlp = attention, mlp
        self.post_attention_layernorm = UpcastRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = UpcastRMSNorm(hidden, eps)

    def forward(self, h: torch.Tensor, step: Step, kv) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(h, step, kv))
        return h + self.post_feedforward_layernorm(self.mlp(h))


def build(args: FlexOlmoArgs) -> CausalLM:
    return olmoe.build(args, layer=PostNormDecoderLayer, norm=UpcastRMSNorm)


FAMILY = Family(
    architectures=("FlexOlmoForCausalLM",),
    model_type="flex_olmo",
    args=FlexOlmoArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    example="allenai/FlexOlmo-7x7B-1T",
)
