"""Qwen3-VL-MoE's language model (of Qwen3VLMoeForConditionalGeneration, e.g. Qwen/Qwen3-VL-30B-A3B-Instruct):
Qwen3-MoE's layers. Its multimodal rotary (MRoPE) gives each section of a head the temporal, height or
width position of a token; text tokens have the same three, so it is the ordinary rotary on text.
The release stores the experts fused per layer and transposed, under the names transformers keeps them
untransposed in memory; both load."""

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from localmoe.models import qwen3_moe
from localmoe.models.expert_tensors import Fused
from localmoe.models.family import Family, Multimodal
from localmoe.models.layers import CausalLM
from localmoe.models.moe import FUSED_EXPERTS


@dataclass
class Qwen3VLMoeTextArgs(qwen3_moe.Qwen3MoeArgs):
    default_rope_theta: ClassVar[float] = 500_000.0

    num_key_value_heads: int = 16
    moe_intermediate_size: int = 1408
    num_experts: int = 60
    num_experts_per_tok: int = 4
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = False  # the wrapper's default, which decides: the LM head is the wrapper's
    rope: dict = field(default_factory=dict)


def build(args: Qwen3VLMoeTextArgs) -> CausalLM:
    # its router always renormalises the top k and its attention has no window, whatever the config says
    return qwen3_moe.build(dataclasses.replace(args, norm_topk_prob=True, use_sliding_window=False))


FAMILY = Family(
    architectures=(),  # transformers has no text-only causal LM of it
    model_type="qwen3_vl_moe_text",
    args=Qwen3VLMoeTextArgs,
    model=build,
    experts=(
        Fused(
            "model.layers.{layer}.mlp.experts.gate_up_proj",
            "model.layers.{layer}.mlp.experts.down_proj",
            transposed=True,
        ),
        FUSED_EXPERTS,
    ),
    # the vision tower (model.visual.*) is left on disk
    multimodal=(
        Multimodal(
            "Qwen3VLMoeForConditionalGeneration",
            (("model.", "model.language_model."), ("lm_head.", "lm_head.")),
        ),
    ),
    example="Qwen/Qwen3-VL-30B-A3B-Instruct",
)
