"""A.X-K1 (AXK1ForCausalLM, e.g. skt/A.X-K1): DeepSeek-V3 (latent attention with queries through their
bottleneck, grouped sigmoid routing with a correction bias, a shared expert) with dense or MoE layers as
`mlp_layer_types` lists them and an RMSNorm on each MoE block's output, which the Hub stores at the
layer's level (`post_mlp_layernorm`)."""

from dataclasses import dataclass
from functools import partial

import torch

from localmoe.models.deepseek_v2 import build as deepseek_build
from localmoe.models.deepseek_v3 import DeepseekV3Args
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family
from localmoe.models.layers import CausalLM, RMSNorm
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS, SparseMoE


@dataclass
class AXK1Args(DeepseekV3Args):
    n_routed_experts: int = 192
    q_lora_rank: int | None = 1536
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    mlp_layer_types: list[str] | None = None
    first_k_dense_replace: int = 1  # with moe_layer_freq, the older spelling of mlp_layer_types
    moe_layer_freq: int = 1

    def is_dense(self, i: int) -> bool:
        if self.mlp_layer_types is None:
            return not (i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0)
        return self.mlp_layer_types[i] == "dense"


class NormedMoE(SparseMoE):
    """The MoE block's output (routed and shared experts) RMS-normalised."""

    def __init__(self, *args, eps: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.post_mlp_layernorm = RMSNorm(self.hidden_size, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post_mlp_layernorm(super().forward(x))


def build(args: AXK1Args) -> CausalLM:
    return deepseek_build(args, moe=partial(NormedMoE, eps=args.rms_norm_eps))


FAMILY = Family(
    architectures=("AXK1ForCausalLM",),
    model_type="axk1",
    args=AXK1Args,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    hub_aliases=((".mlp.shared_expert.", ".mlp.shared_experts."), (".mlp.post_mlp_layernorm.", ".post_mlp_layernorm.")),
    keep_float32=("e_score_correction_bias",),
    example="skt/A.X-K1",
)
