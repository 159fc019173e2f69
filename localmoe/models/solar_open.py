"""Solar Open (SolarOpenForCausalLM, Upstage): Llama's attention (q/k/v biases where the config asks,
none on the output) with rotary over the whole head, and every layer a GLM-4.5 MoE block: sigmoid
routing with a correction bias over the best groups, plus shared experts."""

from dataclasses import dataclass, field
from typing import ClassVar

from localmoe.models import glm4_moe
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS


@dataclass
class SolarOpenArgs(ModelArgs):
    default_rope_theta: ClassVar[float] = 1_000_000.0
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"n_routed_experts": ("num_local_experts",)}
    # what GLM-4.5's build reads and Solar Open fixes: no dense layers, no q/k norm, no MTP layers
    first_k_dense_replace: ClassVar[int] = 0
    intermediate_size: ClassVar[int] = 0
    use_qk_norm: ClassVar[bool] = False
    num_nextn_predict_layers: ClassVar[int] = 0

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 8
    head_dim: int | None = 128
    moe_intermediate_size: int = 1280
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    n_routed_experts: int = 128
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    attention_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)


FAMILY = Family(
    architectures=("SolarOpenForCausalLM",),
    model_type="solar_open",
    args=SolarOpenArgs,
    model=glm4_moe.build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    hub_aliases=((".mlp.shared_expert.", ".mlp.shared_experts."),),
    keep_float32=("e_score_correction_bias",),
    example="upstage/Solar-Open-100B",
)
