"""MTP layers in checkpoints quantized as shipped: their dense weights read decoded as the model's are,
their routed experts kept in the stored form through the expert store, their drafts the reference's on the
decoded weights, and speculation giving plain decoding's tokens.

What the releases store (their configs, and the inference code that loads them):
- DeepSeek-V3/R1 (FP8 in 128x128 blocks, `weight_scale_inv`; no modules_to_not_convert): the MTP layer
  `model.layers.61` is FP8 like any layer but for `eh_proj`, which vLLM's deepseek_mtp.py and
  glm4_moe_mtp.py build as a plain nn.Linear, so bfloat16 on disk; GLM-4.5's MTP layer likewise.
- Qwen3-Next's and Qwen3.5's FP8 releases (fp8, 128x128 blocks): modules_to_not_convert names `mtp.fc`,
  the MTP layer's router and shared-expert gate and its norms; its attention and experts are FP8.
- llm-compressor's GLM-4.6 FP8-BLOCK example (model_free_ptq, compressed-tensors) ignores only the
  routers, lm_head and the embedding, so `eh_proj` is FP8 as well: the "all quantized" case below, written
  in the fp8 method's layout (compressed-tensors' FP8 blocks read through the same Fp8Weights).
- nvidia/DeepSeek-R1-FP4 (ModelOpt NVFP4) excludes `model.layers.61*` in its hf_quant_config.json (vLLM
  PR 25987), and nvidia/Qwen3.5-397B-A17B-NVFP4 and Qwen's GPTQ-Int4 releases keep the whole MTP layer
  bfloat16 too (vLLM PRs 38650 and 47828), routed experts included: the "unquantized MTP layer" cases, whose
  experts localmoe quantizes into the model's form to share its expert store (drafts only: the model checks
  every drafted token), the reference's MTP experts rounded alike.
- compressed-tensors NVFP4 releases of DeepSeek-V3's design quantize the routed experts and leave attention
  bfloat16 (Kimi K2's ignore list); written here by the compressed-tensors package with the MTP layer
  quantized alike (eh_proj and experts NVFP4) or named in the ignore list."""

import json

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig
from conftest import DEEPSEEK_V2
from packers import pack_gptq
from safetensors.torch import load_file, save_file
from test_compressed_tensors import KIMI_IGNORE, compress, groups, scheme_of
from test_fp8 import BLOCK, quantize_fp8
from test_mtp import PROMPT, RELEASES, TOLERANCE, deepseek_release, drafts, load, prompt
from test_speculative import NEW, assert_plain
from test_speculative import PROMPT as SPECULATION_PROMPT

from localmoe.engine import plan_for
from localmoe.kernels.quantized import dequantize_fp8_blocks
from localmoe.models.moe import moe_blocks
from localmoe.options import RuntimeOptions
from localmoe.runtime.layouts import Fp8Layout, Nvfp4Layout, QuantizedLayout

KEPT = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight", "shared_expert_gate", "shared_head.head")
EH = ("eh_proj.weight", "mtp.fc.weight")  # the MTP layers' input projection, as DeepSeek and Qwen name it
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK] * 2}

# name -> (release, whether eh_proj is FP8, whether the MTP layer's decoder layer is FP8, modules_to_not_convert)
VARIANTS = {
    "deepseek_v3": ("deepseek_v3", False, True, None),
    "qwen3_next": ("qwen3_next", False, True, ["lm_head", "mtp.fc", "mtp.layers.0.mlp.gate", "mtp.norm"]),
    "glm4_moe-all": ("glm4_moe", True, True, None),
    "deepseek_v3-bf16-mtp": ("deepseek_v3", False, False, ["lm_head", "model.layers.3"]),
}


def fp8_rounded(w: torch.Tensor) -> torch.Tensor:
    """w [..., R, C] as its FP8 blocks decode: each matrix quantized as the checkpoint stores it."""
    flat = w.detach().reshape(-1, *w.shape[-2:])
    decoded = [dequantize_fp8_blocks(*quantize_fp8(m, BLOCK), (BLOCK, BLOCK)) for m in flat]
    return torch.stack(decoded).reshape(w.shape)


def linear(name: str, param: torch.Tensor) -> bool:
    """What FP8 releases quantize, in transformers' names (routed experts fused [E, rows, columns]): with
    square blocks dividing the experts' width, the same tiles as the checkpoint's one matrix per expert."""
    stacked = ".experts." in name and not name.endswith(".weight")
    shape_fits = param.dim() == 3 if stacked else param.dim() == 2 and name.endswith(".weight")
    return shape_fits and not any(part in name for part in KEPT)


