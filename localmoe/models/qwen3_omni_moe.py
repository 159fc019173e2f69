"""Qwen3-Omni's language model (the thinker's, of Qwen3OmniMoeForConditionalGeneration, e.g.
Qwen/Qwen3-Omni-30B-A3B-Instruct): Qwen3-MoE's layers with top-k renormalisation as configured and no
window. Its multimodal rotary gives text tokens the ordinary one, as Qwen3-VL-MoE's does. The release
holds the thinker under `thinker.` beside the talker and the codec, its text config under
thinker_config.text_config; a thinker saved alone keeps its language model under `model.`."""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from localmoe.models import qwen3_moe
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, Multimodal
from localmoe.models.layers import CausalLM
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS


@dataclass
class Qwen3OmniMoeTextArgs(qwen3_moe.Qwen3MoeArgs):
    default_rope_theta: ClassVar[float] = 1_000_000.0

    norm_topk_prob: bool = True


def build(args: Qwen3OmniMoeTextArgs) -> CausalLM:
    # its attention has no window, whatever the config says
    return qwen3_moe.build(dataclasses.replace(args, use_sliding_window=False))


FAMILY = Family(
    architectures=(),  # transformers has no text-only causal LM of it
    model_type="qwen3_omni_moe_text",
    args=Qwen3OmniMoeTextArgs,
    model=build,
    experts=(PerExpert(MLP_EXPERTS), FUSED_EXPERTS),
    # the audio and vision towers, the talker and the codec are left on disk
    multimodal=(
        Multimodal(
            "Qwen3OmniMoeForConditionalGeneration",
            (("model.", "thinker.model."), ("lm_head.", "thinker.lm_head.")),
            text_config=("thinker_config", "text_config"),
        ),
        Multimodal("Qwen3OmniMoeThinkerForConditionalGeneration", (("model.", "model."), ("lm_head.", "lm_head."))),
    ),
    example="Qwen/Qwen3-Omni-30B-A3B-Instruct",
)
