"""Mistral Small 4 (Mistral4ForCausalLM, and the language model of Mistral3ForConditionalGeneration
checkpoints that hold one): DeepSeek-V3's latent attention with rotary on interleaved pairs and the
queries scaled up with position (Llama 4's scaling), softmax routing over the best groups of experts
ranked by their top-two sums, and a shared expert."""

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from localmoe.models.deepseek_v2 import DeepseekV2Args, build
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, Multimodal
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GroupedTopKRouter


@dataclass
class Mistral4Args(DeepseekV2Args):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"n_routed_experts": ("num_local_experts",)}

    num_experts_per_tok: int = 4
    n_routed_experts: int = 128
    n_shared_experts: int | None = 1
    moe_intermediate_size: int = 2048
    kv_lora_rank: int = 256
    q_lora_rank: int | None = 1024
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_group: int | None = 1
    topk_group: int | None = 1
    norm_topk_prob: bool = True
    max_position_embeddings: int = 1048576

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelArgs:
        if not (config.get("rope_parameters") or config.get("rope_scaling")):  # transformers' default, whole
            config = {**config, "rope_parameters": DEFAULT_ROPE}
        args = super().from_config(config)
        partial = args.qk_rope_head_dim / (args.qk_nope_head_dim + args.qk_rope_head_dim)
        return dataclasses.replace(args, rope={"partial_rotary_factor": partial, **args.rope})

    @property
    def rotary_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim  # the partial factor leaves the rope dims

    @property
    def position_scaling(self) -> tuple[float, int] | None:
        beta = self.rope.get("llama_4_scaling_beta")
        return None if beta is None else (beta, self.rope["original_max_position_embeddings"])

    def router(self) -> nn.Module:
        return top2_group_router(self, self.norm_topk_prob)


def top2_group_router(args: DeepseekV2Args, normalize: bool) -> GroupedTopKRouter:
    """Softmax scores over the best groups of experts, ranked by their top-two sums, no correction bias
    (Mistral 4 and Mistral Large 4)."""
    return GroupedTopKRouter(
        args.hidden_size,
        args.n_routed_experts,
        args.num_experts_per_tok,
        scoring="softmax",
        n_group=args.n_group or 1,
        topk_group=args.topk_group or 1,
        normalize=normalize,
        scaling=args.routed_scaling_factor,
        correction_bias=False,
        group_by_top2=True,
    )


DEFAULT_ROPE = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 128.0,
    "original_max_position_embeddings": 8192,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "llama_4_scaling_beta": 0.1,
}


FAMILY = Family(
    architectures=("Mistral4ForCausalLM",),
    model_type="mistral4",
    args=Mistral4Args,
    model=build,
    experts=(FUSED_EXPERTS, PerExpert(MLP_EXPERTS)),
    hub_aliases=((".mlp.shared_expert.", ".mlp.shared_experts."),),
    multimodal=(
        Multimodal(
            "Mistral3ForConditionalGeneration",
            (("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")),
            text_model_type="mistral4",
        ),
    ),
    example="mistralai/Mistral-Small-4-119B-2603",
)