def fp8_release(variant: str, folder):
    """The release with its linear weights stored FP8 (the MTP layer's as the variant says), and the
    reference's weights set to what they decode to."""
    name, eh_fp8, block_fp8, not_converted = VARIANTS[variant]
    release = RELEASES[name](folder)
    mtp_prefix = "mtp." if name.startswith("qwen") else f"model.layers.{release.reference.config.num_hidden_layers}."
    path = release.folder / "model.safetensors"
    stored = {}
    for tensor_name, tensor in load_file(str(path)).items():
        in_mtp = tensor_name.startswith(mtp_prefix)
        quantized = eh_fp8 if tensor_name.endswith(EH) else block_fp8 or not in_mtp
        if (
            quantized
            and tensor.dim() == 2
            and tensor_name.endswith(".weight")
            and not any(k in tensor_name for k in KEPT)
        ):
            stored[tensor_name], stored[tensor_name + "_scale_inv"] = quantize_fp8(tensor, BLOCK)
        else:
            stored[tensor_name] = tensor
    save_file(stored, str(path))
    config = json.loads((release.folder / "config.json").read_text())
    config["quantization_config"] = FP8_CONFIG | ({"modules_to_not_convert": not_converted} if not_converted else {})
    (release.folder / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        for module in [release.reference, *(release.blocks if block_fp8 else [])]:
            for param_name, param in module.named_parameters():
                if linear(param_name, param):
                    param.copy_(fp8_rounded(param))
    if eh_fp8:
        for weights in release.mtp:
            weights["eh"] = fp8_rounded(weights["eh"])
    return release


NVFP4 = groups(("NVFP4A16", ["Linear"], {}))
NVFP4_DEEPSEEK = deepseek_release(
    "DeepseekV3Config", {**DEEPSEEK_V2, "n_group": 4, "topk_group": 2, "moe_intermediate_size": 32}
)  # experts 32 wide: NVFP4 groups inputs by 16


def nvfp4_release(folder, mtp_ignored: bool):
    """DeepSeek-V3's layout in compressed-tensors NVFP4 (Kimi K2's ignore list, and the MTP layer's prefix
    where `mtp_ignored`), written by compressed-tensors; the reference's weights those it decodes."""
    release = NVFP4_DEEPSEEK(folder)
    layers = release.reference.config.num_hidden_layers
    ignore = [*KIMI_IGNORE, *([f"re:model\\.layers\\.{layers}\\..*"] if mtp_ignored else [])]

    def quantize(name: str, tensor: torch.Tensor) -> dict | None:
        scheme = scheme_of(name, NVFP4, ignore)
        return None if scheme is None else compress(tensor, scheme, "nvfp4-pack-quantized", None)

    config = QuantizationConfig(
        config_groups=NVFP4, format="nvfp4-pack-quantized", ignore=ignore, quantization_status="compressed"
    )
    return stored_quantized(release, folder, quantize, config.to_dict())


GPTQ_INT4 = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True}


def gptq_int4(name: str, tensor: torch.Tensor) -> dict:
    tensors, decoded = pack_gptq(tensor, bits=4, group=32, symmetric=True)
    return {**tensors, "decoded": decoded}


def model_experts(mtp: str, quantize):
    """`quantize` for the model's routed experts, not the MTP layer's (under `mtp`) nor anything else."""

    def quantized(name: str, tensor: torch.Tensor) -> dict | None:
        return None if ".mlp.experts." not in name or name.startswith(mtp) else quantize(name, tensor)

    return quantized


def gptq_release(folder):
    """DeepSeek-V3's layout with the model's routed experts in 4-bit GPTQ (groups of 32, symmetric) and the
    MTP layer bfloat16, as Qwen3.5's GPTQ-Int4 releases keep it."""
    release = NVFP4_DEEPSEEK(folder)
    mtp = f"model.layers.{release.reference.config.num_hidden_layers}."
    return stored_quantized(release, folder, model_experts(mtp, gptq_int4), GPTQ_INT4)


