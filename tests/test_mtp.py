"""Multi-token-prediction layers, loaded as each release ships them: their draft logits against a reference
written from the published inference code, in float32 within 1e-4 (transformers drops these tensors, so
it cannot be the oracle for them; it is for the decoder layer inside, which is the family's own).

The reference follows DeepSeek-V3's report (section 2.2) and SGLang's deepseek_nextn.py / vLLM's
deepseek_mtp.py and qwen3_next_mtp.py: h' = eh_proj([enorm(embed(t[i+1])); hnorm(h[i])]), one decoder
layer at the positions of h, then the layer's final norm and the model's LM head."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    BAILING_HYBRID,
    DEEPSEEK_V2,
    DEEPSEEK_V4,
    DEEPSEEK_V32,
    DOTS3_NOTE,
    ERNIE,
    EXAONE_MOE,
    GLM4_MOE,
    GLM4_MOE_LITE,
    GLM5_NEXT,
    GLM_MOE_DSA,
    HY_V3,
    HY_V4,
    INKLING,
    LONGCAT_FLASH,
    MELLUM,
    MIMO_V2_FLASH,
    MINIMAX_M3,
    NEMOTRON_H,
    QWEN3_5_MOE,
    QWEN3_NEXT,
    QWEN4_EXP,
    STEP3P7,
    hf_model,
    randomize,
    save_hf,
)
from safetensors.torch import load_file, save_file

import localmoe
from localmoe.models import family_for
from localmoe.models.moe import moe_blocks
from localmoe.options import RuntimeOptions
from localmoe.runtime.offload import OffloadedExperts

TOLERANCE = 1e-4
PROMPT = 12


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight)


class Release:
    """A tiny checkpoint in a release's MTP layout, with transformers' backbone and MTP decoder layers, and
    the MTP layers' own weights (`offset`: 1 where its norms scale by 1 + weight). `rotary` gives the MTP
    layers' rotary embeddings from the reference's, `window` their sliding window (None: causal only)."""

    def __init__(self, folder: Path, reference, blocks: list, mtp: list[dict], offset: float, count: str, **layer):
        self.folder, self.reference, self.blocks, self.mtp = folder, reference, blocks, mtp
        self.eps, self.offset, self.count = reference.config.get_text_config().rms_norm_eps, offset, count
        self.rotary = layer.get("rotary", lambda model, x, positions: model.rotary_emb(x, positions))
        self.window = layer.get("window")

    def backbone(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' logits and last hidden states for ids [1, T]: hidden_states[-1], which transformers
        ties to the output after the final norm (capture_outputs' tie_last_hidden_states), as its MTP
        drafting (candidate_generator.py) hands them on."""
        with torch.no_grad():
            out = self.reference(ids, output_hidden_states=True)
        return out.logits, out.hidden_states[-1]

    def draft(
        self, h: torch.Tensor, next_ids: torch.Tensor, start: int = 0, depth: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP layer `depth` over h [1, T, E] at positions start .. start+T-1 (attending to them alone) and
        the next tokens [1, T]: (logits, output before the final norm)."""
        w, model, eps, offset = self.mtp[depth], self.reference.model, self.eps, self.offset
        with torch.no_grad():
            embedded = model.embed_tokens(next_ids)
            inputs = torch.cat([rms(embedded, w["enorm"], eps, offset), rms(h, w["hnorm"], eps, offset)], -1)
            x = F.linear(inputs, w["eh"], w.get("eh_bias"))
            positions = torch.arange(start, start + x.shape[1])[None]
            out = self.blocks[depth](
                x,
                position_ids=positions,
                position_embeddings=self.rotary(model, x, positions),
                attention_mask=self.mask(x.shape[1]),
            )
            out = out[0] if isinstance(out, tuple) else out
            normed = rms(out, w["norm"], eps, offset) if "norm" in w else out  # (ERNIE's has no norm there)
            return self.reference.lm_head(normed), out

    def mask(self, length: int) -> torch.Tensor | None:
        """The additive mask of a sliding window of `self.window` positions, the query's own included."""
        if self.window is None:
            return None
        distance = torch.arange(length)[:, None] - torch.arange(length)[None]
        allowed = (distance >= 0) & (distance < self.window)
        return torch.zeros(length, length).masked_fill(~allowed, float("-inf"))[None, None]


class NormedRelease(Release):
    """A release whose MTP layer passes its final norm's output on to the next draft, as transformers' MtpModel and
    the published code of most releases do (see localmoe/models/mtp.py)."""

    def draft(self, h, next_ids, start=0, depth=0):
        logits, out = super().draft(h, next_ids, start, depth)
        return logits, rms(out, self.mtp[depth]["norm"], self.eps, self.offset)


def mtp_weights(hidden: int, offset: float, depth: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3 + depth)
    norm = 1 - offset  # norms near one
    return {
        "enorm": norm + 0.1 * torch.randn(hidden, generator=generator),
        "hnorm": norm + 0.1 * torch.randn(hidden, generator=generator),
        "eh": 0.1 * torch.randn(hidden, 2 * hidden, generator=generator),
        "norm": norm + 0.1 * torch.randn(hidden, generator=generator),
    }


def write_release(
    folder: Path, config_class: str, config: dict, extend, renamed: str, names, offset: float, count, depths=1, **layer
):
    """A model of `depths` more layers than `config` says, written by transformers; those layers become the
    MTP layers' decoder layers, stored under `renamed` (with {layer} and {depth}; `layer["inner"]` renames
    what is under it), beside the MTP layers' own weights under `names` (enorm, hnorm, eh, norm -> stored
    name), with the config's `count` field saying `depths`. `extend`: the config of `depths` more layers."""
    layers = config["num_hidden_layers"]
    full = hf_model(config_class, **extend(config, depths))
    save_hf(full, folder / "full", "single")
    stored = load_file(str(folder / "full" / "model.safetensors"))
    inner = layer.pop("inner", lambda name: name)
    kind = layer.pop("kind", Release)
    weights = layer.pop("weights", mtp_weights)
    for depth in range(depths):
        last, prefix = f"model.layers.{layers + depth}.", renamed.format(layer=layers + depth, depth=depth)
        stored = {prefix + inner(k[len(last) :]) if k.startswith(last) else k: v for k, v in stored.items()}
    mtp = [weights(config["hidden_size"], offset, depth) for depth in range(depths)]
    for depth, own in enumerate(mtp):
        stored |= {names[role].format(layer=layers + depth, depth=depth): w for role, w in own.items()}
    release = folder / "release"
    release.mkdir()
    save_file({k: v.contiguous() for k, v in stored.items()}, str(release / "model.safetensors"))
    saved = json.loads((folder / "full" / "config.json").read_text())
    saved |= {**config, count: depths}
    for per_layer in PER_LAYER:  # as a release's config lists them: for the model's layers
        if isinstance(saved.get(per_layer), list):
            saved[per_layer] = saved[per_layer][:layers]
    (release / "config.json").write_text(json.dumps(saved))
    blocks = list(full.model.layers[layers:])
    full.model.layers = full.model.layers[:layers]
    full.config.num_hidden_layers = layers
    for per_layer in PER_LAYER:
        if getattr(full.config, per_layer, None):
            setattr(full.config, per_layer, getattr(full.config, per_layer)[:layers])
    return kind(release, full, blocks, mtp, offset, count, **layer)


PER_LAYER = ("layer_types", "mlp_layer_types", "indexer_types")  # config fields with an entry per layer


def deepseek_release(config_class: str, config: dict, depths: int = 1, extend=None, **layer):
    """DeepSeek-V3's layout (GLM-4.5's too): MTP layer k is `model.layers.{num_hidden_layers + k}`, its
    decoder layer's tensors under that prefix as any layer's (per-expert names), beside enorm, hnorm,
    eh_proj, shared_head.norm, and copies of the embedding and the LM head (embed_tokens, shared_head.head);
    the output after shared_head.norm passed on (vLLM's deepseek_mtp.py since its PR 45895, SGLang's
    deepseek_nextn.py, transformers' MtpModel)."""

    def write(folder: Path) -> Release:
        names = {role: f"model.layers.{{layer}}.{name}.weight" for role, name in DEEPSEEK_NAMES.items()}
        layers = config["num_hidden_layers"]
        release = write_release(
            folder,
            config_class,
            config,
            extend or (lambda c, n: {**c, "num_hidden_layers": layers + n}),
            "model.layers.{layer}.",
            names,
            0.0,
            "num_nextn_predict_layers",
            depths,
            kind=NormedRelease,
            **layer,
        )
        path = release.folder / "model.safetensors"
        stored = load_file(str(path))
        copies = {"embed_tokens": "model.embed_tokens.weight", "shared_head.head": "lm_head.weight"}
        for depth in range(depths):
            stored |= {f"model.layers.{layers + depth}.{c}.weight": stored[n].clone() for c, n in copies.items()}
        save_file(stored, str(path))
        return release

    return write


DEEPSEEK_NAMES = {"enorm": "enorm", "hnorm": "hnorm", "eh": "eh_proj", "norm": "shared_head.norm"}
# Qwen3-Next's and Qwen3.5's (vLLM's qwen3_next_mtp.py, qwen3_5_mtp.py): mtp.fc, mtp.pre_fc_norm_embedding,
# mtp.pre_fc_norm_hidden, mtp.layers.0.* (a full-attention MoE decoder layer), mtp.norm
QWEN_NAMES = {
    "enorm": "mtp.pre_fc_norm_embedding.weight",
    "hnorm": "mtp.pre_fc_norm_hidden.weight",
    "eh": "mtp.fc.weight",
    "norm": "mtp.norm.weight",
}


# Hy3's (vLLM's hy_v3_mtp.py): model.layers.{num_hidden_layers}.{enorm, hnorm, eh_proj, final_layernorm} beside
# the decoder layer's tensors, as DeepSeek-V3's but for the final norm
HY_V3_NAMES = {role: f"model.layers.{{layer}}.{name}.weight" for role, name in DEEPSEEK_NAMES.items()}
HY_V3_NAMES["norm"] = "model.layers.{layer}.final_layernorm.weight"


def qwen_release(config_class: str, config: dict):
    """Qwen's layout: `mtp.*`, the decoder layer full attention whatever the layer types say, its final norm's
    output passed on."""

    def extend(c: dict, depths: int) -> dict:
        layers = c["num_hidden_layers"]
        types = ["linear_attention" if (i + 1) % 4 else "full_attention" for i in range(layers)]
        return {**c, "num_hidden_layers": layers + depths, "layer_types": [*types, *["full_attention"] * depths]}

    def write(folder: Path) -> Release:
        return write_release(
            folder,
            config_class,
            config,
            extend,
            "mtp.layers.0.",
            QWEN_NAMES,
            1.0,
            "mtp_num_hidden_layers",
            kind=NormedRelease,
        )

    return write


# MiMo-V2-Flash's (vLLM's mimo_v2_flash_mtp.py, SGLang's mimo_v2_flash_nextn.py): model.mtp.layers.{k}.*, the
# decoder layer's tensors directly under it (a sliding-window layer with sinks, a dense MLP, its second norm
# pre_mlp_layernorm) beside enorm, hnorm, eh_proj and final_layernorm
MIMO_NAMES = {
    "enorm": "model.mtp.layers.{depth}.enorm.weight",
    "hnorm": "model.mtp.layers.{depth}.hnorm.weight",
    "eh": "model.mtp.layers.{depth}.eh_proj.weight",
    "norm": "model.mtp.layers.{depth}.final_layernorm.weight",
}


def mimo_release(depths: int):
    """MiMo-V2-Flash's layout, with `depths` MTP layers (the release has three), each passing its final norm's
    output on (vLLM's mimo_v2_mtp.py)."""
    config = MIMO_V2_FLASH

    def extend(c: dict, n: int) -> dict:
        layers = c["num_hidden_layers"]
        return {
            **c,
            "num_hidden_layers": layers + n,
            "layer_types": [*c["layer_types"], *["sliding_attention"] * n],
            "mlp_layer_types": ["dense", *["sparse"] * (layers - 1), *["dense"] * n],
        }

    def inner(name: str) -> str:
        return re.sub(r"^post_attention_layernorm\.", "pre_mlp_layernorm.", name).replace(
            "self_attn.sinks", "self_attn.attention_sink_bias"
        )

    def write(folder: Path) -> Release:
        return write_release(
            folder,
            "MiMoV2FlashConfig",
            config,
            extend,
            "model.mtp.layers.{depth}.",
            MIMO_NAMES,
            0.0,
            "num_nextn_predict_layers",
            depths,
            inner=inner,
            kind=NormedRelease,
            rotary=lambda model, x, positions: model.rotary_emb(x, positions, "sliding_attention"),
            window=config["sliding_window"],
        )

    return write


def qwen_names_release(folder: Path, config_class: str, config: dict, extend, **layer) -> Release:
    """One MTP layer in Qwen's names under `mtp.` (K-EXAONE's, Mellum's), its count num_nextn_predict_layers, its
    final norm's output passed on."""
    return write_release(
        folder,
        config_class,
        config,
        extend,
        "mtp.layers.{depth}.",
        QWEN_NAMES,
        0.0,
        "num_nextn_predict_layers",
        kind=NormedRelease,
        **layer,
    )


def with_config(release: Release, **fields) -> Release:
    """`release` with `fields` added to its config.json."""
    path = release.folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))
    return release


