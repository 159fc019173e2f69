"""What a model family declares: its config fields, how to build it, and where its weights live on disk."""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from localmoe.errors import LocalMoEError
from localmoe.models.expert_tensors import ExpertTensors
from localmoe.models.layers import Backbone, CausalLM, RMSNorm
from localmoe.models.rotary import RotaryEmbedding, rope_parameters


@dataclass
class ModelArgs:
    """Base of every family's config dataclass.

    `from_config` takes the fields the family declares and ignores the rest, so a field added to
    config.json by a newer release does not break loading. Defaults mirror transformers' config
    classes, since a Hub config.json leaves out whatever equals the default.
    """

    default_rope_theta: ClassVar[float] = 10_000.0
    default_rope: ClassVar[dict[str, Any]] = {}  # rotary settings where the config is silent
    # field -> other keys configs use for it (transformers' `attribute_map`, seen from the other side)
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelArgs":
        values = {}
        for field in dataclasses.fields(cls):
            if field.name == "rope":
                values["rope"] = rope_parameters(config, cls.default_rope_theta, cls.default_rope)
                continue
            present = [key for key in (field.name, *cls.config_aliases.get(field.name, ())) if key in config]
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            if present and (config[present[0]] is not None or not required):
                values[field.name] = config[present[0]]  # an explicit null counts: it means "none" (q_lora_rank)
            elif required:
                raise LocalMoEError(
                    f"config.json lacks {field.name}, which {cls.__name__} needs: the config is damaged"
                )
        return cls(**values)

    @property
    def attention_head_dim(self) -> int:
        """`head_dim` where the config gives one, else the hidden size split over the attention heads."""
        return getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads

    @property
    def key_value_heads(self) -> int:
        """`num_key_value_heads` where the config gives one, else one per attention head."""
        return getattr(self, "num_key_value_heads", None) or self.num_attention_heads


@dataclass(frozen=True)
class Multimodal:
    """A multimodal architecture whose checkpoints hold a family's language model beside other towers:
    its text config is `text_config`, its text tensors are under the stored prefixes of `prefixes`
    (pairs of (our prefix, stored prefix)). localmoe runs the language model alone."""

    architecture: str
    prefixes: tuple[tuple[str, str], ...]
    text_model_type: str | None = None  # where the wrapper also ships other language models


@dataclass(frozen=True)
class ReleaseLayout:
    """A maker's own checkpoint layout beside transformers' (DeepSeek-V4's release): a checkpoint holding
    `marker` is read through `prefixes`, pairs of (transformers' prefix, the release's prefix); tensors
    under no prefix (multi-token prediction layers) are not the model's."""

    marker: str
    prefixes: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Family:
    """One model family: the architectures it serves, its args, its model, and its on-disk tensor names.

    Resident weights are found under the model's own parameter names (which follow transformers'
    in-memory names), or under those names with `hub_aliases` applied: pairs (our fragment, Hub
    fragment) for checkpoints that spell a module differently. Those whose names contain a fragment
    of `keep_float32` stay in float32 whatever the compute dtype. Routed experts are declared apart,
    in `experts` (the layouts their checkpoints come in, in order of preference), because the
    runtime, not the model, owns them. `multimodal` lists the architectures that wrap the family's
    language model with other inputs; `release`, a layout of the maker's own that it also reads.
    """

    architectures: tuple[str, ...]
    model_type: str
    args: type[ModelArgs]
    model: Callable[[Any], nn.Module]
    experts: tuple[ExpertTensors, ...]
    hub_aliases: tuple[tuple[str, str], ...] = ()
    keep_float32: tuple[str, ...] = ()
    quantizations: tuple[str, ...] = ()  # quantization_config.quant_method values only it reads
    multimodal: tuple[Multimodal, ...] = ()
    release: ReleaseLayout | None = None
    example: str = ""

    @property
    def wrapper_architectures(self) -> tuple[str, ...]:
        return tuple(wrapper.architecture for wrapper in self.multimodal)

    def disk_names(self, name: str) -> list[str]:
        """Names under which parameter `name` may be stored, the Hub's spelling first."""
        aliased = [name.replace(ours, hub) for ours, hub in self.hub_aliases if ours in name]
        return [*aliased, name]


def causal_lm(
    args: Any, layers: list[nn.Module], rotary_dim: int, *, norm=RMSNorm, rotary=RotaryEmbedding, lm_head_bias=False
) -> CausalLM:
    """The stack around a family's decoder layers, from the config fields every family has (vocab_size,
    hidden_size, rms_norm_eps, rope, max_position_embeddings, tie_word_embeddings)."""
    return CausalLM(
        Backbone(args.vocab_size, args.hidden_size, layers, args.rms_norm_eps, norm=norm),
        rotary(args.rope, rotary_dim, args.max_position_embeddings),
        tie_word_embeddings=args.tie_word_embeddings,
        max_position_embeddings=args.max_position_embeddings,
        lm_head_bias=lm_head_bias,
    )
