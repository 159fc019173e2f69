"""DeepSeek-V4 as DeepSeek releases it (deepseek-ai/DeepSeek-V4-Flash): bare names, routed experts in FP4
(e2m1 codes in int8, a ue8m0 exponent per 32 inputs) or FP8 (the -Base release), other linear weights in
block FP8 with `.scale` companions, multi-token prediction layers beside the model. A tiny model written
in that layout must give exactly what the same model gives in transformers' layout, its experts kept as
stored from disk to slot."""

import json
import re

import pytest
import torch
from conftest import DEEPSEEK_V4, hf_model
from packers import quantize_fp8, quantize_mxfp4
from safetensors.torch import load_file, save_file

import localmoe
from localmoe.engine import RuntimeOptions
from localmoe.runtime.layouts import Fp8Layout, Mxfp4Layout

BLOCK = (16, 16)  # tiles the tiny model's matrices, as 128 x 128 tiles the release's
EXPERT = re.compile(r"model\.layers\.\d+\.ffn\.experts\.\d+\.w[123]\.weight")
# the linear layers the release stores in FP8 (the others, such as wo_a and the compressors, are not)
FP8_LINEAR = re.compile(r".*\.(attn\.(wq_a|wq_b|wkv|wo_b|indexer\.wq_b)|ffn\.shared_experts\.w[123])\.weight")
RELEASE_PREFIXES = {"model.layers.": "layers.", "model.embed_tokens.": "embed.", "model.norm.": "norm.",
                    "model.hc_head.hc_": "hc_head_"}  # fmt: skip


def release_name(name: str) -> str:
    """transformers' saved name -> the release's."""
    return next((new + name[len(old) :] for old, new in RELEASE_PREFIXES.items() if name.startswith(old)), name)


def transformers_fp8_decode(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """transformers' own decoding of the release's FP8 and FP4 tensors (integrations/finegrained_fp8.py)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    return Fp8Dequantize(None)._dequantize_one(weight, scale, output_dtype=torch.float32)


def expert_release(weight: torch.Tensor, expert_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert matrix as the release stores it: FP4 codes int8 [R, C/2] with ue8m0 exponents [R, C/32],
    or FP8 with float32 scales per tile (-Base)."""
    if expert_dtype == "fp8":
        return quantize_fp8(weight, BLOCK)
    blocks, exponents = quantize_mxfp4(weight)
    return blocks.flatten(-2).view(torch.int8), exponents.view(torch.float8_e8m0fnu)


@pytest.fixture(scope="module", params=["fp4", "fp8"], ids=["experts-fp4", "experts-fp8-base"])
def layouts(request, tmp_path_factory):
    """(transformers on the decoded weights, the model in transformers' layout, in the release's)."""
    expert_dtype = request.param
    hf = hf_model("DeepseekV4Config", **DEEPSEEK_V4)
    ours = tmp_path_factory.mktemp("transformers-layout")
    hf.save_pretrained(ours)
    state, release = load_file(str(ours / "model.safetensors")), {}
    for name, tensor in state.items():
        if EXPERT.fullmatch(name) or FP8_LINEAR.fullmatch(name):
            ue8m0 = not EXPERT.fullmatch(name) and expert_dtype == "fp4"  # fp4 releases scale the rest in ue8m0
            if EXPERT.fullmatch(name):
                stored, scale = expert_release(tensor, expert_dtype)
            else:
                stored, scale = quantize_fp8(tensor, BLOCK, power_of_two=ue8m0)
                scale = scale.to(torch.float8_e8m0fnu) if ue8m0 else scale
            release[release_name(name)] = stored
            release[release_name(name).removesuffix("weight") + "scale"] = scale
            state[name] = transformers_fp8_decode(stored, scale)
        else:
            release[release_name(name)] = tensor.to(torch.int32) if name.endswith("tid2eid") else tensor
    # a multi-token prediction layer, incomplete, quantized like the rest
    release["mtp.0.embed.weight"] = torch.randn(7, 5)
    release["mtp.0.ffn.experts.0.w1.weight"] = torch.randint(-128, 127, (32, 32), dtype=torch.int8)
    release["mtp.0.ffn.experts.0.w1.scale"] = torch.full((32, 2), 127, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    save_file(state, str(ours / "model.safetensors"), metadata={"format": "pt"})
    folder = tmp_path_factory.mktemp(f"release-{expert_dtype}")
    save_file(release, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((ours / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
        **({"scale_fmt": "ue8m0"} if expert_dtype == "fp4" else {}),
    }
    config.update(expert_dtype=expert_dtype, num_nextn_predict_layers=1)
    (folder / "config.json").write_text(json.dumps(config))
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32).eval()
    return reference, ours, folder, expert_dtype


def test_the_release_equals_the_transformers_layout(layouts):
    reference, ours, folder, _ = layouts
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    # the reference kernel for both: the CPU kernels sum MXFP4 groups in another order than float weights
    release = localmoe.load(str(folder), device="cpu", dtype=torch.float32, kernels="reference")
    plain = localmoe.load(str(ours), device="cpu", dtype=torch.float32, kernels="reference")
    got, expected = (e.model(ids, e.model.new_cache(1, 24), all_logits=True) for e in (release, plain))
    assert torch.equal(got, expected)  # the same float32 weights, decoded exactly from their stored forms
    with torch.no_grad():
        assert (got - reference(ids).logits).abs().max().item() < 1e-4
    assert list(release.generate_ids(ids[0].tolist(), 12)) == list(plain.generate_ids(ids[0].tolist(), 12))


def test_the_experts_stay_as_released_at_every_slot_count(layouts):
    _, _, folder, expert_dtype = layouts
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    resident = localmoe.load(str(folder), device="cpu", dtype=torch.float32)
    expected = list(resident.generate_ids(ids, 8))
    layout = Mxfp4Layout if expert_dtype == "fp4" else Fp8Layout
    assert isinstance(resident.experts.layout, layout)
    hidden, inter = DEEPSEEK_V4["hidden_size"], DEEPSEEK_V4["moe_intermediate_size"]
    weights = 3 * hidden * inter
    for slots in (2, 5, 11):
        options = RuntimeOptions(expert_slots=slots, miss_policy="copy", prefetch=0)
        engine = localmoe.load(str(folder), device="cpu", dtype=torch.float32, options=options)
        store = engine.experts.cache.store
        assert isinstance(store.layout, layout) and engine.plan.footprint.expert_bytes == store.expert_bytes
        # a row holds the stored bytes: half a byte per weight and an exponent per 32 (FP4), or a byte
        # per weight and a float32 per tile (FP8), each section padded to 16 bytes
        stored = weights // 2 + weights // 32 if expert_dtype == "fp4" else weights + 4 * weights // (16 * 16)
        assert stored <= store.expert_bytes <= stored + 4 * 16
        assert list(engine.generate_ids(ids, 8)) == expected
        total = engine.experts.cache.totals()
        assert total.misses > 0 and total.bytes_copied == total.misses * store.expert_bytes


def test_incomplete_multi_token_prediction_layers_are_not_read(layouts, capsys):
    """This release's MTP layer lacks most of its tensors: the model loads without it, with a line that
    says so (complete ones load: tests/test_mtp.py)."""
    _, _, folder, _ = layouts
    capsys.readouterr()
    engine = localmoe.load(str(folder), device="cpu", dtype=torch.float32)
    assert engine.model.mtp is None and "loading without the multi-token" in capsys.readouterr().err
    assert not any(source.startswith("mtp.") for source in engine.parts.resident_sources.values())