def exaone_release(kind: str = "full_attention", window: int | None = None):
    """K-EXAONE's (vLLM's exaone_moe_mtp.py and exaone_moe.py with is_mtp, SGLang's exaone_moe.py): Qwen's
    names under `mtp.`, the decoder layer's MLP dense, its attention of the kind the config's mtp_layer_types
    gives (the release's: full, so without positions, as the model's global layers) with the window of
    mtp_sliding_windows (the release's: 0)."""
    config = EXAONE_MOE

    def extend(c: dict, n: int) -> dict:
        layers = c["num_hidden_layers"]
        backbone = ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(layers)]
        dense = ["dense", *["sparse"] * (layers - 1)]
        return {**c, "num_hidden_layers": layers + n, "layer_types": [*backbone, *[kind] * n]} | {
            "mlp_layer_types": [*dense, *["dense"] * n]
        }

    def write(folder: Path) -> Release:
        release = qwen_names_release(folder, "ExaoneMoeConfig", config, extend, window=window)
        return with_config(release, mtp_layer_types=[kind], mtp_sliding_windows=[window or 0])

    return write


class Blocks(torch.nn.Module):
    """transformers' Nemotron-H blocks one after another, as vLLM's nemotron_h_mtp.py runs an MTP layer's."""

    def __init__(self, blocks: list):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, x, position_ids, position_embeddings, attention_mask):
        for block in self.blocks:
            x = block(x, attention_mask=attention_mask, position_ids=position_ids)
        return x


def nemotron_release(folder: Path) -> Release:
    """Nemotron 3 Super's (vLLM's nemotron_h_mtp.py): `mtp.layers.{j}.*` the blocks of mtp_hybrid_override_pattern
    "*E" (attention without positions, then MoE with per-expert tensors), enorm, hnorm and eh_proj on the
    first, final_layernorm on the last; the model's embedding and LM head shared."""
    config = {**NEMOTRON_H, "moe_latent_size": 24}  # Super's MoE works in a narrower latent space
    layers = len(config["layers_block_type"])
    full = hf_model(
        "NemotronHConfig", **{**config, "layers_block_type": [*config["layers_block_type"], "full_attention", "moe"]}
    )
    save_hf(full, folder / "full", "single")
    stored = load_file(str(folder / "full" / "model.safetensors"))
    for j in range(2):
        last = f"backbone.layers.{layers + j}."
        stored = {f"mtp.layers.{j}." + k[len(last) :] if k.startswith(last) else k: v for k, v in stored.items()}
    mtp = mtp_weights(config["hidden_size"], 0.0)
    names = {"enorm": "mtp.layers.0.enorm", "hnorm": "mtp.layers.0.hnorm", "eh": "mtp.layers.0.eh_proj"}
    stored |= {f"{names[role]}.weight": mtp[role] for role in names} | {
        "mtp.layers.1.final_layernorm.weight": mtp["norm"]
    }
    release = folder / "release"
    release.mkdir()
    save_file({k: v.contiguous() for k, v in stored.items()}, str(release / "model.safetensors"))
    saved = json.loads((folder / "full" / "config.json").read_text())
    saved |= {**config, "num_nextn_predict_layers": 1, "mtp_hybrid_override_pattern": "*E"}
    saved.pop("mtp_layers_block_type")  # the release names its MTP blocks by the pattern alone
    (release / "config.json").write_text(json.dumps(saved))
    blocks = Blocks(list(full.model.layers[layers:]))
    full.model.layers = full.model.layers[:layers]
    full.config.layers_block_type = config["layers_block_type"]
    full.model.embed_tokens = full.model.embeddings  # where Release looks for it
    full.config.rms_norm_eps = config.get("layer_norm_epsilon", 1e-5)
    return NormedRelease(release, full, [blocks], [mtp], 0.0, "num_nextn_predict_layers", rotary=lambda *_: None)


class TextModel(torch.nn.Module):
    """The language model and LM head, out of transformers' multimodal model (MiniMax-M3's, GLM-5.3-Flash's)."""

    def __init__(self, full):
        super().__init__()
        self.model, self.lm_head, self.config = full.model.language_model, full.lm_head, full.config.text_config

    def forward(self, ids: torch.Tensor, output_hidden_states: bool = False):
        out = self.model(ids, output_hidden_states=output_hidden_states)
        return SimpleNamespace(logits=self.lm_head(out.last_hidden_state), hidden_states=out.hidden_states)


def write_multimodal(folder: Path, stored: dict, text: dict) -> Path:
    """A multimodal release of tensors `stored`, its config the one written to folder/full with `text` in its
    text config."""
    release = folder / "release"
    release.mkdir()
    save_file({k: v.contiguous() for k, v in stored.items()}, str(release / "model.safetensors"))
    saved = json.loads((folder / "full" / "config.json").read_text())
    saved["text_config"] |= text
    (release / "config.json").write_text(json.dumps(saved))
    return release


def minimax_m3_release(folder: Path) -> Release:
    """MiniMax-M3's (vLLM's minimax_m3/nvidia/mtp.py; the names rtp-llm's MiniMax-M3 loader reads): inside the
    multimodal checkpoint, `model.mtp.layers.0.*` holds enorm, hnorm, eh_proj and final_layernorm (scaling by 1 +
    weight), and the decoder layer under `transformer_layer.`, with block-sparse attention and MoE (per-expert
    w1/w2/w3) whatever the layer types say; `num_mtp_modules` in the text config."""
    text = {**MINIMAX_M3["text_config"], "index_block_size": 2}  # the prompts span more blocks than are kept
    layers = text["num_hidden_layers"]
    extended = {
        **text,
        "num_hidden_layers": layers + 1,
        "layer_types": [*text["layer_types"], "minimax_m3_sparse"],
        "mlp_layer_types": [*text["mlp_layer_types"], "sparse"],
    }
    full = hf_model("MiniMaxM3VLConfig", **{**MINIMAX_M3, "text_config": extended})
    save_hf(full, folder / "full", "single")
    stored = load_file(str(folder / "full" / "model.safetensors"))
    last, mtp_prefix = f"language_model.model.layers.{layers}.", "language_model.model.mtp.layers.0."
    stored = {
        mtp_prefix + "transformer_layer." + k[len(last) :] if k.startswith(last) else k: v for k, v in stored.items()
    }
    mtp = mtp_weights(text["hidden_size"], 1.0)
    names = {"enorm": "enorm", "hnorm": "hnorm", "eh": "eh_proj", "norm": "final_layernorm"}
    stored |= {f"{mtp_prefix}{names[role]}.weight": weight for role, weight in mtp.items()}
    release = write_multimodal(folder, stored, {**text, "num_mtp_modules": 1})
    language = full.model.language_model
    block = language.layers[layers]
    language.layers = language.layers[:layers]
    full.config.text_config.num_hidden_layers = layers
    return Release(release, TextModel(full), [block], [mtp], 1.0, "num_mtp_modules")


