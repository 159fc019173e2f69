"""Checkpoint + family -> a model skeleton checked against the checkpoint, its resident weights, and
its routed experts left on disk.

Everything the checkpoint must provide is checked against the shard headers before a byte of weights
is read, so a missing or misshapen tensor fails at once with its name. A tensor the model needs is
never invented: where transformers would initialise it randomly and carry on, localmoe refuses.
"""

import math
import re
import sys
from dataclasses import dataclass

import torch
from torch import nn

from localmoe.checkpoint import INTEGER_DTYPES, WEIGHT_DTYPES, Checkpoint
from localmoe.errors import LocalMoEError
from localmoe.models import family_for
from localmoe.models.attention import Attention
from localmoe.models.expert_source import ExpertSource
from localmoe.models.expert_tensors import block_shapes
from localmoe.models.family import Family, Interleaved, ModelArgs
from localmoe.models.layers import Linear, host_tables
from localmoe.models.moe import moe_blocks
from localmoe.progress import progress
from localmoe.quantization import describe
from localmoe.runtime.memory import Footprint

LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # in tensor names: model.layers.N.*
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelParts:
    """A checkpoint's model with its family, args and compute dtype, and its routed experts on disk."""

    model: nn.Module
    experts: ExpertSource
    family: Family
    args: ModelArgs
    dtype: torch.dtype
    resident_sources: dict[str, "str | Alternate"]  # parameter name -> checkpoint tensor (or its slices)


@dataclass(frozen=True)
class Alternate:
    """Every other slice along `dim` of checkpoint tensor `tensor`, from `start`: a parameter a release
    stores interleaved with another (see family.Interleaved)."""

    tensor: str
    start: int
    dim: int

    def read(self, ckpt: Checkpoint) -> torch.Tensor:
        return ckpt.weight(self.tensor).movedim(self.dim, 0)[self.start :: 2].movedim(0, self.dim)


def open_checkpoint(source: str, revision: str | None = None, weights: bool = True) -> tuple[Checkpoint, Family]:
    """`Checkpoint.open`, seeing a multimodal checkpoint as the language model it holds and a maker's own
    release in transformers' names; and its family."""
    ckpt = Checkpoint.open(source, revision, weights)
    family = family_for(ckpt.config)
    view = _language_model(ckpt, family)
    if family.mtp is not None:  # its MTP layers under DeepSeek-V3's names (counted where the config does not)
        config = family.mtp.counted(view.config, view.tensor_names)
        view = view.with_aliases(family.mtp.aliases(config), config)
    return view, family


def _language_model(ckpt: Checkpoint, family: Family) -> Checkpoint:
    architectures = ckpt.config.get("architectures") or [None]
    if family.release is not None and family.release.marker in ckpt:
        return ckpt.part_view("", ckpt.config, family.release.prefixes)
    wrapper = next((w for w in family.multimodal if w.architecture == architectures[0]), None)
    if wrapper is None:
        return ckpt
    levels = [ckpt.config]  # the config, and each one nested in it on the way to the text config
    for key in wrapper.text_config:
        levels.append(levels[-1].get(key))
        if not isinstance(levels[-1], dict):
            path = ".".join(wrapper.text_config)
            raise LocalMoEError(f"{ckpt.path}/config.json declares {wrapper.architecture} but has no {path}")
    text, holder = levels[-1], levels[-2]
    if wrapper.text_model_type and text.get("model_type") != wrapper.text_model_type:
        raise LocalMoEError(
            f"{ckpt.path} is a {wrapper.architecture} whose language model is {text.get('model_type')!r}, not a "
            f"MoE model localmoe runs (it runs the {wrapper.text_model_type} ones)"
        )
    # top-level settings (dtype, quantization_config) hold for the language model unless it says otherwise;
    # the LM head belongs to the wrapper that holds the text config, so its tie_word_embeddings (default True
    # in several) decides whether it is stored
    config = {**ckpt.config, **text, "architectures": [family.name]}
    if "tie_word_embeddings" in holder:
        config["tie_word_embeddings"] = holder["tie_word_embeddings"]
    part = f"the language model of {wrapper.architecture} (text only; its other towers stay on disk)"
    return ckpt.part_view(part, config, wrapper.prefixes)


