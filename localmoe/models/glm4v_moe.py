"""GLM-4.5V (the language model of Glm4vMoeForConditionalGeneration; transformers defines no text-only
class): GLM-4.5's model with q/k/v biases by default and no q/k norm. Its multimodal rotary gives
each of three sections of the rotated dims its own position (time, height, width); text tokens have
the same position in all three, which makes it the plain rotary on half of each head."""

from dataclasses import dataclass

from localmoe.models import glm4_moe
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, Multimodal
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS


@dataclass
class Glm4vMoeTextArgs(glm4_moe.Glm4MoeArgs):
    attention_bias: bool = True
    max_position_embeddings: int = 65536


FAMILY = Family(
    architectures=(),
    model_type="glm4v_moe_text",
    args=Glm4vMoeTextArgs,
    model=glm4_moe.build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    hub_aliases=((".mlp.shared_expert.", ".mlp.shared_experts."),),
    keep_float32=("e_score_correction_bias",),
    # the vision tower (model.visual.*) stays on disk
    multimodal=(
        Multimodal(
            "Glm4vMoeForConditionalGeneration",
            (("model.", "model.language_model."), ("lm_head.", "lm_head.")),
        ),
    ),
    example="zai-org/GLM-4.5V",
)
