"""Hy4-VL's language model (HYV4VLForConditionalGeneration, text only; transformers defines no text-only
class): Hy4's model (hy_v4.py) whose latent norms take the config's eps and whose attention and indexer
rotate adjacent pairs. Its multimodal rotary gives each of three sections of the rotated dims its own
position (time, height, width); text tokens have the same position in all three, which makes it the plain
rotary."""

from dataclasses import dataclass

from localmoe.models import hy_v4
from localmoe.models.family import Family, Multimodal


@dataclass
class HYV4VLTextArgs(hy_v4.HYV4Args):
    q_lora_rank: int | None = 2048
    index_n_heads: int = 32

    @property
    def latent_eps(self) -> float:
        return self.rms_norm_eps

    @property
    def interleaved_rope(self) -> bool:
        return True

    @property
    def interleaved_index_rope(self) -> bool:
        return True


FAMILY = Family(
    architectures=(),
    model_type="hy_v4_vl_text",
    args=HYV4VLTextArgs,
    model=hy_v4.build,
    experts=hy_v4.FAMILY.experts,
    hub_aliases=hy_v4.HUB_NAMES,
    keep_float32=hy_v4.KEEP_FLOAT32,
    # the language model is stored as the text model names it (transformers moves it under
    # model.language_model. when loading); the vision tower (vit.*) stays on disk
    multimodal=(Multimodal("HYV4VLForConditionalGeneration", (("model.", "model."), ("lm_head.", "lm_head."))),),
    example="tencent/Hy4",
)
