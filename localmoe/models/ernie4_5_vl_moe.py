"""ERNIE-4.5-VL's language model (Ernie4_5_VLMoeForConditionalGeneration, e.g.
baidu/ERNIE-4.5-VL-28B-A3B-PT): ERNIE 4.5's MoE with experts isolated by modality. Text tokens go to the
text experts (the first `moe_num_experts` of each layer on the Hub) and the text router; the vision
experts (the rest, of another size) and their router serve image and video tokens only, and stay on
disk. Its multimodal rotary gives text tokens the ordinary rotary on adjacent pairs. The Hub stores each
router transposed ([hidden, experts]) and the two correction biases stacked ([2, experts], text first)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.models import ernie4_5_moe
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, Multimodal
from localmoe.models.layers import CausalLM
from localmoe.models.moe import MLP_EXPERTS, Routing


@dataclass
class Ernie45VLMoeTextArgs(ernie4_5_moe.Ernie45MoeArgs):
    moe_intermediate_size: list[int] | None = None  # [text, vision]
    mlp_layer_types: list[str] | None = None

    def is_moe_layer(self, i: int) -> bool:
        return self.mlp_layer_types[i] == "sparse" if self.mlp_layer_types else i > 0

    def expert_size(self) -> int:
        return self.moe_intermediate_size[0] if self.moe_intermediate_size else 1536


class TextRouter(ernie4_5_moe.ErnieRouter):
    """ERNIE's router over the text experts, its weight [hidden, experts] and the correction biases of
    both modalities [2, experts] as stored."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, norm_min: float):
        super().__init__(hidden, num_experts, top_k, norm_min)
        self.weight = nn.Parameter(torch.empty(hidden, num_experts))
        self.moe_statics.e_score_correction_bias = nn.Parameter(torch.empty(2, num_experts))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float().T).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> Routing:
        probs = self.scores(x)
        ids = (probs + self.moe_statics.e_score_correction_bias[0].float()).topk(self.top_k, dim=-1).indices
        weights = probs.gather(-1, ids)
        return Routing(weights / weights.sum(dim=-1, keepdim=True).clamp(min=self.norm_min), ids, probs)


def build(args: Ernie45VLMoeTextArgs) -> CausalLM:
    return ernie4_5_moe.build(args, router=TextRouter, lm_head_bias=False, mtp=False)


PREFIXES = (("model.", "model."), ("lm_head.", "lm_head."))

FAMILY = Family(
    architectures=(),  # transformers has no text-only causal LM of it
    model_type="ernie4_5_vl_moe_text",
    args=Ernie45VLMoeTextArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS),),
    hub_aliases=(
        (".mlp.gate.moe_statics.", ".mlp.moe_statics."),
        (".mlp.shared_expert.", ".mlp.shared_experts."),
    ),
    keep_float32=("mlp.gate.weight", "moe_statics"),
    # the vision tower, the resampler and the vision experts are left on disk
    multimodal=(
        Multimodal("Ernie4_5_VLMoeForConditionalGeneration", PREFIXES),
        Multimodal("Ernie4_5_VL_MoeForConditionalGeneration", PREFIXES),
    ),
    example="baidu/ERNIE-4.5-VL-28B-A3B-PT",
)
