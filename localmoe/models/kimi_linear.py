"""Kimi-Linear (KimiLinearForCausalLM, e.g. moonshotai/Kimi-Linear-48B-A3B-Instruct): Kimi Delta Attention
in most layers and DeepSeek's latent attention without position embeddings (NoPE) in the rest, on
DeepSeek-V3's MoE (dense first layers, a shared expert, sigmoid routing with a correction bias). The
release's config keeps the linear attention's sizes and layer lists in `linear_attn_config`."""

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from localmoe.models.attention import LatentAttention
from localmoe.models.deepseek_v2 import build
from localmoe.models.deepseek_v3 import DeepseekV3Args
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family
from localmoe.models.kimi_delta_attention import KimiDeltaAttention
from localmoe.models.moe import FUSED_EXPERTS, MIXTRAL_EXPERTS


@dataclass
class KimiLinearArgs(DeepseekV3Args):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        "max_position_embeddings": ("model_max_length",),
        "norm_topk_prob": ("moe_renormalize",),
        "n_group": ("num_expert_group",),
        "n_routed_experts": ("num_experts", "num_local_experts"),
        "num_experts_per_tok": ("num_experts_per_token",),
        "n_shared_experts": ("num_shared_experts",),
    }

    moe_intermediate_size: int = 1024
    first_k_dense_replace: int = 1
    n_group: int | None = 1
    topk_group: int | None = 1
    q_lora_rank: int | None = None
    routed_scaling_factor: float = 2.446
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 1048576
    layer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None
    linear_attn_config: dict | None = None
    linear_head_dim: int = 128
    linear_num_heads: int = 32
    linear_conv_kernel_dim: int = 4

    @classmethod
    def from_config(cls, config: dict) -> "KimiLinearArgs":
        # transformers 5.24 keeps Kimi-Linear's LM head apart whatever tie_word_embeddings says (it declares
        # no tied weights, and save_pretrained writes lm_head.weight)
        return super().from_config({**config, "tie_word_embeddings": False})

    def linear(self, i: int) -> bool:
        """Whether layer i is Kimi Delta Attention (else latent attention): as `layer_types`, or the
        release's 1-based `linear_attn_config["kda_layers"]`, or transformers' default (full attention
        in every fourth layer from the fifth)."""
        if self.layer_types is not None:
            return self.layer_types[i] == "linear_attention"
        if "kda_layers" in (self.linear_attn_config or {}):
            return i + 1 in self.linear_attn_config["kda_layers"]
        return not (i and i % 4 == 0)

    def linear_size(self, key: str, field: str) -> int:
        return (self.linear_attn_config or {}).get(key, getattr(self, field))

    def is_dense(self, i: int) -> bool:
        if self.mlp_layer_types is not None:
            return self.mlp_layer_types[i] == "dense"
        return i < self.first_k_dense_replace

    def attention(self, i: int) -> nn.Module:
        if self.linear(i):
            return KimiDeltaAttention(
                self.hidden_size,
                self.linear_size("num_heads", "linear_num_heads"),
                self.linear_size("head_dim", "linear_head_dim"),
                self.linear_size("short_conv_kernel_size", "linear_conv_kernel_dim"),
                self.rms_norm_eps,
                self.hidden_act,
            )
        return LatentAttention(
            self.hidden_size,
            self.num_attention_heads,
            q_lora_rank=self.q_lora_rank,
            kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            bias=self.attention_bias,
            interleaved_rope=False,
            scale=(self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5,
            rope=False,
        )


FAMILY = Family(
    architectures=("KimiLinearForCausalLM",),
    model_type="kimi_linear",
    args=KimiLinearArgs,
    model=build,
    experts=(PerExpert(MIXTRAL_EXPERTS), FUSED_EXPERTS),
    # the shared expert's alias first: both apply to its names (block_sparse_moe.shared_experts.)
    hub_aliases=((".mlp.shared_expert.", ".mlp.shared_experts."), (".mlp.", ".block_sparse_moe.")),
    keep_float32=("e_score_correction_bias", "mlp.gate.weight", "dt_bias"),
    example="moonshotai/Kimi-Linear-48B-A3B-Instruct",
)