def qwen3_5_release(folder, kind: str):
    """Qwen3.5's layout (`mtp.*`) with the model's routed experts in 4-bit GPTQ, as Qwen's GPTQ-Int4 releases,
    or in NVFP4 written by ModelOpt, as nvidia/Qwen3.5-397B-A17B-NVFP4; the MTP layer bfloat16."""
    release = RELEASES["qwen3_5_moe"](folder)
    if kind == "gptq":
        return stored_quantized(release, folder, model_experts("mtp.", gptq_int4), GPTQ_INT4, mtp=False)
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format
    from test_quantized_checkpoints import modelopt_hf_quant_config, modelopt_nvfp4

    hf_quant_config = modelopt_hf_quant_config()
    hf_quant_config["quantization"]["exclude_modules"] = ["lm_head", "mtp*", "*self_attn*", "*linear_attn*"]
    config = convert_hf_quant_config_format(hf_quant_config)
    return stored_quantized(release, folder, model_experts("mtp.", modelopt_nvfp4), config, mtp=False)


def stored_quantized(release, folder, quantize, quantization_config: dict, mtp: bool = True):
    """The release with each linear weight that `quantize` maps to its stored tensors ({suffix: tensor},
    and what they decode to under "decoded") stored so, and the reference's weights the decoded ones."""
    path, stored, decoded = release.folder / "model.safetensors", {}, {}
    for name, tensor in load_file(str(path)).items():
        kept = any(part in name for part in KEPT) or tensor.dim() != 2 or not name.endswith(".weight")
        parts = None if kept else quantize(name, tensor)
        if parts is None:
            stored[name] = decoded[name] = tensor
            continue
        decoded[name] = parts.pop("decoded").float()
        stored |= {f"{name.removesuffix('.weight')}.{suffix}": part for suffix, part in parts.items()}
    save_file({k: v.contiguous() for k, v in stored.items()}, str(path))
    config = json.loads((release.folder / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (release.folder / "config.json").write_text(json.dumps(config))
    set_decoded(release, decoded, folder, mtp)
    return release


def set_decoded(release, decoded: dict, folder, mtp: bool = True) -> None:
    """The reference's backbone, and (`mtp`: stored in DeepSeek-V3's names) its MTP decoder layers and
    eh_proj, set to `decoded` (the release's tensors, decoded), through transformers' own loading of a
    model with the MTP layers as its last layers."""
    import transformers

    plain = folder / "decoded"
    plain.mkdir()
    save_file({k: v.contiguous() for k, v in decoded.items()}, str(plain / "model.safetensors"))
    (plain / "config.json").write_text((folder / "full" / "config.json").read_text())
    full = transformers.AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    layers = release.reference.config.num_hidden_layers
    state = full.state_dict()
    mtp_layers = tuple(f"model.layers.{layers + depth}." for depth in range(len(release.blocks)))
    release.reference.load_state_dict({k: v for k, v in state.items() if not k.startswith(mtp_layers)})
    if not mtp:
        return  # kept as written
    for depth, block in enumerate(release.blocks):
        block.load_state_dict(full.model.layers[layers + depth].state_dict())
        release.mtp[depth]["eh"] = decoded[f"model.layers.{layers + depth}.eh_proj.weight"]


# fixture name -> (how it is written, the layout its experts are kept in, an MTP weight stored quantized)
WRITTEN = {
    "deepseek_v3": (lambda folder: fp8_release("deepseek_v3", folder), Fp8Layout, "block.self_attn.kv_b_proj"),
    "qwen3_next": (lambda folder: fp8_release("qwen3_next", folder), Fp8Layout, "block.self_attn.q_proj"),
    "glm4_moe-all": (lambda folder: fp8_release("glm4_moe-all", folder), Fp8Layout, "eh_proj"),
    "deepseek_v3-nvfp4": (lambda folder: nvfp4_release(folder, mtp_ignored=False), Nvfp4Layout, "eh_proj"),
}


@pytest.fixture(scope="module", params=list(WRITTEN))
def written(request, tmp_path_factory):
    write, layout, quantized = WRITTEN[request.param]
    return write(tmp_path_factory.mktemp(request.param)), layout, f"mtp.layers.0.{quantized}.weight"


def assert_drafts_are_the_reference(engine, release) -> None:
    """The MTP layer's logits and outputs, over a prompt at once and then one position at a time, are the
    reference's."""
    ids = prompt()
    _, h = release.backbone(ids[:, :-1])
    expected_logits, expected_out = release.draft(h, ids[:, 1:])
    for split in (PROMPT - 1, 4):
        logits, out = drafts(engine, ids, split)
        assert (logits - expected_logits).abs().max() < TOLERANCE
        assert (out - expected_out).abs().max() < TOLERANCE


def test_mtp_layers_read_decoded_and_draft_the_reference(written):
    release, layout, quantized = written
    engine = load(release.folder)
    assert isinstance(engine.experts.layout, layout)  # the MTP layer's experts in the model's form
    assert engine.checkpoint.stored_form(engine.parts.resident_sources[quantized]) is not None  # held decoded
    assert_drafts_are_the_reference(engine, release)


def test_mtp_experts_stay_as_stored_through_the_store_and_speculation_is_exact(written):
    release, layout, _ = written
    plain = load(release.folder, speculative="off")
    expected = list(plain.generate_ids(SPECULATION_PROMPT, NEW))
    resident = load(release.folder)
    assert resident.model.mtp is not None
    assert_plain(plain.model, SPECULATION_PROMPT, list(resident.generate_ids(SPECULATION_PROMPT, NEW)), expected)
    top_k = plain.parts.args.num_experts_per_tok
    offloaded = load(release.folder, expert_slots=top_k, miss_policy="copy", prefetch=0, draft_tokens=3)
    store, experts = offloaded.experts.cache.store, offloaded.experts
    mtp_layer = offloaded.model.mtp.first_layer
    assert isinstance(store.layout, layout) and mtp_layer in store.source.layers
    assert_plain(plain.model, SPECULATION_PROMPT, list(offloaded.generate_ids(SPECULATION_PROMPT, NEW)), expected)
    assert offloaded.stats.speculation.drafted > 0
    experts.settle()
    assert experts.cache.counters[mtp_layer].misses > 0  # the drafts' experts came through the store
    total = experts.cache.totals()
    assert total.bytes_copied == total.misses * store.expert_bytes  # each miss the stored bytes


def mtp_lines(err: str) -> list[str]:
    """The lines about MTP layers among what a load printed (a first run also builds the CPU kernels)."""
    return [line for line in err.splitlines() if "multi-token" in line]


def round_mtp_experts(release, layout) -> None:
    """The reference's MTP layers' routed experts as localmoe keeps them: quantized into `layout`'s form."""
    row = torch.zeros(layout.numel, dtype=torch.uint8)
    with torch.no_grad():
        for experts in (block.mlp.experts for block in release.blocks):
            written = experts.down_proj.clone()
            for expert in range(experts.gate_up_proj.shape[0]):
                gate, up = experts.gate_up_proj[expert].chunk(2)
                layout.pack(row, {"gate": gate, "up": up, "down": experts.down_proj[expert]})
                experts.gate_up_proj[expert] = layout.gate_up(row[None])[0]
                experts.down_proj[expert] = layout.down(row[None])[0]
            assert (experts.down_proj - written).abs().max() > 10 * TOLERANCE  # rounding the drafts tell apart


# name -> (how it is written, the layout the model's experts are kept in as stored)
UNQUANTIZED = {
    "deepseek_v3-fp8": (lambda folder: fp8_release("deepseek_v3-bf16-mtp", folder), Fp8Layout),
    "deepseek_v3-nvfp4": (lambda folder: nvfp4_release(folder, mtp_ignored=True), Nvfp4Layout),
    "deepseek_v3-gptq": (gptq_release, QuantizedLayout),
    "qwen3_5-nvfp4": (lambda folder: qwen3_5_release(folder, "nvfp4"), Nvfp4Layout),
    "qwen3_5-gptq": (lambda folder: qwen3_5_release(folder, "gptq"), QuantizedLayout),
}


@pytest.fixture(scope="module", params=list(UNQUANTIZED))
def unquantized(request, tmp_path_factory):
    """A release whose MTP layer is bfloat16 beside the model's quantized experts, with the reference's MTP
    experts rounded as localmoe quantizes them; the layout."""
    write, layout = UNQUANTIZED[request.param]
    release = write(tmp_path_factory.mktemp(request.param))
    engine = load(release.folder)
    assert isinstance(engine.experts.layout, layout)
    round_mtp_experts(release, engine.experts.layout)
    return release, layout


def test_an_unquantized_mtp_layer_drafts_with_its_experts_in_the_model_form(unquantized, capsys):
    """Kept bfloat16 where the model is quantized (modules_to_not_convert, an ignore list, exclude_modules):
    the MTP layer loads, its experts quantized into the model's form (the plan says so in a line), the
    model's kept as stored; the model's logits and the drafts are the reference's."""
    release, layout = unquantized
    capsys.readouterr()
    engine = load(release.folder)
    assert engine.model.mtp is not None and not mtp_lines(capsys.readouterr().err)
    [notice] = [line for line in engine.plan.notices if "MTP layers' routed experts" in line]
    assert "stored unquantized, are quantized by localmoe" in notice
    source, mtp_layer = engine.parts.experts, engine.model.mtp.first_layer
    assert source.stored_form is not None and not source.kept_as_stored(mtp_layer)
    assert all(source.kept_as_stored(layer) for layer in source.layers if layer != mtp_layer)
    ids = prompt()
    logits = engine.model(ids, engine.model.new_cache(1, PROMPT), all_logits=True)
    assert (logits - release.backbone(ids)[0]).abs().max() < TOLERANCE
    assert_drafts_are_the_reference(engine, release)


@pytest.mark.parametrize("slots", ["resident", "top_k", "layer", "top_k-mmap"])
def test_an_unquantized_mtp_layer_speculates_exactly_through_one_store(unquantized, slots):
    """Greedy speculation is plain decoding, all experts resident and offloaded (one layer's top-k slots,
    and one layer's experts; the host copy in RAM, or read from the files where RAM is short: the model's
    experts from the checkpoint, the MTP layer's from the quantized cache): the MTP layer's experts go
    through the same slots, each miss copying one row of the model's layout, whichever layer's."""
    release, layout = unquantized
    plain = load(release.folder, speculative="off")
    expected = list(plain.generate_ids(SPECULATION_PROMPT, NEW))
    block = moe_blocks(plain.model)[0]
    count = {"resident": None, "top_k": block.top_k, "layer": block.num_experts}[slots.removesuffix("-mmap")]
    offload = {} if count is None else {"expert_slots": count, "miss_policy": "copy", "prefetch": 0}
    engine = load(release.folder, draft_tokens=3, **offload, **({"host_budget": 1} if "mmap" in slots else {}))
    assert engine.plan.store == ("mmap" if "mmap" in slots else "none" if count is None else "ram")
    assert engine.speculative == "mtp"
    assert_plain(plain.model, SPECULATION_PROMPT, list(engine.generate_ids(SPECULATION_PROMPT, NEW)), expected)
    assert engine.stats.speculation.drafted > 0
    if count is None:
        return
    experts, mtp_layer = engine.experts, engine.model.mtp.first_layer
    store = experts.cache.store
    assert isinstance(store.layout, layout) and mtp_layer in store.rows  # quantized once, kept (or mapped)
    assert len(store.rows) == (1 if "mmap" in slots else len(store.source.layers))
    experts.settle()
    assert experts.cache.counters[mtp_layer].misses > 0  # the drafts' experts came through the slots
    total = experts.cache.totals()
    assert total.bytes_copied == total.misses * store.expert_bytes


def test_the_plan_counts_the_mtp_experts_in_the_model_form(unquantized):
    """The memory plan counts every expert, the MTP layer's too, at one row of the model's layout."""
    release, layout = unquantized
    options = RuntimeOptions(expert_slots=2)
    plan = plan_for(str(release.folder), device="cpu", dtype=torch.float32, options=options)
    engine = load(release.folder)
    source = engine.parts.experts
    assert plan.footprint.expert_bytes == engine.experts.layout.numel
    assert plan.footprint.total_experts == sum(block.num_experts for block in source.blocks.values())
    assert any("MTP layers' routed experts" in notice for notice in plan.notices)


def test_expert_bits_quantizes_the_mtp_experts_with_the_model(tmp_path, capsys):
    """Where localmoe quantizes every expert itself, the MTP layer's are quantized alike, without a notice."""
    release = gptq_release(tmp_path)
    engine = load(release.folder, expert_bits=4)
    assert engine.model.mtp is not None and not engine.experts.layout.stored
    assert not [line for line in engine.plan.notices if "MTP" in line]


@pytest.mark.parametrize("tensor", ["model.layers.3.self_attn.kv_b_proj", "model.layers.3.mlp.experts.5.down_proj"])
def test_an_mtp_weight_without_its_scale_is_one_line(tmp_path, capsys, tensor):
    """A half-downloaded release (an MTP weight's scale missing): the model loads without its MTP layers,
    and one line names the scale."""
    release = fp8_release("deepseek_v3", tmp_path)
    path = release.folder / "model.safetensors"
    stored = load_file(str(path))
    del stored[f"{tensor}.weight_scale_inv"]
    save_file(stored, str(path))
    capsys.readouterr()
    engine = load(release.folder)
    [warned] = mtp_lines(capsys.readouterr().err)
    assert f"{tensor}.weight_scale_inv" in warned
    assert "loading without the multi-token-prediction layers" in warned and engine.model.mtp is None
    assert isinstance(engine.experts.layout, Fp8Layout)