def model_skeleton(ckpt: Checkpoint, family: Family, dtype: torch.dtype | None = None, mtp: bool = True) -> ModelParts:
    """The model of `family` built on `meta`, with every tensor it needs found in the checkpoint and its
    shape checked; no weights are read. Without `mtp`, no multi-token-prediction layers: nothing drafts
    with them, so their weights would only take memory and their experts cache slots and prefetches."""
    _check_quantization(ckpt, family)
    args = family.args.from_config(ckpt.config)
    _check_layer_count(ckpt, args)
    with torch.device("meta"):
        model = family.model(args)
    if not mtp:
        model.mtp = None
    _drop_incomplete_mtp(model, ckpt, family)
    sources = _resident_sources(model, ckpt, family)
    drafting = moe_blocks(model.mtp) if getattr(model, "mtp", None) is not None else []
    experts = ExpertSource(ckpt, family.experts, moe_blocks(model), [block.layer_idx for block in drafting])
    _check_quantized_weights(ckpt, experts)
    return ModelParts(model, experts, family, args, dtype or checkpoint_dtype(ckpt), sources)


def _check_layer_count(ckpt: Checkpoint, args: ModelArgs) -> None:
    """Refuse a config that names more decoder layers than the checkpoint holds tensors for, before they
    are built: a damaged num_hidden_layers would otherwise build for minutes, then fail."""
    stored = {int(match[1]) for name in ckpt.tensor_names if (match := LAYER_INDEX.search(name))}
    missing = next((layer for layer in range(args.num_hidden_layers) if layer not in stored), None)
    if stored and missing is not None:
        raise LocalMoEError(
            f"config.json gives num_hidden_layers {args.num_hidden_layers}, and {ckpt.path} holds no tensor of layer "
            f"{missing} ({len(stored)} layers in all): the config and the weights do not belong together"
        )


def _check_quantization(ckpt: Checkpoint, family: Family) -> None:
    """Refuse quantized checkpoints the family cannot decode, rather than read their raw values as weights:
    every family reads the methods of localmoe/quantization.py, a family its own besides (gpt-oss: mxfp4)."""
    method = ckpt.quantization.method
    if method is not None and not ckpt.quantization.formats and method not in family.quantizations:
        raise LocalMoEError(
            f"{ckpt.path} is quantized ({method}), which localmoe cannot read yet for {family.name}: "
            "use an unquantized (bf16) release of the model"
        )


def _check_quantized_weights(ckpt: Checkpoint, experts: ExpertSource) -> None:
    """Refuse a quantization config over weights none of which are stored so: neither a module nor the
    routed experts (where a family's layout stores them fused in a quantized form: Inkling 2's releases)."""
    formats = ckpt.quantization.formats
    if experts.stored_form is not None or not formats:
        return
    modules = {name.rpartition(".")[0] for name in ckpt.tensor_names}
    if not any(fmt.stores(ckpt, module) for module in modules for fmt in formats):
        said = " or ".join(describe(fmt) for fmt in formats)
        raise LocalMoEError(
            f"{ckpt.path}/config.json says it is quantized ({ckpt.quantization.method}: {said}), yet no weight is "
            "stored so: the config does not describe these weights (for an unquantized (bf16) release, remove "
            "quantization_config)"
        )


def resident_dtype(parts: ModelParts, name: str) -> torch.dtype:
    """The dtype parameter `name` is kept in: float32 where the family keeps it so, else the compute dtype."""
    return torch.float32 if any(fragment in name for fragment in parts.family.keep_float32) else parts.dtype


def load_resident_weights(
    parts: ModelParts, ckpt: Checkpoint, device: torch.device | str, tables: str | None = "mmap"
) -> None:
    """Load every non-expert weight of the skeleton onto `device`, in the compute dtype, but its host
    tables (`HostEmbedding`): those stay in host memory, mapped from the checkpoint's shards (`tables`
    "mmap") or copied into RAM ("ram").

    Routed experts are not loaded: `parts.experts` reads them on demand, and the runtime decides
    where they live and binds them to the model's MoE blocks.
    """
    sources = dict(parts.resident_sources)
    for prefix, table in host_tables(parts.model).items():
        names = [f"{prefix}.{name}" for name, _ in table.named_parameters()]
        dtype = resident_dtype(parts, names[0])
        blocks = [_read(ckpt, sources.pop(name)) for name in names]  # mapped, not read
        if tables == "ram":
            blocks = [block.to(dtype, copy=True) for block in progress(blocks, len(blocks), "reading lookup tables")]
        table.place(blocks, dtype)
    state = {
        name: _to(_read(ckpt, source), device, resident_dtype(parts, name))
        for name, source in progress(sources.items(), len(sources), "loading resident weights")
    }
    parts.model.load_state_dict(state, strict=True, assign=True)
    parts.model.to(device)  # the buffers computed at construction (rotary frequencies)
    parts.model.requires_grad_(False).eval()
    for module in parts.model.modules():
        if isinstance(module, Attention):
            module.prepare_decode()
        if type(module) is nn.Linear and torch.device(device).type == "cpu":
            module.__class__ = Linear  # the same module, its products through `linear` (layers.py)


