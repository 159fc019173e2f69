"""What a model family declares: its config fields, how to build it, and where its weights live on disk."""

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from localmoe.errors import LocalMoEError
from localmoe.models.expert_tensors import ExpertTensors
from localmoe.models.layers import Backbone, CausalLM, RMSNorm
from localmoe.models.mtp import MTPLayer, MultiTokenPredictor
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
        """The family's fields from `config`, each checked against its declared type and range, and
        then against each other (`check`): a damaged value is one line naming it."""
        values = {}
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.name == "rope":
                values["rope"] = rope_parameters(config, cls.default_rope_theta, cls.default_rope)
                _check_rope(values["rope"])
                continue
            present = [key for key in (field.name, *cls.config_aliases.get(field.name, ())) if key in config]
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            if present and (config[present[0]] is not None or not required):
                values[field.name] = config[present[0]]  # an explicit null counts: it means "none" (q_lora_rank)
                _check_value(present[0], config[present[0]], hints[field.name])
            elif required:
                raise LocalMoEError(
                    f"config.json lacks {field.name}, which {cls.__name__} needs: the config is damaged"
                )
        args = cls(**values)
        args.check()
        return args

    @property
    def attention_head_dim(self) -> int:
        """`head_dim` where the config gives one, else the hidden size split over the attention heads."""
        return getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads

    @property
    def key_value_heads(self) -> int:
        """`num_key_value_heads` where the config gives one, else one per attention head."""
        return getattr(self, "num_key_value_heads", None) or self.num_attention_heads

    def check(self) -> None:
        """Refuse values that contradict each other: more experts per token than experts, groups that do
        not divide the experts, heads that do not share key-value heads evenly."""
        for contradiction in self._contradictions():
            raise LocalMoEError(f"config.json {contradiction}: the config is damaged")

    def _contradictions(self) -> Iterator[str]:
        experts = next((getattr(self, n) for n in EXPERT_COUNTS if getattr(self, n, None) is not None), None)
        top_k = next((getattr(self, n) for n in EXPERTS_PER_TOKEN if getattr(self, n, None) is not None), None)
        top_k = max(top_k, default=None) if isinstance(top_k, list) else top_k
        if experts and top_k and top_k > experts:
            yield f"routes each token to {top_k} experts, and has {experts} per layer"
        groups, chosen = getattr(self, "n_group", None), getattr(self, "topk_group", None)
        if experts and groups and experts % groups:
            yield f"has n_group {groups}, which does not divide its {experts} experts"
        elif groups and chosen and chosen > groups:
            yield f"has topk_group {chosen}, more than its n_group {groups}"
        elif experts and groups and chosen and top_k and top_k > chosen * (experts // groups):
            yield f"routes each token to {top_k} experts, more than {chosen} groups of {experts // groups} hold"
        heads, kv_heads = getattr(self, "num_attention_heads", None), getattr(self, "num_key_value_heads", None)
        if heads and kv_heads and kv_heads <= heads and heads % kv_heads:  # more: latent attention ignores it
            yield f"has {heads} attention heads, which cannot share {kv_heads} key-value heads evenly"
        if heads and hasattr(self, "head_dim") and self.head_dim is None and self.hidden_size % heads:
            yield f"has no head_dim, and hidden_size {self.hidden_size} does not split over {heads} attention heads"


# Names configs give the experts per MoE layer and the experts each token is routed to.
EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
EXPERTS_PER_TOKEN = ("num_experts_per_tok", "moe_k", "moe_topk", "top_k_experts", "moe_top_k")
# Integer fields that may be 0 (none of something) or negative (counted from the end); every other integer
# field counts or sizes something and is at least 1, and the integers in lists (layer indices) at least 0.
MAY_BE_ZERO = frozenset(
    {
        "first_k_dense_replace",
        "n_shared_experts",
        "moe_num_shared_experts",
        "num_kv_shared_layers",
        "num_hash_layers",
        "index_skip_topk_offset",
        "qk_rope_head_dim",  # GLM-5.3-Flash: latent attention without rotary
        "max_window_layers",
        "moe_layer_start_index",
        "sliding_window",
        "hidden_size_per_layer_input",
        "num_dense_layers",
        "num_nextn_predict_layers",
        "mtp_num_hidden_layers",
        "num_mtp_modules",  # MiniMax-M3
        "num_mtp_layers",  # Mellum, Bailing
        "num_shared_experts",
        "shared_intermediate_size",  # GraniteMoeShared: no shared MLP
        "attn_layer_offset",  # Jamba
        "expert_layer_offset",
        "zero_expert_num",  # LongCat-Flash: no identity experts
        "seed",  # Qwen4-Exp's n-gram hashes
    }
)
MAY_BE_NEGATIVE = frozenset({"moe_layer_end_index"})  # ERNIE: -1 for the last layer
# Fields whose infinity is a setting (Mamba's time step limit (0, inf): no upper clamp); transformers 5
# writes it as {"__float__": "Infinity"}.
MAY_BE_INFINITE = frozenset({"time_step_limit"})


def _check_value(key: str, value: Any, kind: Any) -> None:
    if key in MAY_BE_INFINITE and isinstance(value, list):
        value = [0.0 if isinstance(item, float) and math.isinf(item) else item for item in value]
    if not _fits(value, kind):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise LocalMoEError(f"config.json: {key} is {shown}, not {_describe(kind)}: the config is damaged")
    if _is_int(value):
        least = None if key in MAY_BE_NEGATIVE else 0 if key in MAY_BE_ZERO else 1
        if least is not None and value < least:
            raise LocalMoEError(f"config.json: {key} is {value}, and must be at least {least}: the config is damaged")
    if isinstance(value, list) and any(_is_int(item) and item < 0 for item in value):
        raise LocalMoEError(f"config.json: {key} holds a negative number: the config is damaged")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_rope(params: dict[str, Any]) -> None:
    theta = params.get("rope_theta")
    if not (_fits(theta, float) and theta > 0):
        raise LocalMoEError(f"config.json: rope_theta is {theta!r}, not a positive number: the config is damaged")


def _fits(value: Any, kind: Any) -> bool:
    """Whether a JSON value has the declared type; a type this check does not know, the family reads as it will."""
    origin, arguments = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, option) for option in arguments)
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return _is_int(value)
    if kind is float:  # JSON writes 1e6 as an integer too; NaN and infinity are no setting
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if kind is str:
        return isinstance(value, str)
    if kind is list or origin is list:
        return isinstance(value, list) and all(_fits(item, arguments[0]) for item in value if arguments)
    if kind is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _describe(kind: Any) -> str:
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        return " or ".join(_describe(option) for option in typing.get_args(kind))
    if typing.get_origin(kind) is list and typing.get_args(kind):
        return f"a list of ({_describe(typing.get_args(kind)[0])})"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a finite number", str: "text"}
    return names.get(kind, "a list" if kind is list else "an object" if kind is dict else str(kind))