def mellum_release(folder: Path) -> Release:
    """Mellum's (transformers' MtpModel, modeling_layers.py, reading conversion_mapping.py's Mellum names): Qwen's
    names under `mtp.`, the decoder layer of the kinds mtp_layer_types and mtp_mlp_layer_types give (transformers'
    defaults: sliding, MoE)."""
    config = MELLUM

    def extend(c: dict, n: int) -> dict:
        types = {"layer_types": ["sliding_attention"] * n, "mlp_layer_types": ["sparse"] * n}
        return {**c, "num_hidden_layers": c["num_hidden_layers"] + n} | {k: [*c[k], *v] for k, v in types.items()}

    release = qwen_names_release(
        folder,
        "MellumConfig",
        config,
        extend,
        rotary=lambda model, x, positions: model.rotary_emb(x, positions, "sliding_attention"),
        window=config["sliding_window"],
    )
    return with_config(release, mtp_layer_types=["sliding_attention"], mtp_mlp_layer_types=["sparse"])


def bailing_release(folder: Path) -> Release:
    """Ling 3's (vLLM's bailing_moe_v3_mtp.py): DeepSeek-V3's layout, `model.layers.{num_hidden_layers}` in the
    release's names, its final norm `final_layernorm`, the decoder layer latent attention (whatever the layer
    groups say) and MoE, its final norm's output passed on: Hy3's names and design."""
    config = BAILING_HYBRID

    def extend(c: dict, n: int) -> dict:
        layers = c["num_hidden_layers"]
        types = [
            "full_attention" if (i + 1) % c["layer_group_size"] == 0 else "linear_attention" for i in range(layers)
        ]
        return {**c, "num_hidden_layers": layers + n, "layer_types": [*types, *["full_attention"] * n]}

    return write_release(
        folder,
        "BailingHybridConfig",
        config,
        extend,
        "model.layers.{layer}.",
        HY_V3_NAMES,
        0.0,
        "num_nextn_predict_layers",
        kind=NormedRelease,
    )