def footprint(parts: ModelParts) -> Footprint:
    """The sizes the memory plan needs, from the model's shapes in the dtypes it keeps them in."""
    blocks = moe_blocks(parts.model)
    first = blocks[0]
    shapes = {(b.hidden_size, b.intermediate_size, b.num_experts, b.expert_bias, b.gated) for b in blocks}
    if len(shapes) > 1:
        raise LocalMoEError(f"{parts.family.name} with experts of different shapes per layer is not supported")
    size = parts.dtype.itemsize
    host = host_tables(parts.model).items()
    tables = {f"{prefix}.{name}": p for prefix, table in host for name, p in table.named_parameters()}
    # an embedding table is read one row per token, unless it is the LM head as well (tied)
    lookups = [m for m in parts.model.modules() if isinstance(m, nn.Embedding)]
    if getattr(parts.model, "lm_head", True) is None:
        lookups = [m for m in lookups if m is not parts.model.model.embed_tokens]
    attention = [m.prefill_attention_shape() for m in parts.model.modules() if hasattr(m, "prefill_attention_shape")]
    widest = max([m.in_features for m in parts.model.modules() if isinstance(m, nn.Linear)] + [first.intermediate_size])
    hidden = first.hidden_size
    return Footprint(
        resident_bytes=sum(
            p.numel() * resident_dtype(parts, name).itemsize
            for name, p in parts.model.named_parameters()
            if name not in tables
        ),
        host_table_bytes=sum(p.numel() * resident_dtype(parts, name).itemsize for name, p in tables.items()),
        expert_bytes=sum(math.prod(shape) for shape in block_shapes(first).values()) * size,
        moe_layers=len(blocks),
        experts_per_layer=first.num_experts,
        top_k=max(b.top_k for b in blocks),
        active_experts_per_token=sum(b.top_k for b in blocks),
        kv_bytes_per_token=parts.model.kv_bytes_per_token(parts.dtype),
        # hidden-sized temporaries, the widest intermediate twice over (gate and up), and the per-choice
        # expert outputs, all counted at float32 to stay on the safe side
        activation_bytes_per_token=4 * (8 * hidden + 4 * widest + 3 * first.top_k * hidden),
        max_positions=parts.model.max_position_embeddings,
        fixed_state_bytes=parts.model.fixed_state_bytes(parts.dtype),
        recurrent_state_bytes=parts.model.recurrent_state_bytes(parts.dtype),
        pending_state_bytes=parts.model.pending_state_bytes(parts.dtype),
        trail_bytes_per_token=parts.model.trail_bytes_per_token(parts.dtype),
        logits_bytes_per_token=parts.model.model.embed_tokens.weight.shape[0] * size,
        hidden_bytes_per_token=hidden * size,
        lookup_bytes=sum(m.weight.numel() for m in lookups) * size,
        lookup_row_bytes=sum(m.embedding_dim for m in lookups) * size,
        attention_heads=max((heads for heads, _ in attention), default=0),
        attention_head_width=max((width for _, width in attention), default=0),
    )


