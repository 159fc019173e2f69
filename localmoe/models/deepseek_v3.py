"""DeepSeek-V3 (also DeepSeek-R1, Kimi-K2 and other checkpoints of this architecture): DeepSeek-V2's
latent attention and shared experts, with sigmoid routing whose learned correction bias steers the
choice of experts (kept in float32) but not their weights. The multi-token-prediction layers that follow
the last layer in the checkpoint (`model.layers.{num_hidden_layers}.*`) are loaded as `mtp`, for drafts
(see localmoe/models/mtp.py)."""

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from localmoe.models.deepseek_v2 import DeepseekV2Args, build
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import DEEPSEEK_MTP, Family, Multimodal
from localmoe.models.layers import CausalLM
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, GroupedTopKRouter


@dataclass
class DeepseekV3Args(DeepseekV2Args):
    default_rope_theta: ClassVar[float] = 10_000.0
    dropped_group_score: ClassVar[float | None] = None  # what dropped groups' experts score (None: -inf)

    num_experts_per_tok: int = 8
    n_routed_experts: int = 256
    n_shared_experts: int | None = 1
    moe_intermediate_size: int = 2048
    first_k_dense_replace: int = 3
    n_group: int | None = 8
    topk_group: int | None = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    num_nextn_predict_layers: int = 0  # transformers says 1; a config that does not say so promises none

    def router(self) -> nn.Module:
        return GroupedTopKRouter(
            self.hidden_size,
            self.n_routed_experts,
            self.num_experts_per_tok,
            scoring="sigmoid",
            n_group=self.n_group or 1,
            topk_group=self.topk_group or 1,
            normalize=self.norm_topk_prob,
            scaling=self.routed_scaling_factor,
            correction_bias=True,
            dropped=self.dropped_group_score,
        )

    @property
    def interleaved_rope(self) -> bool:
        return self.rope_interleave


def build_v3(args: DeepseekV3Args) -> CausalLM:
    return build(args, mtp=args.num_nextn_predict_layers)


FAMILY = Family(
    architectures=("DeepseekV3ForCausalLM",),
    model_type="deepseek_v3",
    args=DeepseekV3Args,
    model=build_v3,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    hub_aliases=((".mlp.shared_expert.", ".mlp.shared_experts."),),
    keep_float32=("e_score_correction_bias",),
    # Kimi-K2.5/K2.6: a DeepSeek-V3 language model beside a vision tower (the Hub's remote-code name first)
    multimodal=tuple(
        Multimodal(name, (("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")))
        for name in ("KimiK25ForConditionalGeneration", "Kimi_K25ForConditionalGeneration")
    ),
    mtp=DEEPSEEK_MTP,
    example="moonshotai/Moonlight-16B-A3B-Instruct",
)
