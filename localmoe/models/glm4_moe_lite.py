"""GLM-4.7-Flash (Glm4MoeLiteForCausalLM, zai-org/GLM-4.7-Flash): DeepSeek-V3's latent attention on a
GLM-4.5 body (dense or MoE layers as `mlp_layer_types` lists them, a shared expert, sigmoid routing with
a correction bias). Its multi-token-prediction layer is stored as DeepSeek-V3's
(`model.layers.{num_hidden_layers}.*`: enorm, hnorm, eh_proj, shared_head.norm, a latent-attention MoE decoder
layer) and loaded as `mtp` for drafts (vLLM's glm4_moe_lite_mtp.py, Glm4MoeLiteMultiTokenPredictorLayer; SGLang's
glm4_moe_lite_nextn.py; see localmoe/models/mtp.py)."""

from dataclasses import dataclass
from typing import ClassVar

from localmoe.models.deepseek_v3 import DeepseekV3Args, build_v3
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import DEEPSEEK_MTP, Family
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS


@dataclass
class Glm4MoeLiteArgs(DeepseekV3Args):
    default_rope_theta: ClassVar[float] = 10_000.0

    num_key_value_heads: int = 20
    num_experts_per_tok: int = 4
    n_routed_experts: int = 64
    n_shared_experts: int | None = 1
    moe_intermediate_size: int = 1536
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 768
    qk_nope_head_dim: int = 192
    qk_rope_head_dim: int = 64
    v_head_dim: int = 256
    n_group: int | None = 1
    topk_group: int | None = 1
    routed_scaling_factor: float = 1.8
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 202752
    mlp_layer_types: list[str] | None = None

    def is_dense(self, i: int) -> bool:
        if self.mlp_layer_types is None:  # transformers' default: MoE from the second layer on
            return i == 0
        # the MTP layer past the list is an MoE one (vLLM: from first_k_dense_replace on, every layer)
        return i < len(self.mlp_layer_types) and self.mlp_layer_types[i] == "dense"


FAMILY = Family(
    architectures=("Glm4MoeLiteForCausalLM",),
    model_type="glm4_moe_lite",
    args=Glm4MoeLiteArgs,
    model=build_v3,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    hub_aliases=((".mlp.shared_expert.", ".mlp.shared_experts."),),
    keep_float32=("e_score_correction_bias",),
    mtp=DEEPSEEK_MTP,
    example="zai-org/GLM-4.7-Flash",
)