@dataclass(frozen=True)
class Multimodal:
    """A multimodal architecture whose checkpoints hold a family's language model beside other towers:
    its text config is where the keys of `text_config` lead (the config's `text_config`, usually), its text
    tensors are under the stored prefixes of `prefixes` (pairs of (our prefix, stored prefix)). localmoe runs
    the language model alone."""

    architecture: str
    prefixes: tuple[tuple[str, str], ...]
    text_model_type: str | None = None  # where the wrapper also ships other language models
    text_config: tuple[str, ...] = ("text_config",)  # the keys leading to it (Qwen3-Omni: thinker_config first)


@dataclass(frozen=True)
class ReleaseLayout:
    """A maker's own checkpoint layout beside transformers' (DeepSeek-V4's release): a checkpoint holding
    `marker` is read through `prefixes`, pairs of (transformers' prefix, the release's prefix); tensors
    under no prefix (multi-token prediction layers) are not the model's."""

    marker: str
    prefixes: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Interleaved:
    """Two parameters a release stores as one tensor, their slices alternating along `dim` (the first's,
    then the second's: gate and up in Inkling's `w13` tensors): a parameter whose name holds `first` or
    `second` and is not stored under its own names is read from the name with `stored` in their place
    (hub aliases applied as to any name), every other slice from the first or the second on."""

    first: str
    second: str
    stored: str
    dim: int

    def stored_as(self, name: str) -> tuple[str, int] | None:
        """(the stored tensor's name, where parameter `name`'s slices start), or None if it is neither."""
        for start, fragment in enumerate((self.first, self.second)):
            if fragment in name:
                return name.replace(fragment, self.stored), start
        return None