def logits_and_output(reference, module: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' logits for ids [1, T], and what `module` (a part of `reference`) gave in that run."""
    outputs = []
    hook = module.register_forward_hook(lambda m, a, out: outputs.append(out))
    try:
        with torch.no_grad():
            logits = reference(ids).logits
    finally:
        hook.remove()
    return logits, outputs[0]


class V4Release(Release):
    """DeepSeek-V4's MTP layer, as DeepSeek's inference/model.py computes it (MTPBlock.forward, and
    ParallelHead.hc_head for its collapse): the hidden state is the last layer's streams [B, T, N, E]."""

    def backbone(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_and_output(self.reference, self.reference.model.layers[-1], ids)

    def draft(self, h, next_ids, start=0, depth=0):
        from transformers.masking_utils import create_sliding_window_causal_mask

        w, model, eps, config = self.mtp[depth], self.reference.model, self.eps, self.reference.config
        with torch.no_grad():
            e = rms(model.embed_tokens(next_ids), w["enorm"], eps)
            x = F.linear(e, w["e"])[:, :, None] + F.linear(rms(h, w["hnorm"], eps), w["h"])
            positions = torch.arange(start, start + x.shape[1])[None]
            rotary = {
                kind: model.rotary_emb(e, position_ids=positions, layer_type=kind) for kind in ("main", "compress")
            }
            mask = create_sliding_window_causal_mask(
                config=config, inputs_embeds=e, attention_mask=None, cache=None, position_ids=positions
            )
            out = self.blocks[depth](
                x, input_ids=next_ids, position_embeddings=rotary, position_ids=positions, attention_mask=mask
            )
            flat = out.flatten(2)
            mixes = F.linear(flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps), w["hc_fn"])
            pre = torch.sigmoid(mixes * w["hc_scale"] + w["hc_base"]) + config.hc_eps
            collapsed = (pre[..., None] * out).sum(dim=2)
            return self.reference.lm_head(rms(collapsed, w["norm"], eps)), out


def v4_release(folder: Path) -> Release:
    """DeepSeek-V4's release layout (deepseek-ai/DeepSeek-V4-Flash): bare names, and its MTP layer at
    `mtp.0.*` (the decoder layer's tensors in the release's names directly under it; e_proj, h_proj, enorm,
    hnorm, norm, hc_head_{fn,base,scale}; copies of the embedding and the LM head), a sliding-window layer
    routed by scores (the trailing 0 of V4-Flash's compress_ratios)."""
    from test_deepseek_v4_release import release_name

    config, layers = DEEPSEEK_V4, DEEPSEEK_V4["num_hidden_layers"]
    full = hf_model(
        "DeepseekV4Config",
        **{
            **config,
            "num_hidden_layers": layers + 1,
            "layer_types": [*config["layer_types"], "sliding_attention"],
            "mlp_layer_types": [*config["mlp_layer_types"], "moe"],
        },
    )
    save_hf(full, folder / "full", "single")
    stored = load_file(str(folder / "full" / "model.safetensors"))
    last = f"model.layers.{layers}."
    stored = {"mtp.0." + k[len(last) :] if k.startswith(last) else release_name(k): v for k, v in stored.items()}
    hidden, streams = config["hidden_size"], config["hc_mult"]
    generator = torch.Generator().manual_seed(3)
    mtp = {
        "enorm": 1 + 0.1 * torch.randn(hidden, generator=generator),
        "hnorm": 1 + 0.1 * torch.randn(hidden, generator=generator),
        "e": 0.1 * torch.randn(hidden, hidden, generator=generator),
        "h": 0.1 * torch.randn(hidden, hidden, generator=generator),
        "norm": 1 + 0.1 * torch.randn(hidden, generator=generator),
        "hc_fn": 0.1 * torch.randn(streams, streams * hidden, generator=generator),
        "hc_base": 0.1 * torch.randn(streams, generator=generator),
        "hc_scale": 1 + 0.1 * torch.randn(1, generator=generator),
    }
    names = {"e": "e_proj.weight", "h": "h_proj.weight", "hc_fn": "hc_head_fn", "hc_base": "hc_head_base"}
    names |= {"hc_scale": "hc_head_scale", "enorm": "enorm.weight", "hnorm": "hnorm.weight", "norm": "norm.weight"}
    stored |= {f"mtp.0.{names[role]}": weight for role, weight in mtp.items()}
    stored |= {"mtp.0.embed.weight": stored["embed.weight"].clone(), "mtp.0.head.weight": stored["head.weight"].clone()}
    release = folder / "release"
    release.mkdir()
    save_file({k: v.contiguous() for k, v in stored.items()}, str(release / "model.safetensors"))
    saved = json.loads((folder / "full" / "config.json").read_text())
    saved |= {**config, "num_nextn_predict_layers": 1}
    (release / "config.json").write_text(json.dumps(saved))
    block = full.model.layers[layers]
    full.model.layers = full.model.layers[:layers]
    full.config.num_hidden_layers = layers
    for per_layer in ("layer_types", "mlp_layer_types"):
        setattr(full.config, per_layer, getattr(full.config, per_layer)[:layers])
    return V4Release(release, full, [block], [mtp], 0.0, "num_nextn_predict_layers")


class LongcatRelease(Release):
    """LongCat-Flash's MTP layer as vLLM's longcat_flash_mtp.py (LongCatMultiTokenPredictorLayer) and SGLang's
    longcat_flash_nextn.py (LongcatFlashModelNextN) compute it: eh_proj([enorm(e); hnorm(h)]), a pre-norm
    decoder layer (DeepSeek-V2's, there) of transformers' LongCat latent attention, whose latent norms take
    rms_norm_eps as DeepSeek-V2's attention does, and its dense MLP, then the final norm, whose output is
    both what the LM head takes and what the next draft takes as h."""

    def draft(self, h, next_ids, start=0, depth=0):
        w, model, eps, block = self.mtp[depth], self.reference.model, self.eps, self.blocks[depth]
        with torch.no_grad():
            embedded = model.embed_tokens(next_ids)
            x = F.linear(torch.cat([rms(embedded, w["enorm"], eps), rms(h, w["hnorm"], eps)], -1), w["eh"])
            positions = torch.arange(start, start + x.shape[1])[None]
            attended, _ = block.self_attn(
                block.input_layernorm(x),
                position_embeddings=model.rotary_emb(x, positions),
                attention_mask=self.mask(x.shape[1]),
            )
            x = x + attended
            out = rms(x + block.mlp(block.post_attention_layernorm(x)), w["norm"], eps)
            return self.reference.lm_head(out), out


# LongCat-Flash's release names (vLLM's and SGLang's name tables): model.mtp.layers.0.{enorm.m, hnorm.m,
# eh_proj, input_layernorm, self_attn.*, post_attention_layernorm, transformer_layer.mlp.*}, model.mtp.norm,
# and a copy of the embedding, model.mtp.embed_tokens
LONGCAT_NAMES = {
    "enorm": "model.mtp.layers.0.enorm.m.weight",
    "hnorm": "model.mtp.layers.0.hnorm.m.weight",
    "eh": "model.mtp.layers.0.eh_proj.weight",
    "norm": "model.mtp.norm.weight",
}


def longcat_release(folder: Path) -> Release:
    from torch import nn
    from transformers.models.longcat_flash import modeling_longcat_flash as longcat

    # an eps large enough that the latent norms' (rms_norm_eps here, 1e-6 in the model's layers) shows
    reference = hf_model("LongcatFlashConfig", **{**LONGCAT_FLASH, "rms_norm_eps": 0.05})
    save_hf(reference, folder / "full", "single")
    config, hidden = reference.config, LONGCAT_FLASH["hidden_size"]
    block = nn.ModuleDict(
        {
            "input_layernorm": longcat.LongcatFlashRMSNorm(hidden, config.rms_norm_eps),
            "self_attn": longcat.LongcatFlashMLA(config, layer_idx=0),
            "post_attention_layernorm": longcat.LongcatFlashRMSNorm(hidden, config.rms_norm_eps),
            "mlp": longcat.LongcatFlashMLP(config),
        }
    )
    for norm in (block.self_attn.q_a_layernorm, block.self_attn.kv_a_layernorm):
        norm.variance_epsilon = config.rms_norm_eps
    randomize(block, seed=7)
    block.eval()
    stored = load_file(str(folder / "full" / "model.safetensors"))
    inner = {"mlp.": "transformer_layer.mlp."}
    for name, tensor in block.state_dict().items():
        renamed = next((new + name[len(old) :] for old, new in inner.items() if name.startswith(old)), name)
        stored[f"model.mtp.layers.0.{renamed}"] = tensor
    mtp = mtp_weights(hidden, 0.0)
    stored |= {LONGCAT_NAMES[role]: weight for role, weight in mtp.items()}
    stored["model.mtp.embed_tokens.weight"] = stored["model.embed_tokens.weight"].clone()
    release = folder / "release"
    release.mkdir()
    save_file({k: v.contiguous() for k, v in stored.items()}, str(release / "model.safetensors"))
    saved = json.loads((folder / "full" / "config.json").read_text())
    (release / "config.json").write_text(json.dumps(saved))  # as released: no count, model.mtp.* says there is one
    assert "num_nextn_predict_layers" not in saved
    return LongcatRelease(release, reference, [block], [mtp], 0.0, "num_nextn_predict_layers", window=1 << 20)


class StepRelease(Release):
    """Step-3.5's and Step-3.7's MTP layers as vLLM's and SGLang's step3p5_mtp.py compute them (norms that scale by
    1 + weight; the output before shared_head.norm passed on), each with the attention of its kind; the
    reference is transformers' multimodal model, whose language model runs the first num_hidden_layers."""

    def __init__(self, folder, reference, blocks, mtp, kinds):
        super().__init__(folder, reference, blocks, mtp, 1.0, "num_nextn_predict_layers")
        self.kinds, self.text = kinds, reference.model.language_model

    def draft(self, h, next_ids, start=0, depth=0):
        w, model, eps, kind = self.mtp[depth], self.text, self.eps, self.kinds[depth]
        with torch.no_grad():
            embedded = model.embed_tokens(next_ids)
            x = F.linear(torch.cat([rms(embedded, w["enorm"], eps, 1.0), rms(h, w["hnorm"], eps, 1.0)], -1), w["eh"])
            positions = torch.arange(start, start + x.shape[1])[None]
            self.window = model.config.sliding_window if kind == "sliding_attention" else 1 << 20
            out = self.blocks[depth](
                x,
                position_ids=positions,
                position_embeddings=model.rotary_emb(x, positions, kind),
                attention_mask=self.mask(x.shape[1]),
            )
            return self.reference.lm_head(rms(out, w["norm"], eps, 1.0)), out


# Step-3.5's and Step-3.7's names (vLLM's and SGLang's step3p5_mtp.py, and the releases' safetensors indexes):
# model.layers.{num_hidden_layers + k}.*, the decoder layer's tensors as any layer's, beside enorm, hnorm, eh_proj,
# and under `transformer.` the final norm, shared_head.norm, and the layer's copy of the LM head, shared_head.output
STEP_NAMES = {role: f"model.layers.{{layer}}.{name}.weight" for role, name in DEEPSEEK_NAMES.items()}
STEP_NAMES["norm"] = "model.layers.{layer}.transformer.shared_head.norm.weight"
STEP_MTP_KINDS = [("sliding_attention", "sparse", 0.3), ("full_attention", "dense", 0.0)]


def step_release(folder: Path) -> Release:
    """Two MTP layers (the release has three): a sliding-window MoE one whose experts clamp, and a dense full
    one, listed after the model's layers in the per-layer lists as the release's config lists them."""
    text = STEP3P7["text_config"]
    layers, depths = text["num_hidden_layers"], len(STEP_MTP_KINDS)
    kinds, mlps, limits = (list(column) for column in zip(*STEP_MTP_KINDS, strict=True))
    padded = {
        **text,
        "num_hidden_layers": layers + depths,
        "layer_types": [*text["layer_types"], *kinds],
        "mlp_layer_types": [*text["mlp_layer_types"], *mlps],
        "swiglu_limits": [*text["swiglu_limits"], *limits],
        "swiglu_limits_shared": [*text["swiglu_limits_shared"], *limits],
    }
    full = hf_model("Step3p7Config", **{**STEP3P7, "text_config": padded})
    save_hf(full, folder / "full", "single")
    stored = load_file(str(folder / "full" / "model.safetensors"))
    mtp = [mtp_weights(text["hidden_size"], 1.0, depth) for depth in range(depths)]
    for depth, weights in enumerate(mtp):
        stored |= {STEP_NAMES[role].format(layer=layers + depth): w for role, w in weights.items()}
        stored[f"model.layers.{layers + depth}.transformer.shared_head.output.weight"] = stored[
            "lm_head.weight"
        ].clone()
    release = folder / "release"
    release.mkdir()
    save_file({k: v.contiguous() for k, v in stored.items()}, str(release / "model.safetensors"))
    saved = json.loads((folder / "full" / "config.json").read_text())
    saved["text_config"] |= {"num_hidden_layers": layers, "num_nextn_predict_layers": depths}
    (release / "config.json").write_text(json.dumps(saved))
    full.config.text_config.num_hidden_layers = layers  # the language model runs its first layers only
    blocks = list(full.model.language_model.layers[layers:])
    return StepRelease(release, full, blocks, mtp, kinds)


# ERNIE 4.5's names (vLLM's ernie_mtp.py, SGLang's ernie4_eagle.py): model.mtp_emb_norm.{k}, model.mtp_hidden_norm.{k},
# model.mtp_linear_proj.{k} (with a bias where the model has biases), model.mtp_block.{k}.*; no final norm
ERNIE_NAMES = {
    "enorm": "model.mtp_emb_norm.{depth}.weight",
    "hnorm": "model.mtp_hidden_norm.{depth}.weight",
    "eh": "model.mtp_linear_proj.{depth}.weight",
    "eh_bias": "model.mtp_linear_proj.{depth}.bias",
}


def ernie_weights(hidden: int, offset: float, depth: int = 0) -> dict[str, torch.Tensor]:
    weights = mtp_weights(hidden, offset, depth)
    del weights["norm"]
    weights["eh_bias"] = 0.1 * torch.randn(hidden, generator=torch.Generator().manual_seed(9 + depth))
    return weights


def ernie_release(folder: Path) -> Release:
    """The MTP layer's decoder layer dense (its MLP of intermediate_size), as the MoE layers end before it."""

    def extend(c: dict, n: int) -> dict:
        return {**c, "num_hidden_layers": c["num_hidden_layers"] + n, "moe_layer_end_index": c["num_hidden_layers"] - 1}

    config = {**ERNIE, "use_bias": True}
    names = ERNIE_NAMES
    return write_release(
        folder,
        "Ernie4_5_MoeConfig",
        config,
        extend,
        "model.mtp_block.{depth}.",
        names,
        0.0,
        "num_nextn_predict_layers",
        weights=ernie_weights,
    )


def glm5_with_mtp(config: dict, depths: int) -> dict:
    """GLM-5's tiny config with `depths` more layers, those computing their own selection ("full")."""
    import transformers

    layers = config["num_hidden_layers"]
    backbone = transformers.GlmMoeDsaConfig(**config).indexer_types
    return {**config, "num_hidden_layers": layers + depths, "indexer_types": [*backbone, *["full"] * depths]}


def with_sparse_mtp_layers(config: dict, depths: int) -> dict:
    """GLM-4.7-Flash's tiny config with `depths` more layers, MoE ones (`mlp_layer_types` lists them)."""
    layers = config["num_hidden_layers"]
    return {
        **config,
        "num_hidden_layers": layers + depths,
        "mlp_layer_types": [*config["mlp_layer_types"], *["sparse"] * depths],
    }


class PlainPreNormBlock(torch.nn.Module):
    """An MTP decoder layer without the hyper-connections of the model's (vLLM's hy_v4_mtp.py builds
    HYV4DecoderLayer with enable_ihc=False, SGLang's hunyuan_v4_nextn.py HYV4MTPDecoderLayer; vLLM's
    glm5_next_mtp.py, Glm5NextMTPBlock): transformers' attention and MoE of a decoder layer of the family,
    each after its norm with a plain residual. `padding_mask`: the attention takes a [B, T] mask of ones
    (GLM-5.3-Flash's, as its model passes it) rather than the causal one."""

    def __init__(self, layer, padding_mask: bool = False):
        super().__init__()
        self.layer, self.padding_mask = layer, padding_mask

    def forward(self, x, position_ids, position_embeddings, attention_mask):
        layer = self.layer
        if self.padding_mask:
            attention_mask = torch.ones(x.shape[:2], dtype=torch.bool)
        attended = layer.self_attn(
            layer.input_layernorm(x),
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
        )[0]
        x = x + attended
        return x + layer.mlp(layer.post_attention_layernorm(x))


class CollapsedStreams:
    """A release whose MTP layers take the last layer's streams collapsed by hc_head, after the final norm."""

    def backbone(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_and_output(self.reference, self.reference.model.norm, ids)


class HyV4Release(CollapsedStreams, NormedRelease):
    pass


class Glm5NextRelease(CollapsedStreams, Release):
    pass


# Hy4's (vLLM's hy_v4_mtp.py, SGLang's hunyuan_v4_nextn.py): model.mtp_layers.{k}.{enorm, hnorm, eh_proj,
# final_layernorm} beside the decoder layer's tensors, which has no hyper-connections
HY_V4_NAMES = {role: f"model.mtp_layers.{{depth}}.{name}.weight" for role, name in DEEPSEEK_NAMES.items()}
HY_V4_NAMES["norm"] = "model.mtp_layers.{depth}.final_layernorm.weight"


def hy_v4_release(folder: Path) -> Release:
    """The MTP layer an MoE one computing its own selection, as the release's is (its count
    num_nextn_predict_layers); its hyper-connections dropped from the release."""
    import transformers

    def extend(c: dict, n: int) -> dict:
        backbone = transformers.HYV4Config(**c)
        types = {"indexer_types": [*backbone.indexer_types, *["full"] * n]}
        return {
            **c,
            "num_hidden_layers": c["num_hidden_layers"] + n,
            "mlp_layer_types": [*backbone.mlp_layer_types, *["sparse"] * n],
        } | types

    release = write_release(
        folder,
        "HYV4Config",
        HY_V4,
        extend,
        "model.mtp_layers.{depth}.",
        HY_V4_NAMES,
        0.0,
        "num_nextn_predict_layers",
        kind=HyV4Release,
        window=1 << 20,
    )
    path = release.folder / "model.safetensors"
    save_file(
        {k: v for k, v in load_file(str(path)).items() if not re.match(r"model\.mtp_layers\.\d+\.hc_", k)}, str(path)
    )
    release.blocks = [PlainPreNormBlock(block) for block in release.blocks]
    return release


def glm5_next_release(folder: Path) -> Release:
    """GLM-5.3-Flash's (vLLM's glm5_next_mtp.py; transformers skips `layers.{num_hidden_layers}`): DeepSeek-V3's
    layout inside the multimodal checkpoint, `model.language_model.layers.{num_hidden_layers}.*`, the decoder
    layer's tensors (per-expert, no hyper-connections: those are dropped here) beside enorm, hnorm, eh_proj and
    shared_head.norm; an attention layer computing its own selection, and MoE; num_nextn_predict_layers in the
    text config."""
    text = {**GLM5_NEXT["text_config"], "index_topk": 4}  # one block: the MTP layer's selection cuts too
    layers = text["num_hidden_layers"]
    added = {"layer_types": "indexed_attention", "indexer_types": "full", "mlp_layer_types": "sparse"}
    extended = {**text, "num_hidden_layers": layers + 1} | {k: [*text[k], kind] for k, kind in added.items()}
    full = hf_model("Glm5NextConfig", **{**GLM5_NEXT, "text_config": extended})
    save_hf(full, folder / "full", "single")
    prefix = f"model.language_model.layers.{layers}."
    stored = {
        k: v
        for k, v in load_file(str(folder / "full" / "model.safetensors")).items()
        if not k.startswith(prefix + "hc_")
    }
    mtp = mtp_weights(text["hidden_size"], 0.0)
    stored |= {f"{prefix}{name}.weight": mtp[role] for role, name in DEEPSEEK_NAMES.items()}
    release = write_multimodal(folder, stored, {**text, "num_nextn_predict_layers": 1})
    language = full.model.language_model
    block = PlainPreNormBlock(language.layers[layers], padding_mask=True)
    language.layers = language.layers[:layers]
    full.config.text_config.num_hidden_layers = layers
    for per_layer in added:
        setattr(full.config.text_config, per_layer, getattr(full.config.text_config, per_layer)[:layers])
    reference = TextModel(full)
    return Glm5NextRelease(release, reference, [block], [mtp], 0.0, "num_nextn_predict_layers", rotary=lambda *_: None)


def dots3_with_mtp(config: dict, depths: int) -> dict:
    """dots3-note's tiny config with `depths` more layers, sliding ones with a dense MLP (vLLM's MTP layer)."""
    import transformers

    backbone = transformers.Dots3NoteTextConfig(**config)
    return {
        **config,
        "num_hidden_layers": config["num_hidden_layers"] + depths,
        "layer_types": [*backbone.layer_types, *["sliding_attention"] * depths],
        "mlp_layer_types": [*backbone.mlp_layer_types, *["dense"] * depths],
    }


def dots3_release(folder: Path) -> Release:
    """dots3-note's (vLLM's dots3_note/nvidia/mtp.py): DeepSeek-V3's layout and names, a sliding dense decoder
    layer, the output after shared_head.norm passed on, and a copy of the embedding, model.mtp.embed_tokens. As
    vLLM's config defaults the count to 1, the config says none here."""
    release = deepseek_release("Dots3NoteTextConfig", DOTS3_NOTE, extend=dots3_with_mtp)(folder)
    release.rotary = lambda model, x, positions: model.rotary_emb(x, positions, "sliding_attention")
    release.window = DOTS3_NOTE["sliding_window"]
    path = release.folder / "model.safetensors"
    stored = load_file(str(path))
    stored["model.mtp.embed_tokens.weight"] = stored.pop(
        f"model.layers.{DOTS3_NOTE['num_hidden_layers']}.embed_tokens.weight"
    )
    save_file(stored, str(path))
    config = json.loads((release.folder / "config.json").read_text())
    (release.folder / "config.json").write_text(json.dumps(with_count(config, release.count, None)))
    return release


class InklingRelease(Release):
    """Inkling's MTP layers as vLLM's inkling/nvidia/mtp.py computes them (InklingMultiTokenPredictor.forward,
    InklingMTP.compute_logits): input_proj([hidden_norm(h); embed_norm(e)]), e after the model's own embed_norm
    and the first depth's h the model's last hidden states after its final norm; a decoder layer of
    transformers' (dense, sliding where mtp_config.local_layer_ids lists it); its output divided by the muP
    multiplier before the LM head, and passed on: unnormed, or after the one `chain` norm of every depth where
    chain_hidden_post_norm."""

    def __init__(self, folder, reference, blocks, mtp, sliding: list[bool]):
        super().__init__(folder, reference, blocks, mtp, 0.0, "mtp_config.num_nextn_predict_layers")
        self.text, self.sliding = reference.model.language_model, sliding
        self.chain: torch.Tensor | None = None

    def backbone(self, ids):
        with torch.no_grad():
            return self.reference(ids).logits, self.text(ids).last_hidden_state  # after the final norm

    def draft(self, h, next_ids, start=0, depth=0):
        w, eps, config = self.mtp[depth], self.eps, self.text.config
        with torch.no_grad():
            embedded = self.text.embed_tokens(next_ids)  # after the model's embed_norm
            x = F.linear(torch.cat([rms(h, w["hnorm"], eps), rms(embedded, w["enorm"], eps)], -1), w["eh"])
            self.window = config.sliding_window_size if self.sliding[depth] else 1 << 20
            positions = torch.arange(start, start + x.shape[1])[None]
            out = self.blocks[depth](x, attention_mask=self.mask(x.shape[1]), position_ids=positions)
            out = out if self.chain is None else rms(out, self.chain, eps)
            logits = self.reference.lm_head(out / config.logits_mup_width_multiplier)
            return logits[..., : config.unpadded_vocab_size], out


# Inkling's release names (vLLM's inkling/nvidia/mtp.py): model.mtp.layers.{k}.{hidden_norm, embed_norm, input_proj,
# transformer_block.*} (the decoder layer in the release's names, as the model's layers are), model.mtp.chain_norm
INKLING_NAMES = {
    "enorm": "model.mtp.layers.{depth}.embed_norm.weight",
    "hnorm": "model.mtp.layers.{depth}.hidden_norm.weight",
    "eh": "model.mtp.layers.{depth}.input_proj.weight",
}
INKLING_MTP_SLIDING = [False, True]  # mtp_config.local_layer_ids [1]


def inkling_release(folder: Path) -> Release:
    """InklingForConditionalGeneration saved by transformers in the release layout with two more layers, dense,
    which become the MTP layers' decoder layers; the count and their kinds in a top-level mtp_config."""
    import transformers
    from test_inkling_release import TOWERS

    layers, depths = INKLING["num_hidden_layers"], len(INKLING_MTP_SLIDING)
    backbone = transformers.InklingTextConfig(**INKLING)
    kinds = ["hybrid_sliding" if sliding else "hybrid" for sliding in INKLING_MTP_SLIDING]
    text = {k: v for k, v in INKLING.items() if k not in ("local_layer_ids", "dense_mlp_idx")}
    text |= {
        "num_hidden_layers": layers + depths,
        "layer_types": [*backbone.layer_types, *kinds],
        "mlp_layer_types": [*backbone.mlp_layer_types, *["dense"] * depths],
    }
    torch.manual_seed(0)
    full = transformers.InklingForConditionalGeneration(transformers.InklingConfig(text_config=text, **TOWERS))
    randomize(full)
    full.eval().save_pretrained(folder / "full")
    stored = load_file(str(folder / "full" / "model.safetensors"))
    for depth in range(depths):
        last, prefix = f"model.llm.layers.{layers + depth}.", f"model.mtp.layers.{depth}.transformer_block."
        stored = {prefix + k[len(last) :] if k.startswith(last) else k: v for k, v in stored.items()}
    mtp = [mtp_weights(INKLING["hidden_size"], 0.0, depth) for depth in range(depths)]
    for depth, weights in enumerate(mtp):
        del weights["norm"]
        stored |= {INKLING_NAMES[role].format(depth=depth): w for role, w in weights.items()}
    release = folder / "release"
    release.mkdir()
    save_file({k: v.contiguous() for k, v in stored.items()}, str(release / "model.safetensors"))
    saved = json.loads((folder / "full" / "config.json").read_text())
    saved["text_config"] |= {key: getattr(backbone, key) for key in ("num_hidden_layers", *PER_LAYER[:2])}
    local = [depth for depth, sliding in enumerate(INKLING_MTP_SLIDING) if sliding]
    saved["mtp_config"] = {
        "num_nextn_predict_layers": depths,
        "local_layer_ids": local,
        "chain_hidden_post_norm": False,
    }
    (release / "config.json").write_text(json.dumps(saved))
    text_model = full.model.language_model
    blocks = list(text_model.layers[layers:])
    text_model.layers = text_model.layers[:layers]
    return InklingRelease(release, full, blocks, mtp, INKLING_MTP_SLIDING)


class Qwen4ExpRelease(Release):
    """Qwen4-Exp's MTP layer as SGLang's qwen4_exp_mtp.py computes it (Qwen4ExpForCausalLMMTP: its
    _fuse_residual_linear_shared, then a one-layer Qwen4ExpModel whose hyper_connection_mixer feeds the LM
    head): the hidden state is the last layer's streams [B, T, hc x E] (hc_hidden_states), normed over
    their whole width, each stream projected by fc_hidden, fc_embedding of the normed embedding added to
    every one; transformers' decoder layer (QSA attention, MoE, hyper-connections) and its GatedResidual as
    the collapse."""

    def backbone(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_and_output(self.reference, self.reference.model.layers[-1], ids)

    def draft(self, h, next_ids, start=0, depth=0):
        from transformers.masking_utils import create_causal_mask
        from transformers.models.qwen4_exp.modeling_qwen4_exp import Qwen4ExpTextGatedResidual

        w, model, eps, config = self.mtp[depth], self.reference.model, self.eps, self.reference.config
        mixer = Qwen4ExpTextGatedResidual(config, use_combine=False)
        mixer.load_state_dict({name: w[name] for name in mixer.state_dict()})
        with torch.no_grad():
            e = model.embed_tokens(next_ids)
            streams = rms(h, w["hnorm"], eps, 1.0).unflatten(-1, (config.hc_count, config.hidden_size))
            x = F.linear(streams, w["h"]) + F.linear(rms(e, w["enorm"], eps, 1.0), w["e"])[:, :, None]
            positions = torch.arange(start, start + x.shape[1])[None]
            mask = create_causal_mask(
                config=config,
                inputs_embeds=e,
                attention_mask=None,
                cache=None,
                position_ids=positions,
                allow_is_causal_skip=False,
            )
            out = self.blocks[depth](
                x.flatten(-2), position_embeddings=model.rotary_emb(e, positions), attention_mask=mask
            )
            return self.reference.lm_head(mixer(out)), out


# Qwen4-Exp's (SGLang's qwen4_exp_mtp.py, read by Qwen3_5ForCausalLMMTP.load_weights): mtp.layers.0.* beside
# mtp.{pre_fc_norm_embedding, pre_fc_norm_hidden, fc_embedding, fc_hidden, hyper_connection_mixer.*}
QWEN4_EXP_NAMES = {
    "enorm": "mtp.pre_fc_norm_embedding.weight",
    "hnorm": "mtp.pre_fc_norm_hidden.weight",
    "e": "mtp.fc_embedding.weight",
    "h": "mtp.fc_hidden.weight",
    "hc_norm.weight": "mtp.hyper_connection_mixer.hc_norm.weight",
    "input_mix_weight_down.weight": "mtp.hyper_connection_mixer.input_mix_weight_down.weight",
    "input_mix_weight_up.weight": "mtp.hyper_connection_mixer.input_mix_weight_up.weight",
}


def qwen4_exp_weights(hidden: int, offset: float, depth: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3 + depth)
    width, rank = QWEN4_EXP["hc_count"] * hidden, QWEN4_EXP["hc_lowrank"]
    shapes = {"enorm": (hidden,), "hnorm": (width,), "e": (hidden, hidden), "h": (hidden, hidden)}
    shapes |= {"hc_norm.weight": (width,), "input_mix_weight_down.weight": (rank, width)}
    shapes |= {"input_mix_weight_up.weight": (width, rank)}
    return {role: 0.1 * torch.randn(shape, generator=generator) for role, shape in shapes.items()}  # norms: 1 + w


def qwen4_exp_release(folder: Path) -> Release:
    """The MTP layer a QSA attention MoE layer with hyper-connections and no PLE, as SGLang builds it."""

    def extend(c: dict, n: int) -> dict:
        return {
            **c,
            "num_hidden_layers": c["num_hidden_layers"] + n,
            "layer_types": [*c["layer_types"], *["indexed_attention"] * n],
        }

    return write_release(
        folder,
        "Qwen4ExpTextConfig",
        QWEN4_EXP,
        extend,
        "mtp.layers.{depth}.",
        QWEN4_EXP_NAMES,
        1.0,
        "mtp_num_hidden_layers",
        kind=Qwen4ExpRelease,
        weights=qwen4_exp_weights,
    )


RELEASES = {
    "deepseek_v3": deepseek_release("DeepseekV3Config", {**DEEPSEEK_V2, "n_group": 4, "topk_group": 2}),
    # DeepSeek-V3's design with more than one MTP layer (its report trains D of them; V3 ships one)
    "deepseek_v3_depth2": deepseek_release("DeepseekV3Config", {**DEEPSEEK_V2, "n_group": 4, "topk_group": 2}, 2),
    "mimo_v2_flash": mimo_release(3),
    "deepseek_v4": v4_release,
    # DeepSeek-V3.2's and GLM-5's: the MTP layer a sparse-attention layer with an indexer of its own
    # (transformers' sparse attention wants a causal mask: a window longer than any test's prompt)
    "deepseek_v32": deepseek_release("DeepseekV32Config", DEEPSEEK_V32, window=1 << 20),
    "glm_moe_dsa": deepseek_release("GlmMoeDsaConfig", GLM_MOE_DSA, extend=glm5_with_mtp, window=1 << 20),
    "glm4_moe": deepseek_release("Glm4MoeConfig", GLM4_MOE),
    # GLM-4.7-Flash's (vLLM's glm4_moe_lite_mtp.py): DeepSeek-V3's layout, a latent-attention MoE layer
    "glm4_moe_lite": deepseek_release("Glm4MoeLiteConfig", GLM4_MOE_LITE, extend=with_sparse_mtp_layers),
    "longcat_flash": longcat_release,
    "dots3_note": dots3_release,
    "inkling": inkling_release,
    "ernie4_5_moe": ernie_release,
    "hy_v3": lambda folder: write_release(
        folder,
        "HYV3Config",
        HY_V3,
        lambda c, n: {**c, "num_hidden_layers": c["num_hidden_layers"] + n},
        "model.layers.{layer}.",
        HY_V3_NAMES,
        0.0,
        "num_nextn_predict_layers",
        kind=NormedRelease,
    ),
    "hy_v4": hy_v4_release,
    "glm5_next": glm5_next_release,
    "step3p5": step_release,
    "qwen3_5_moe": qwen_release("Qwen3_5MoeTextConfig", QWEN3_5_MOE),
    "qwen3_next": qwen_release("Qwen3NextConfig", QWEN3_NEXT),
    "qwen4_exp": qwen4_exp_release,
    "nemotron_h": nemotron_release,
    "minimax_m3_vl": minimax_m3_release,
    "mellum": mellum_release,
    "bailing_hybrid": bailing_release,
    "exaone_moe": exaone_release(),
    # K-EXAONE's design with a sliding-window MTP layer (its window narrower than the model's 8)
    "exaone_moe_sliding": exaone_release("sliding_attention", 5),
}


def with_count(config: dict, count: str, value: int | None) -> dict:
    """`config` with its MTP layers' count (in the text config of a multimodal one, or where a dotted `count`
    leads) `value`, or none said."""
    if "." in count:
        section, rest = count.split(".", 1)
        return {**config, section: with_count(config.get(section, {}), rest, value)}
    if "text_config" in config:
        return {**config, "text_config": with_count(config["text_config"], count, value)}
    return {k: v for k, v in config.items() if k != count} | ({} if value is None else {count: value})


@pytest.fixture(params=list(RELEASES), scope="module")
def release(request, tmp_path_factory) -> Release:
    return RELEASES[request.param](tmp_path_factory.mktemp(request.param))


def load(folder: Path, **options) -> localmoe.Engine:
    return localmoe.load(str(folder), device="cpu", dtype=torch.float32, options=RuntimeOptions(**options))


def prompt(length: int = PROMPT, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def drafts(engine: localmoe.Engine, ids: torch.Tensor, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The MTP layer's logits and outputs over ids[:, :-1] (next tokens ids[:, 1:]), the backbone's hidden
    states fed as a prompt of `split` positions and then one position at a time."""
    model, length = engine.model, ids.shape[1] - 1
    cache, mtp_cache = model.new_cache(1, length), model.new_mtp_cache(1, length)
    with torch.no_grad():
        _, h = model(ids[:, :length], cache, all_logits=True, hidden=True)
        pieces = [model.mtp_draft(h[:, :split], ids[:, 1 : split + 1], mtp_cache)]
        pieces += [model.mtp_draft(h[:, i : i + 1], ids[:, i + 1 : i + 2], mtp_cache) for i in range(split, length)]
    assert mtp_cache.pos == length
    return torch.cat([p[0] for p in pieces], 1), torch.cat([p[1] for p in pieces], 1)


def test_backbone_hidden_states_are_transformers(release):
    engine = load(release.folder)
    ids = prompt()
    logits, h = engine.model(ids, engine.model.new_cache(1, PROMPT), all_logits=True, hidden=True)
    expected_logits, expected_h = release.backbone(ids)
    assert (logits - expected_logits).abs().max() < TOLERANCE
    assert (h - expected_h).abs().max() < TOLERANCE
    last_logits, last_h = engine.model(ids, engine.model.new_cache(1, PROMPT), hidden=True)
    assert torch.equal(last_h, h[:, -1:]) and (last_logits - logits[:, -1:]).abs().max() < TOLERANCE


@pytest.mark.parametrize("name", ["deepseek_v3", "glm4_moe", "qwen3_5_moe", "nemotron_h"])
def test_the_mtp_layers_are_handed_the_hidden_states_after_the_final_norm(name, tmp_path_factory):
    """The target hands its MTP layers its last layer's output after the final norm (model.norm), what its
    LM head takes: what DeepSeek's modeling_deepseek.py, vLLM, SGLang and transformers' MTP drafting hand
    them, and what their hnorm was fit on."""
    model = load(RELEASES[name](tmp_path_factory.mktemp(name)).folder).model
    outputs = []
    hook = model.model.layers[-1].register_forward_hook(lambda module, args, out: outputs.append(out))
    try:
        with torch.no_grad():
            logits, h = model(prompt(), model.new_cache(1, PROMPT), all_logits=True, hidden=True)
    finally:
        hook.remove()
    last = outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0]
    assert torch.equal(h, model.model.norm(last))
    assert (logits - model.head(h)).abs().max() < TOLERANCE


@pytest.mark.parametrize("split", [PROMPT - 1, 4, 1])
def test_draft_logits_are_the_reference(release, split):
    """Over a prompt at once, and a prompt then one position at a time through the MTP layer's KV state."""
    engine = load(release.folder)
    ids = prompt()
    _, h = release.backbone(ids[:, :-1])
    expected_logits, expected_out = release.draft(h, ids[:, 1:])
    logits, out = drafts(engine, ids, split)
    assert (logits - expected_logits).abs().max() < TOLERANCE
    assert (out - expected_out).abs().max() < TOLERANCE


def test_a_draft_from_a_draft_is_the_reference(release):
    """Drafting further reuses the layer with its own output as h, at the next position."""
    model = load(release.folder).model
    ids = prompt()
    cache, mtp_cache = model.new_cache(1, PROMPT), model.new_mtp_cache(1, PROMPT)
    with torch.no_grad():
        _, h = model(ids[:, :-2], cache, all_logits=True, hidden=True)
        _, out = model.mtp_draft(h, ids[:, 1:-1], mtp_cache)
        logits, _ = model.mtp_draft(out[:, -1:], ids[:, -1:], mtp_cache)
    _, expected_h = release.backbone(ids[:, :-2])
    _, expected_out = release.draft(expected_h, ids[:, 1:-1])
    expected_logits, _ = release.draft(torch.cat([expected_h, expected_out[:, -1:]], 1), ids[:, 1:])
    assert (logits - expected_logits[:, -1:]).abs().max() < TOLERANCE


def test_each_layer_takes_the_output_of_the_one_before(release):
    """MTP layer k at position i: layer k - 1's output there and the token at i + k + 1 (DeepSeek-V3's
    report, section 2.2; transformers' MtpModel.forward), over a KV state of its own fed a prompt at once
    and then one position at a time."""
    model, depths = load(release.folder).model, len(release.blocks)
    ids = prompt()
    length, split = PROMPT - depths, 4
    _, expected_h = release.backbone(ids[:, :length])
    with torch.no_grad():
        _, h = model(ids[:, :length], model.new_cache(1, length), all_logits=True, hidden=True)
    for depth in range(depths):
        following = ids[:, depth + 1 : depth + 1 + length]
        expected_logits, expected_h = release.draft(expected_h, following, depth=depth)
        cache = model.new_mtp_cache(1, length, depth)
        with torch.no_grad():
            pieces = [model.mtp_draft(h[:, :split], following[:, :split], cache, depth)]
            pieces += [
                model.mtp_draft(h[:, i : i + 1], following[:, i : i + 1], cache, depth) for i in range(split, length)
            ]
        logits, h = (torch.cat([piece[j] for piece in pieces], 1) for j in (0, 1))
        assert (logits - expected_logits).abs().max() < TOLERANCE, depth
        assert (h - expected_h).abs().max() < TOLERANCE, depth


@pytest.mark.parametrize("miss_policy", ["direct", "copy"])
def test_offloaded_drafts_are_the_resident_ones(release, miss_policy):
    resident = load(release.folder)
    top_k = resident.plan.footprint.top_k
    offloaded = load(release.folder, expert_slots=top_k, miss_policy=miss_policy)
    assert isinstance(offloaded.experts, OffloadedExperts)
    ids = prompt(seed=5)
    for split in (PROMPT - 1, 3):
        expected, got = drafts(resident, ids, split), drafts(offloaded, ids, split)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # the cache counts each step's layers: the backbone's in a backbone step, the MTP layer's in a draft
    experts, model = offloaded.experts, offloaded.model
    experts.settle()
    mtp_layer = model.mtp.first_layer  # the first MTP layer's index (MiMo's has no routed experts)

    def uses() -> dict[int, int]:
        experts.end_step()
        experts.settle()
        return {layer: experts.cache.counters[layer].uses for layer in experts.cache.counters}

    before = uses()
    cache, mtp_cache = model.new_cache(1, PROMPT), model.new_mtp_cache(1, PROMPT)
    with torch.no_grad():
        _, h = model(ids, cache, all_logits=True, hidden=True)
        backbone = uses()
        model.mtp_draft(h[:, :-1], ids[:, 1:], mtp_cache)
        drafted = uses()
    assert all(backbone[layer] == before[layer] for layer in backbone if layer >= mtp_layer)
    assert backbone[mtp_layer - 1] > before[mtp_layer - 1]
    assert (drafted.get(mtp_layer, 0) > backbone.get(mtp_layer, 0)) == (mtp_layer in experts.specs)
    assert all(drafted[layer] == backbone[layer] for layer in drafted if layer != mtp_layer)


def test_the_plan_counts_the_mtp_layers(release):
    """Their routed experts go through the expert store like any layer's; their other weights are resident;
    their states (keys and values, windows' rings) are in the context's bytes."""
    engine = load(release.folder)
    footprint, backbone = engine.plan.footprint, len(moe_blocks(engine.model.model))
    config = json.loads((release.folder / "config.json").read_text())
    count = family_for(config).mtp.stated(config) if "." in release.count else None  # Inkling's: a section's
    count = count or config.get("text_config", config).get(release.count, 1)  # LongCat-Flash's: none, one stored
    assert len(engine.model.mtp.layers) == count == len(release.blocks)
    routed = len(moe_blocks(engine.model.mtp))
    assert routed == sum(any(".experts" in name for name, _ in block.named_modules()) for block in release.blocks)
    assert footprint.moe_layers == backbone + routed
    assert footprint.total_experts == (backbone + routed) * footprint.experts_per_layer
    plain = load(release.folder, speculative="off").plan.footprint
    mtp_bytes = sum(p.numel() * p.dtype.itemsize for p in engine.model.mtp.parameters())
    assert footprint.resident_bytes - plain.resident_bytes == mtp_bytes > 0
    mtp_state = sum(
        attention.state_bytes_per_token(torch.float32) * engine.plan.context
        + getattr(attention, "fixed_state_bytes", lambda _: 0)(torch.float32)
        for attention in (layer.block.self_attn for layer in engine.model.mtp.layers)
    )
    assert mtp_state > 0
    with_mtp = footprint.kv_bytes_per_token * engine.plan.context + footprint.fixed_state_bytes
    assert with_mtp - (plain.kv_bytes_per_token * engine.plan.context + plain.fixed_state_bytes) == mtp_state


# each release's name of an MTP layer's projection of [embedding; hidden state]
PROJECTIONS = (
    "eh_proj.weight",
    "mtp.fc.weight",
    "mtp.0.e_proj.weight",
    "mtp.fc_hidden.weight",
    "mtp_linear_proj.0.weight",
    "input_proj.weight",
)


def test_without_the_promise_or_the_tensors_the_backbone_loads_as_before(release, tmp_path, capsys):
    """No count in the config (where the family's layout implies none from the tensors), a count of 0, or a
    tensor missing or misshapen (one line says so): mtp is None and the backbone's outputs are the same bits."""
    ids = prompt()
    model = load(release.folder).model
    implied = family_for(json.loads((release.folder / "config.json").read_text())).mtp
    expected = model(ids, model.new_cache(1, PROMPT), all_logits=True)
    config = json.loads((release.folder / "config.json").read_text())
    stored = load_file(str(release.folder / "model.safetensors"))
    eh_proj = next(name for name in stored if name.endswith(PROJECTIONS))
    variants = {
        **({} if implied and implied.implied else {"unsaid": (with_count(config, release.count, None), stored)}),
        "none": (with_count(config, release.count, 0), stored),
        "stripped": (config, {k: v for k, v in stored.items() if k != eh_proj}),
        "misshapen": (config, {**stored, eh_proj: stored[eh_proj][:, :-1].contiguous()}),
    }
    for name, (variant_config, tensors) in variants.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(variant_config))
        save_file(tensors, str(folder / "model.safetensors"))
        capsys.readouterr()
        engine = load(folder)
        warned = capsys.readouterr().err
        assert engine.model.mtp is None
        assert not any(name.startswith("mtp.") for name, _ in engine.model.named_parameters())
        assert engine.plan.footprint.moe_layers == len(moe_blocks(engine.model.model))
        got = engine.model(ids, engine.model.new_cache(1, PROMPT), all_logits=True)
        assert torch.equal(got, expected), name
        if name in ("stripped", "misshapen"):
            assert warned.count("\n") == 1 and eh_proj in warned and "loading without the multi-token" in warned
            with pytest.raises(localmoe.LocalMoEError, match="has none that load .a line above says why"):
                load(folder, speculative="mtp")
        else:
            assert warned == ""


@pytest.mark.parametrize(
    "family, wrapper_type",
    [("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration"), ("qwen4_exp", "Qwen4ExpForConditionalGeneration")],
)
def test_qwen_multimodal_release_keeps_its_mtp_layers(tmp_path_factory, family, wrapper_type):
    """Qwen3.5's and Qwen4-Exp's Hub releases wrap the language model (model.language_model.*) beside a vision
    tower; the MTP layers stay at the top (mtp.*) and load as in the text-only layout."""
    text = RELEASES[family](tmp_path_factory.mktemp(f"{family}_text"))
    folder = tmp_path_factory.mktemp(f"{family}_multimodal")
    config = json.loads((text.folder / "config.json").read_text())
    wrapper = {
        "architectures": [wrapper_type],
        "model_type": config["model_type"].removesuffix("_text"),
        "text_config": config,
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
    }
    (folder / "config.json").write_text(json.dumps(wrapper))
    stored = load_file(str(text.folder / "model.safetensors"))
    moved = {re.sub(r"^model\.", "model.language_model.", k): v for k, v in stored.items()}
    save_file(moved, str(folder / "model.safetensors"))
    ids = prompt()
    expected, got = drafts(load(text.folder), ids, 4), drafts(load(folder), ids, 4)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_deepseek_v4_mtp_layers_beside_transformers_layout(tmp_path_factory):
    """transformers' DeepSeek-V4 drops `mtp.*` (it never saves them); a checkpoint in its names that keeps
    the release's `mtp.0.*` beside them drafts as the release does."""
    from test_deepseek_v4_release import RELEASE_PREFIXES

    release = RELEASES["deepseek_v4"](tmp_path_factory.mktemp("deepseek_v4_release"))
    folder = tmp_path_factory.mktemp("deepseek_v4_transformers")
    back = {new: old for old, new in RELEASE_PREFIXES.items()}

    def transformers_name(name: str) -> str:
        return next((old + name[len(new) :] for new, old in back.items() if name.startswith(new)), name)

    stored = load_file(str(release.folder / "model.safetensors"))
    save_file({transformers_name(k): v for k, v in stored.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text((release.folder / "config.json").read_text())
    assert "embed.weight" not in load_file(str(folder / "model.safetensors"))  # not the release's layout
    ids = prompt()
    expected, got = drafts(load(release.folder), ids, 4), drafts(load(folder), ids, 4)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("name", ["deepseek_v32", "glm_moe_dsa"])
def test_sparse_attention_mtp_layers_select_with_their_own_indexer(name, tmp_path_factory):
    """Their config lists the model's layers only (GLM-5's indexer_types too): the MTP layer past them
    computes its own selection, from its indexer's tensors in the checkpoint."""
    release = RELEASES[name](tmp_path_factory.mktemp(name))
    config = json.loads((release.folder / "config.json").read_text())
    assert all(len(config[key]) == config["num_hidden_layers"] for key in PER_LAYER if key in config)
    engine = load(release.folder)
    attention = engine.model.mtp.layers[0].block.self_attn
    assert hasattr(attention, "indexer")
    sources = engine.parts.resident_sources
    layer = config["num_hidden_layers"]
    assert (
        sources["mtp.layers.0.block.self_attn.indexer.wk.weight"] == f"model.layers.{layer}.self_attn.indexer.wk.weight"
    )


def test_nemotron_h_mtp_blocks_as_transformers_reads_them():
    """mtp_layers_block_type, else mtp_hybrid_override_pattern (which wins over the list's default, as
    transformers' config reads them), else attention and MoE; blocks vLLM's MTP does not build are refused."""
    from localmoe.errors import LocalMoEError
    from localmoe.models.nemotron_h import NemotronHArgs

    base = {"vocab_size": 64, "hidden_size": 32, "num_nextn_predict_layers": 1}
    read = {
        "default": ({}, ["full_attention", "moe"]),
        "pattern": ({"mtp_hybrid_override_pattern": "E*"}, ["moe", "full_attention"]),
        "legacy list": ({"mtp_layers_block_type": ["moe", "attention"]}, ["moe", "full_attention"]),
        "default list and pattern": (
            {"mtp_layers_block_type": ["full_attention", "moe"], "mtp_hybrid_override_pattern": "*"},
            ["full_attention"],
        ),
    }
    for name, (given, kinds) in read.items():
        assert NemotronHArgs.from_config(base | given).mtp_kinds() == kinds, name
    for pattern in ("*M", "**E", "E", "*EE"):
        with pytest.raises(LocalMoEError, match="lists MTP blocks"):
            NemotronHArgs.from_config(base | {"mtp_hybrid_override_pattern": pattern})
    NemotronHArgs.from_config(base | {"num_nextn_predict_layers": 0, "mtp_hybrid_override_pattern": "*M"})


def test_nemotron_h_mtp_layers_are_numbered_on_by_block():
    """vLLM's nemotron_h_mtp.py numbers the blocks of all its MTP layers in one run (mtp.layers.{k * blocks + j});
    its first holds enorm, hnorm and eh_proj, its last the final norm, its MoE the experts of layer n + k."""
    from localmoe.models.nemotron_h import FAMILY

    config = {"vocab_size": 64, "hidden_size": 32, "hybrid_override_pattern": "M*E", "num_nextn_predict_layers": 2}
    aliases = dict(FAMILY.mtp.aliases(config))
    assert aliases["model.layers.4.eh_proj."] == "mtp.layers.2.eh_proj."
    assert aliases["model.layers.4.final_layernorm."] == "mtp.layers.3.final_layernorm."
    assert aliases["model.layers.4.layers.1."] == "mtp.layers.3."
    assert aliases["backbone.layers.4.mixer.experts."] == "mtp.layers.3.mixer.experts."
    assert aliases["model.layers.3.layers.0."] == "mtp.layers.0."


def test_mellum_drafts_are_transformers_mtp_model(tmp_path_factory):
    """transformers 5.24 drafts with Mellum's MTP layer itself (MtpModel, loading the release's `mtp.*` names):
    its logits, from the model's hidden states and the next tokens, and the output it passes on to the next
    draft, are the MTP layer's here."""
    import transformers
    from transformers.modeling_layers import MtpModel

    release = RELEASES["mellum"](tmp_path_factory.mktemp("mellum"))
    main = transformers.AutoModelForCausalLM.from_pretrained(str(release.folder), dtype=torch.float32).eval()
    mtp = MtpModel.from_pretrained(main).eval()
    ids = prompt()
    positions = torch.arange(PROMPT - 1)[None]
    with torch.no_grad():
        h = main(ids[:, :-1], output_hidden_states=True).hidden_states[-1]
        embedded = mtp.embed_tokens(ids[:, 1:])
        rotary = mtp.rotary_emb(embedded, position_ids=positions, layer_type=mtp.config.layer_types[0])
        masks = mtp.create_masks_for_mtp_layer(0, embedded, None, positions)
        out = mtp.layers[0](embedded, h, position_embeddings=rotary, position_ids=positions, cache=None, **masks)
        expected = mtp._project_to_logits(out)
    for split in (PROMPT - 1, 4):
        logits, passed_on = drafts(load(release.folder), ids, split)
        assert (logits - expected).abs().max() < TOLERANCE
        assert (passed_on - out).abs().max() < TOLERANCE  # the normed output, as MtpModel chains it


def test_step_mtp_kinds_as_transformers_saves_them(tmp_path_factory):
    """transformers splits the release's padded per-layer lists into the model's and `mtp_layer_types`,
    `mtp_mlp_layer_types`: the MTP layers are built of the same kinds from either."""
    from localmoe.models.step3p7 import Step3p7Args

    release = RELEASES["step3p5"](tmp_path_factory.mktemp("step3p5"))
    padded = json.loads((release.folder / "config.json").read_text())["text_config"]
    layers = padded["num_hidden_layers"]
    split = {
        **padded,
        "layer_types": padded["layer_types"][:layers],
        "mlp_layer_types": padded["mlp_layer_types"][:layers],
    }
    split |= {
        "mtp_layer_types": padded["layer_types"][layers:],
        "mtp_mlp_layer_types": padded["mlp_layer_types"][layers:],
    }
    for config in (padded, split):
        args = Step3p7Args.from_config(config)
        assert args.layer_types == padded["layer_types"][:layers]
        assert (args.mtp_layer_types, args.mtp_mlp_layer_types) == (
            [k for k, _, _ in STEP_MTP_KINDS],
            [m for _, m, _ in STEP_MTP_KINDS],
        )


def test_step_mtp_final_norm_without_the_transformer_prefix(tmp_path_factory):
    """vLLM's step3p5_mtp.py strips `.transformer.` from an MTP layer's names where it is there: a checkpoint
    that stores the final norm as `shared_head.norm` drafts as the release's `transformer.shared_head.norm`."""
    release = RELEASES["step3p5"](tmp_path_factory.mktemp("step3p5"))
    folder = tmp_path_factory.mktemp("step3p5_plain")
    stored = load_file(str(release.folder / "model.safetensors"))
    assert any(".transformer.shared_head.norm." in name for name in stored)
    save_file(
        {k.replace(".transformer.shared_head.", ".shared_head."): v for k, v in stored.items()},
        str(folder / "model.safetensors"),
    )
    (folder / "config.json").write_text((release.folder / "config.json").read_text())
    ids = prompt()
    expected, got = drafts(load(release.folder), ids, 4), drafts(load(folder), ids, 4)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_longcat_mtp_layer_is_counted_from_its_tensors(tmp_path_factory, capsys):
    """LongCat-Flash's config.json names no MTP count: one layer where `model.mtp.layers.0.*` is stored (as vLLM's
    and SGLang's configs default it), the same as with the count said; none, silently, where nothing is."""
    release = RELEASES["longcat_flash"](tmp_path_factory.mktemp("longcat_flash"))
    config = json.loads((release.folder / "config.json").read_text())
    stored = load_file(str(release.folder / "model.safetensors"))
    variants = {
        "said": ({**config, "num_nextn_predict_layers": 1}, stored),
        "stripped": (config, {k: v for k, v in stored.items() if not k.startswith("model.mtp.")}),
    }
    engines = {"as released": load(release.folder)}
    for name, (variant_config, tensors) in variants.items():
        folder = tmp_path_factory.mktemp(name)
        (folder / "config.json").write_text(json.dumps(variant_config))
        save_file(tensors, str(folder / "model.safetensors"))
        capsys.readouterr()
        engines[name] = load(folder)
        assert capsys.readouterr().err == ""
    assert len(engines["as released"].model.mtp.layers) == 1 and engines["stripped"].model.mtp is None
    ids = prompt()
    expected, got = drafts(engines["said"], ids, 4), drafts(engines["as released"], ids, 4)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


# latent attention, GLM-4.5's grouped-query attention, MiMo-V2-Flash's sliding window; and static backbones
STATIC_MTP = ["deepseek_v3", "glm4_moe", "mimo_v2_flash"]


@pytest.mark.parametrize("name", STATIC_MTP)
def test_the_static_mtp_step_gives_what_mtp_draft_gives(name, tmp_path):
    """An MTP layer's static step (positions on the device, keys through their bucket) gives the eager
    step's bits: a catch-up over several positions, one position, across the first bucket's end and at
    the context's last position."""
    from localmoe.models.layers import bucket

    model = load(RELEASES[name](tmp_path).folder).model
    assert model.static_decode and model.static_mtp
    context = 70
    ids = torch.randint(0, 256, (1, context + 1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, h = model(ids[:, :context], model.new_cache(1, context), all_logits=True, hidden=True)
        eager, static = model.new_mtp_cache(1, context), model.new_mtp_cache(1, context)
        for start, length in ((0, 12), (12, 4), (16, 1), (61, 5), (66, 4)):
            for cache in (eager, static):  # on from `start` (a gap reads as unwritten)
                cache.rewind(start)
            piece, following = h[:, start : start + length], ids[:, start + 1 : start + 1 + length]
            expected = model.mtp_draft(piece, following, eager)
            positions = torch.arange(start, start + length)
            keys = bucket(start + length - 1, context)
            got = model.mtp_step(piece, following, positions, static, keys)
            static.pos += length
            assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_inkling_chain_norm_feeds_the_head_and_the_next_depth(tmp_path_factory):
    """With mtp_config.chain_hidden_post_norm, each depth's output passes the one model.mtp.chain_norm, on its way
    to the LM head and to the next depth alike (vLLM's InklingMultiTokenPredictor.forward)."""
    release = RELEASES["inkling"](tmp_path_factory.mktemp("inkling_chained"))
    release.chain = 1 + 0.1 * torch.randn(INKLING["hidden_size"], generator=torch.Generator().manual_seed(11))
    path = release.folder / "model.safetensors"
    save_file({**load_file(str(path)), "model.mtp.chain_norm.weight": release.chain}, str(path))
    config = json.loads((release.folder / "config.json").read_text())
    config["mtp_config"]["chain_hidden_post_norm"] = True
    (release.folder / "config.json").write_text(json.dumps(config))
    test_each_layer_takes_the_output_of_the_one_before(release)