def checkpoint_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The dtype the config declares (`dtype`, or `torch_dtype` in older configs), else the first the
    weights use, else float32."""
    declared = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype")
    if declared in DTYPES:
        return DTYPES[declared]
    for name in ckpt.tensor_names:
        if (dtype := ckpt.info(name).dtype) in DTYPES.values():
            return dtype
    return torch.float32


def _read(ckpt: Checkpoint, source: "str | Alternate") -> torch.Tensor:
    return ckpt.weight(source) if isinstance(source, str) else source.read(ckpt)


def _to(tensor: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """A copy in host memory first (copy=True: never alias the shard's mapping), then on the device:
    copying a mapped file straight to a GPU page-faults its way through at a crawl. Integer tables are
    read as int64 whatever their width on disk (DeepSeek-V4's release stores tid2eid as int32)."""
    staged = tensor.to(dtype=dtype if tensor.is_floating_point() else torch.int64, copy=True)
    return staged.to(device)


def _drop_incomplete_mtp(model: nn.Module, ckpt: Checkpoint, family: Family) -> None:
    """Load without the multi-token-prediction layers the config (or a tensor of theirs) promises where the
    checkpoint lacks a tensor of theirs (many releases strip them) or stores one in another shape, with a line
    that says so: a checkpoint whose backbone loads is never refused for its MTP layers. Their routed experts
    may be stored in another form than the model's (see `ExpertSource.stored_form`)."""
    mtp = getattr(model, "mtp", None)
    if mtp is None:
        return
    try:
        for name, param in mtp.named_parameters():
            ours = mtp.stored_name(name)
            found = _source(ckpt, family, ours, param)
            if found is None:
                release = ckpt.stored_name(_release_name(family, ours, ckpt.config))  # (a multimodal's: its prefix)
                raise LocalMoEError(f"{ckpt.path} lacks {release}")
            if isinstance(found, str):
                ckpt.check_weight(found, tuple(param.shape))
        for block in moe_blocks(mtp):
            layout = next((layout for layout in family.experts if layout.present(ckpt, block)), None)
            if layout is None:
                raise LocalMoEError(f"{ckpt.path} lacks the routed experts of layer {block.layer_idx}")
            layout.check(ckpt, block)  # in the shapes the config gives them
        _check_mtp_scales(mtp, ckpt)
    except LocalMoEError as error:
        promised = "loading without the multi-token-prediction layers it promises"
        print(f"localmoe: {error}: {promised}", file=sys.stderr)
        model.mtp = None


def _release_name(family: Family, ours: str, config: dict) -> str:
    """The release's name of MTP tensor `ours` (DeepSeek-V3's name), from it or from the Hub's spelling of it
    (Inkling's layout is in that spelling), for a message."""
    names = [ours, *family.disk_names(ours)]
    if family.mtp is None:
        return names[1]
    return next((theirs for name in names if (theirs := family.mtp.release_name(name, config)) != name), names[1])


def _check_mtp_scales(mtp: nn.Module, ckpt: Checkpoint) -> None:
    """Refuse an MTP layer with an FP8 weight that no format of the quantization config decodes: its
    scale is missing (a release downloaded in part), which would otherwise stop the load only when read."""
    prefixes = tuple(mtp.stored_name(f"layers.{depth}.") for depth in range(len(mtp.layers)))  # model.layers.{n}.
    weights = (name for name in ckpt.tensor_names if name.startswith(prefixes) and name.endswith(".weight"))
    for name in weights:
        if ckpt.info(name).dtype == torch.float8_e4m3fn and ckpt.stored_form(name) is None:
            raise ckpt.unscaled_fp8(name)


def disk_names(model: nn.Module, family: Family, name: str) -> list[str]:
    """Names under which parameter `name` may be stored: an MTP layer's under DeepSeek-V3's names for it."""
    return family.disk_names(model_name(model, name))


def model_name(model: nn.Module, name: str) -> str:
    """Parameter `name`, an MTP layer's as DeepSeek-V3 names it."""
    return model.mtp.stored_name(name.removeprefix("mtp.")) if name.startswith("mtp.") else name


def _resident_sources(model: nn.Module, ckpt: Checkpoint, family: Family) -> dict[str, "str | Alternate"]:
    """Parameter name -> checkpoint tensor name (or the slices of one it is interleaved in), for every
    parameter; shapes checked."""
    sources = {}
    for name, param in model.named_parameters():
        candidates = disk_names(model, family, name)
        found = _source(ckpt, family, model_name(model, name), param)
        if found is None:
            raise LocalMoEError(
                f"{ckpt.path} lacks tensor {ckpt.stored_name(candidates[0])}, which {family.name} "
                "needs: the checkpoint is incomplete or its index is damaged; download it again"
            )
        if isinstance(found, str):
            ckpt.check_weight(found, tuple(param.shape), WEIGHT_DTYPES if param.is_floating_point() else INTEGER_DTYPES)
        sources[name] = found
    return sources


def _source(ckpt: Checkpoint, family: Family, ours: str, param) -> "str | Alternate | None":
    """Where the parameter of model name `ours` (an MTP layer's under DeepSeek-V3's name) is stored: a tensor,
    or the slices of one a release interleaves it in (shape checked there); None where neither."""
    found = next((c for c in family.disk_names(ours) if ckpt.has_weight(c)), None)
    if found is None:
        found = next((a for pair in family.interleaved if (a := _interleaved(ckpt, family, pair, ours, param))), None)
    return found


def _interleaved(ckpt: Checkpoint, family: Family, pair: Interleaved, name: str, param) -> Alternate | None:
    """Where parameter `name` is read from a tensor it is stored interleaved in, if it is; shape checked."""
    stored = pair.stored_as(name)
    if stored is None:
        return None
    fused, start = stored
    found = next((c for c in family.disk_names(fused) if ckpt.has_weight(c)), None)
    if found is None:
        return None
    shape = list(param.shape)
    shape[pair.dim] *= 2
    ckpt.check_weight(found, tuple(shape))
    return Alternate(found, start, pair.dim)