@dataclass(frozen=True)
class MtpLayout:
    """Where a release keeps its multi-token-prediction layers, when not under DeepSeek-V3's names
    (`model.layers.{num_hidden_layers + k}.*`, see localmoe/models/mtp.py): pairs of (DeepSeek-V3's prefix,
    the release's prefix) with {layer} (the decoder layers' count + k) and {depth} (k), the most specific
    first; `count`, the config field that says how many MTP layers there are (a dotted path into a section of
    the config: Inkling's `mtp_config.num_nextn_predict_layers`). The loader sees each tensor of the
    release's under DeepSeek-V3's name too, so that the MTP layers and their experts are read from there."""

    count: str
    prefixes: tuple[tuple[str, str], ...]
    layers: str = "num_hidden_layers"  # the config field that counts the decoder layers before them
    # the count where the config names none and the checkpoint stores the first layer's tensors (LongCat-Flash's
    # config says nothing: vLLM's and SGLang's configs default it to 1 and read `model.mtp.*` where it is stored)
    implied: int = 0

    def counted(self, config: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
        """`config`, with the count `implied` where it names none and a tensor in `names` is under the first
        layer's release prefix."""
        if not self.implied or self.stated(config) is not None:
            return config
        first = tuple(theirs for _, theirs in self.aliases({**config, self.count: 1}))
        return {**config, self.count: self.implied} if first and any(n.startswith(first) for n in names) else config

    def aliases(self, config: dict[str, Any]) -> list[tuple[str, str]]:
        """The pairs for the layers `config` promises (none where it says nothing readable: the config's
        own check refuses that later)."""
        layers, count = config.get(self.layers), self.stated(config)
        if not (_is_int(layers) and _is_int(count)):
            return []
        depths = range(min(count, layers))  # a damaged count must not make this loop for ever
        return [
            (ours.format(layer=layers + k, depth=k), theirs.format(layer=layers + k, depth=k))
            for k in depths
            for ours, theirs in self.prefixes
        ]

    def stated(self, config: dict[str, Any]) -> Any:
        """The count `config` states (None where it states none)."""
        value = config
        for key in self.count.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        return value

    def release_name(self, name: str, config: dict[str, Any]) -> str:
        """The release's name of tensor `name` (DeepSeek-V3's), for messages about one that is missing."""
        ours, theirs = next(((o, t) for o, t in self.aliases(config) if name.startswith(o)), ("", ""))
        return theirs + name[len(ours) :]


# DeepSeek-V3's own names, its MTP layers' final norm stored as shared_head.norm (what NormedMTPLayer calls
# final_layernorm)
DEEPSEEK_MTP = MtpLayout(
    "num_nextn_predict_layers", (("model.layers.{layer}.final_layernorm.", "model.layers.{layer}.shared_head.norm."),)
)


@dataclass(frozen=True)
class Family:
    """One model family: the architectures it serves, its args, its model, and its on-disk tensor names.

    Resident weights are found under the model's own parameter names (which follow transformers'
    in-memory names), or under those names with `hub_aliases` applied: pairs (our fragment, Hub
    fragment) for checkpoints that spell a module differently. Those whose names contain a fragment
    of `keep_float32` stay in float32 whatever the compute dtype. Routed experts are declared apart,
    in `experts` (the layouts their checkpoints come in, in order of preference), because the
    runtime, not the model, owns them. `multimodal` lists the architectures that wrap the family's
    language model with other inputs; a family with no `architectures` of its own is run only from them.
    `release` is a layout of the maker's own that it also reads; `interleaved`, pairs of parameters a
    release stores as one tensor.
    """

    architectures: tuple[str, ...]
    model_type: str
    args: type[ModelArgs]
    model: Callable[[Any], nn.Module]
    experts: tuple[ExpertTensors, ...]
    hub_aliases: tuple[tuple[str, str], ...] = ()
    interleaved: tuple[Interleaved, ...] = ()
    keep_float32: tuple[str, ...] = ()
    quantizations: tuple[str, ...] = ()  # quantization_config.quant_method values only it reads
    multimodal: tuple[Multimodal, ...] = ()
    release: ReleaseLayout | None = None
    mtp: MtpLayout | None = None  # where its releases keep their MTP layers, if not where DeepSeek-V3 does
    example: str = ""

    @property
    def name(self) -> str:
        """The family's name in messages: its text-only architecture, or its wrapper where transformers has
        no text-only one (Qwen3-VL-MoE, GLM-4.5V, Step-3.7)."""
        return (self.architectures or self.wrapper_architectures)[0]

    @property
    def wrapper_architectures(self) -> tuple[str, ...]:
        return tuple(wrapper.architecture for wrapper in self.multimodal)

    def disk_names(self, name: str) -> list[str]:
        """Names under which parameter `name` may be stored, the Hub's spelling first: with every alias
        that matches applied (Nemotron-H's `backbone.layers.N.mixer.shared_experts.`), then with each alone."""
        matching = [(ours, hub) for ours, hub in self.hub_aliases if ours in name]
        every = name
        for ours, hub in matching:
            every = every.replace(ours, hub)
        return list(dict.fromkeys([every, *(name.replace(ours, hub) for ours, hub in matching), name]))


def causal_lm(
    args: Any,
    layers: list[nn.Module],
    rotary_dim: int,
    *,
    norm=RMSNorm,
    rotary=RotaryEmbedding,
    lm_head_bias=False,
    embed_scale: float = 1.0,
    model=CausalLM,
    mtp: list[nn.Module] = (),
    mtp_layer=MTPLayer,
    **extra,
) -> CausalLM:
    """The stack around a family's decoder layers, from the config fields every family has (vocab_size,
    hidden_size, rms_norm_eps, rope, max_position_embeddings, tie_word_embeddings): a `model` (CausalLM
    or a subclass, given `extra` arguments of its own). `mtp`: the decoder layers of the checkpoint's
    multi-token-prediction layers, numbered on from the last of `layers` (see localmoe/models/mtp.py), each
    in an `mtp_layer` (MTPLayer or a subclass)."""
    if mtp:
        extra["mtp"] = MultiTokenPredictor(
            [mtp_layer(block, args.hidden_size, args.rms_norm_eps, norm) for block in mtp], len(layers)
        )
    return model(
        Backbone(args.vocab_size, args.hidden_size, layers, args.rms_norm_eps, norm=norm),
        rotary(args.rope, rotary_dim, args.max_position_embeddings),
        tie_word_embeddings=args.tie_word_embeddings,
        max_position_embeddings=args.max_position_embeddings,
        lm_head_bias=lm_head_bias,
        embed_scale=embed_scale,
        **extra,
    )
