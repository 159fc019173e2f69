"""gpt-oss experts as the Hub ships them, in MXFP4: decoded exactly as transformers decodes them, and a
checkpoint in that form gives transformers' logits for the same (decoded) weights."""

import json

import pytest
import torch
from conftest import GPT_OSS, hf_model
from safetensors.torch import save_file

import localmoe
from localmoe.kernels.quantized import FP4_VALUES, dequantize_mxfp4
from localmoe.models.expert_tensors import Mxfp4


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., rows, cols] -> blocks [..., rows, cols/32, 16] uint8 and scales [..., rows, cols/32] uint8:
    a power-of-two scale per 32 values, then the nearest FP4 value, two codes per byte, low nibble first."""
    groups = weight.reshape(*weight.shape[:-1], -1, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=1e-8) / 6.0))
    scaled = groups / torch.exp2(exponent).unsqueeze(-1)
    table = torch.tensor(FP4_VALUES)
    codes = (scaled.unsqueeze(-1) - table).abs().argmin(-1).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exponent + 127).to(torch.uint8)


def test_decoding_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(118, 136, (3, 8, 4), dtype=torch.uint8, generator=g)
    expected = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    for expert in range(3):
        assert torch.equal(dequantize_mxfp4(blocks[expert], scales[expert]).T, expected[expert])


@pytest.fixture(scope="module")
def mxfp4_pair(tmp_path_factory):
    """(transformers model whose experts hold the decoded MXFP4 weights, a checkpoint in MXFP4)."""
    reference = hf_model("GptOssConfig", **GPT_OSS)
    folder = tmp_path_factory.mktemp("mxfp4")
    reference.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    for layer, block in enumerate(reference.model.layers):
        experts = block.mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{layer}.mlp.experts.{name}"
            blocks, scales = quantize_mxfp4(state.pop(key).transpose(1, 2))  # stored [E, out, in]
            state[f"{key}_blocks"], state[f"{key}_scales"] = blocks, scales
            decoded = torch.stack([dequantize_mxfp4(b, s) for b, s in zip(blocks, scales, strict=True)])
            with torch.no_grad():
                getattr(experts, name).copy_(decoded.transpose(1, 2))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["router", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config))
    return reference, folder


def test_mxfp4_checkpoint_matches_transformers(mxfp4_pair):
    reference, folder = mxfp4_pair
    engine = localmoe.load(str(folder), device="cpu", dtype=torch.float32)
    assert {type(layout) for layout in engine.parts.experts.layouts.values()} == {Mxfp4}
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference(ids).logits
    got = engine.model(ids, engine.model.new_cache(1, 20), all_logits=True)
    assert (got - expected).abs().max().item() < 1e-4


def test_mxfp4_offloaded_equals_resident(mxfp4_pair):
    _, folder = mxfp4_pair
    ids = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(5)).tolist()
    resident = localmoe.load(str(folder), device="cpu", dtype=torch.float32)
    offloaded = localmoe.load(
        str(folder), device="cpu", dtype=torch.float32, options=localmoe.engine.RuntimeOptions(expert_slots=3)
    )
    assert list(offloaded.generate_ids(ids, 12)) == list(resident.generate_ids(ids, 12))


def test_the_runtime_keeps_mxfp4_as_stored(mxfp4_pair):
    """Store rows and slots hold the FP4 codes and exponents: a miss copies those bytes, not bf16."""
    from localmoe.engine import RuntimeOptions
    from localmoe.runtime.layouts import Mxfp4Layout

    _, folder = mxfp4_pair
    ids = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(6)).tolist()
    options = RuntimeOptions(expert_slots=3, miss_policy="copy", prefetch=0)
    engine = localmoe.load(str(folder), device="cpu", dtype=torch.float32, options=options)
    store = engine.experts.cache.store
    hidden, inter = GPT_OSS["hidden_size"], GPT_OSS["intermediate_size"]
    assert isinstance(store.layout, Mxfp4Layout)
    weights = 3 * hidden * inter
    assert weights // 2 + weights // 32 <= store.expert_bytes < weights  # about half a byte per weight
    assert engine.plan.footprint.expert_bytes == store.expert_bytes
    list(engine.generate_ids(ids, 6))
    total = engine.experts.cache.totals()
    assert total.misses > 0 and total.bytes_copied == total.misses * store.expert_bytes
    # asked for, other quantization replaces MXFP4: decoded, then quantized again
    requantized = localmoe.load(
        str(folder), device="cpu", dtype=torch.float32, options=RuntimeOptions(expert_bits=8, expert_group_size=16)
    )
    assert not isinstance(requantized.experts.layout, Mxfp4Layout)
