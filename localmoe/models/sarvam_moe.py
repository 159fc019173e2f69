"""Sarvam-30B (sarvam_moe, Sarvam AI): GLM-4.5's model (per-head q/k RMSNorm, a dense first layer,
sigmoid routing with a correction bias over the best groups, shared experts) with rotary over the
whole head, stored under Sarvam's names: one fused `query_key_value` projection, `dense` for the
output, `word_embeddings`. transformers runs it as Glm4MoeForCausalLM and saves it under that
architecture; the Hub's config names its own (remote-code) SarvamMoEForCausalLM."""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from localmoe.models import glm4_moe
from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family
from localmoe.models.layers import CausalLM
from localmoe.models.moe import MLP_EXPERTS


@dataclass
class SarvamMoeArgs(glm4_moe.Glm4MoeArgs):
    default_rope_theta: ClassVar[float] = 8_000_000.0
    default_rope: ClassVar[dict] = {}  # unlike GLM-4.5, rotary over the whole head
    # the original config's names, which transformers also reads
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        "n_routed_experts": ("num_experts", "num_local_experts"),
        "n_shared_experts": ("num_shared_experts",),
        "attention_bias": ("use_qkv_bias",),
    }

    num_key_value_heads: int = 4
    head_dim: int | None = 64
    moe_intermediate_size: int = 1024
    num_experts_per_tok: int = 6
    routed_scaling_factor: float = 2.5
    use_qk_norm: bool = True
    rms_norm_eps: float = 1e-6


class FusedQKVAttention(Attention):
    """Attention whose queries, keys and values come from one projection, rows [q | k | v]."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, *, qkv_bias: bool, **options):
        super().__init__(hidden, heads, kv_heads, head_dim, qkv_bias=qkv_bias, **options)
        del self.q_proj, self.k_proj, self.v_proj
        self.query_key_value = nn.Linear(hidden, (heads + 2 * kv_heads) * head_dim, bias=qkv_bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kv_width = self.kv_heads * self.head_dim
        return self.query_key_value(x).split((self.heads * self.head_dim, kv_width, kv_width), dim=-1)


def build(args: SarvamMoeArgs) -> CausalLM:
    return glm4_moe.build(args, attention=FusedQKVAttention)


FAMILY = Family(
    architectures=("SarvamMoEForCausalLM",),
    model_type="sarvam_moe",
    args=SarvamMoeArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS),),
    hub_aliases=(
        ("model.embed_tokens.", "model.word_embeddings."),
        (".self_attn.query_key_value.", ".attention.query_key_value."),
        (".self_attn.o_proj.", ".attention.dense."),
        (".self_attn.q_norm.", ".attention.query_layernorm."),
        (".self_attn.k_norm.", ".attention.key_layernorm."),
        (".mlp.gate.e_score_correction_bias", ".mlp.gate.expert_bias"),
        (".mlp.shared_expert.", ".mlp.shared_experts."),
    ),
    keep_float32=("e_score_correction_bias",),
    example="sarvamai/sarvam-30b",
)
