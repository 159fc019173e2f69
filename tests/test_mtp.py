"""Multi-token-prediction layers, loaded as each release ships them: their draft logits against a reference
written from the published inference code, in float32 within 1e-4 (transformers drops these tensors, so
it cannot be the oracle for them; it is for the decoder layer inside, which is the family's own).

The reference follows DeepSeek-V3's report (section 2.2) and SGLang's deepseek_nextn.py / vLLM's
deepseek_mtp.py and qwen3_next_mtp.py: h' = eh_proj([enorm(embed(t[i+1])); hnorm(h[i])]), one decoder
layer at the positions of h, then the layer's final norm and the model's LM head."""

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import DEEPSEEK_V2, GLM4_MOE, QWEN3_5_MOE, QWEN3_NEXT, hf_model, save_hf
from safetensors.torch import load_file, save_file

import localmoe
from localmoe.models.moe import moe_blocks
from localmoe.options import RuntimeOptions
from localmoe.runtime.offload import OffloadedExperts

TOLERANCE = 1e-4
PROMPT = 12


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight)


class Release:
    """A tiny checkpoint in a release's MTP layout, with transformers' backbone and MTP decoder layer, and
    the MTP layer's own weights (`offset`: 1 where its norms scale by 1 + weight)."""

    def __init__(self, folder: Path, reference, block, mtp: dict, eps: float, offset: float, count: str):
        self.folder, self.reference, self.block, self.mtp = folder, reference, block, mtp
        self.eps, self.offset, self.count = eps, offset, count
        reference.config.tie_last_hidden_states = False  # its last hidden states before the final norm

    def backbone(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' logits and last layer's output (before the final norm) for ids [1, T]."""
        with torch.no_grad():
            out = self.reference(ids, output_hidden_states=True)
        return out.logits, out.hidden_states[-1]

    def draft(self, h: torch.Tensor, next_ids: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP layer over h [1, T, E] at positions start .. start+T-1 (attending to them alone when
        start is 0) and the next tokens [1, T]: (logits, output before the final norm)."""
        w, model, eps, offset = self.mtp, self.reference.model, self.eps, self.offset
        with torch.no_grad():
            embedded = model.embed_tokens(next_ids)
            inputs = torch.cat([rms(embedded, w["enorm"], eps, offset), rms(h, w["hnorm"], eps, offset)], -1)
            x = F.linear(inputs, w["eh"])
            positions = torch.arange(start, start + x.shape[1])[None]
            out = self.block(x, position_ids=positions, position_embeddings=model.rotary_emb(x, positions))
            out = out[0] if isinstance(out, tuple) else out
            return self.reference.lm_head(rms(out, w["norm"], eps, offset)), out


def mtp_weights(hidden: int, offset: float) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    norm = 1 - offset  # norms near one
    return {
        "enorm": norm + 0.1 * torch.randn(hidden, generator=generator),
        "hnorm": norm + 0.1 * torch.randn(hidden, generator=generator),
        "eh": 0.1 * torch.randn(hidden, 2 * hidden, generator=generator),
        "norm": norm + 0.1 * torch.randn(hidden, generator=generator),
    }


def write_release(folder: Path, config_class: str, config: dict, extend, renamed: str, names, offset: float, count):
    """A model of one more layer than `config` says, written by transformers; its last layer becomes the
    MTP layer's decoder layer, stored under `renamed` (with {layer}), beside the MTP layer's own weights
    under `names` (enorm, hnorm, eh, norm -> stored name), with the config's `count` field saying 1.
    `extend`: the config of one more layer."""
    layers = config["num_hidden_layers"]
    full = hf_model(config_class, **extend(config))
    save_hf(full, folder / "full", "single")
    stored = load_file(str(folder / "full" / "model.safetensors"))
    last = f"model.layers.{layers}."
    prefix = renamed.format(layer=layers)
    stored = {prefix + k[len(last) :] if k.startswith(last) else k: v for k, v in stored.items()}
    mtp = mtp_weights(config["hidden_size"], offset)
    stored |= {names[role].format(layer=layers): weight for role, weight in mtp.items()}
    release = folder / "release"
    release.mkdir()
    save_file({k: v.contiguous() for k, v in stored.items()}, str(release / "model.safetensors"))
    saved = json.loads((folder / "full" / "config.json").read_text())
    saved |= {**config, count: 1}
    (release / "config.json").write_text(json.dumps(saved))
    block = full.model.layers[layers]
    full.model.layers = full.model.layers[:layers]
    full.config.num_hidden_layers = layers
    if getattr(full.config, "layer_types", None):
        full.config.layer_types = full.config.layer_types[:layers]
    return Release(release, full, block, mtp, full.config.rms_norm_eps, offset, count)


def deepseek_release(config_class: str, config: dict):
    """DeepSeek-V3's layout (GLM-4.5's too): the MTP layer is `model.layers.{num_hidden_layers}`, its
    decoder layer's tensors under that prefix as any layer's (per-expert names), beside enorm, hnorm,
    eh_proj, shared_head.norm, and copies of the embedding and the LM head (embed_tokens, shared_head.head)."""

    def write(folder: Path) -> Release:
        names = {role: f"model.layers.{{layer}}.{name}.weight" for role, name in DEEPSEEK_NAMES.items()}
        layers = config["num_hidden_layers"]
        release = write_release(
            folder,
            config_class,
            config,
            lambda c: {**c, "num_hidden_layers": layers + 1},
            "model.layers.{layer}.",
            names,
            0.0,
            "num_nextn_predict_layers",
        )
        path = release.folder / "model.safetensors"
        stored = load_file(str(path))
        copies = {"embed_tokens": "model.embed_tokens.weight", "shared_head.head": "lm_head.weight"}
        stored |= {f"model.layers.{layers}.{copy}.weight": stored[name].clone() for copy, name in copies.items()}
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


def qwen_release(config_class: str, config: dict):
    """Qwen's layout: `mtp.*`, the decoder layer full attention whatever the layer types say."""

    def extend(c: dict) -> dict:
        layers = c["num_hidden_layers"]
        types = ["linear_attention" if (i + 1) % 4 else "full_attention" for i in range(layers)]
        return {**c, "num_hidden_layers": layers + 1, "layer_types": [*types, "full_attention"]}

    def write(folder: Path) -> Release:
        return write_release(
            folder, config_class, config, extend, "mtp.layers.0.", QWEN_NAMES, 1.0, "mtp_num_hidden_layers"
        )

    return write


RELEASES = {
    "deepseek_v3": deepseek_release("DeepseekV3Config", {**DEEPSEEK_V2, "n_group": 4, "topk_group": 2}),
    "glm4_moe": deepseek_release("Glm4MoeConfig", GLM4_MOE),
    "qwen3_5_moe": qwen_release("Qwen3_5MoeTextConfig", QWEN3_5_MOE),
    "qwen3_next": qwen_release("Qwen3NextConfig", QWEN3_NEXT),
}


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


@pytest.mark.parametrize("miss_policy", ["direct", "copy"])
def test_offloaded_drafts_are_the_resident_ones(release, miss_policy):
    resident = load(release.folder)
    top_k = resident.parts.args.num_experts_per_tok
    offloaded = load(release.folder, expert_slots=top_k, miss_policy=miss_policy)
    assert isinstance(offloaded.experts, OffloadedExperts)
    ids = prompt(seed=5)
    for split in (PROMPT - 1, 3):
        expected, got = drafts(resident, ids, split), drafts(offloaded, ids, split)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # the cache counts each step's layers: the backbone's in a backbone step, the MTP layer's in a draft
    experts, model = offloaded.experts, offloaded.model
    experts.settle()
    mtp_layer = max(experts.specs)

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
    assert backbone[mtp_layer] == before[mtp_layer] and backbone[mtp_layer - 1] > before[mtp_layer - 1]
    assert drafted[mtp_layer] > backbone[mtp_layer]
    assert all(drafted[layer] == backbone[layer] for layer in drafted if layer != mtp_layer)


def test_the_plan_counts_the_mtp_layer(release):
    """Its routed experts go through the expert store like any layer's; its other weights are resident."""
    engine = load(release.folder)
    footprint, backbone = engine.plan.footprint, len(moe_blocks(engine.model.model))
    assert footprint.moe_layers == backbone + 1
    assert footprint.total_experts == (backbone + 1) * footprint.experts_per_layer
    assert footprint.resident_bytes == sum(p.numel() * p.dtype.itemsize for p in engine.model.parameters())
    assert any(name.startswith("mtp.") for name, _ in engine.model.named_parameters())


def test_without_the_promise_or_the_tensors_the_backbone_loads_as_before(release, tmp_path, capsys):
    """No count in the config, a count of 0, or a tensor missing or misshapen (one line says so): mtp is
    None and the backbone's outputs are the same bits."""
    ids = prompt()
    model = load(release.folder).model
    expected = model(ids, model.new_cache(1, PROMPT), all_logits=True)
    config = json.loads((release.folder / "config.json").read_text())
    stored = load_file(str(release.folder / "model.safetensors"))
    eh_proj = next(name for name in stored if name.endswith(("eh_proj.weight", "mtp.fc.weight")))
    variants = {
        "unsaid": ({k: v for k, v in config.items() if k != release.count}, stored),
        "none": ({**config, release.count: 0}, stored),
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
        else:
            assert warned == ""


def test_qwen3_5_multimodal_release_keeps_its_mtp_layers(tmp_path_factory):
    """Qwen3.5's Hub releases wrap the language model (model.language_model.*) beside a vision tower; the
    MTP layers stay at the top (mtp.*) and load as in the text-only layout."""
    text = RELEASES["qwen3_5_moe"](tmp_path_factory.mktemp("qwen3_5_text"))
    folder = tmp_path_factory.mktemp("qwen3_5_multimodal")
    config = json.loads((text.folder / "config.json").read_text())
    wrapper = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": {**config, "model_type": "qwen3_5_moe_text"},
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
    }
    (folder / "config.json").write_text(json.dumps(wrapper))
    stored = load_file(str(text.folder / "model.safetensors"))
    moved = {re.sub(r"^model\.", "model.language_model.", k): v for k, v in stored.items()}
    save_file(moved, str(folder / "model.safetensors"))
    ids = prompt()
    expected, got = drafts(load(text.folder), ids, 4), drafts(load(folder), ids, 4)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
