"""Block-scaled FP8 checkpoints as DeepSeek, Kimi, MiniMax and Qwen ship them: read unchanged, matching
transformers run on the decoded weights, with the routed experts kept in FP8 from disk to slot."""

import json
import shutil

import pytest
import torch
from conftest import TINY_FAMILIES, hf_model
from safetensors.torch import load_file, save_file

import localmoe
from localmoe.engine import RuntimeOptions
from localmoe.kernels.quantized import Fp8Weights, dequantize_fp8_blocks
from localmoe.kernels.reference import expert_pair_outputs
from localmoe.models.moe import GatedActivation
from localmoe.runtime.layouts import Fp8Layout

BLOCK = 8  # divides the tiny models' widths, as 128 divides real ones
FAMILIES = {name: TINY_FAMILIES[name] for name in ("deepseek_v3", "qwen3_moe")}


def quantize_fp8(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, C] -> float8 e4m3 [R, C] and a float32 multiplier per block x block tile (partial at the edges)."""
    rows, columns = w.shape
    tiles = torch.nn.functional.pad(w.float(), (0, -columns % block, 0, -rows % block))
    tiles = tiles.unflatten(0, (-1, block)).unflatten(2, (-1, block))  # [R/b, b, C/b, b]
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    full = scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :columns]
    return (w.float() / full).to(torch.float8_e4m3fn), scale


def quantized(name: str, tensor: torch.Tensor) -> bool:
    """What FP8 releases quantize: the linear layers, not embeddings, norms, the LM head or the router."""
    skip = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight")
    return tensor.dim() == 2 and name.endswith(".weight") and not any(part in name for part in skip)


@pytest.fixture(scope="module", params=list(FAMILIES))
def fp8_pair(request, tmp_path_factory):
    """(transformers on the decoded weights, an FP8 checkpoint of the same model)."""
    config_class, config = FAMILIES[request.param]
    original = tmp_path_factory.mktemp(request.param)
    hf_model(config_class, **config).save_pretrained(original)  # the Hub's per-expert names
    state = load_file(str(original / "model.safetensors"))
    fp8, decoded = {}, {}
    for name, tensor in state.items():
        if quantized(name, tensor):
            fp8[name], fp8[name + "_scale_inv"] = quantize_fp8(tensor, BLOCK)
            decoded[name] = dequantize_fp8_blocks(fp8[name], fp8[name + "_scale_inv"], (BLOCK, BLOCK))
        else:
            fp8[name] = decoded[name] = tensor
    save_file(decoded, str(original / "model.safetensors"), metadata={"format": "pt"})
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp(request.param + "-fp8")
    save_file(fp8, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config_json = json.loads((original / "config.json").read_text())
    config_json["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK, BLOCK],
    }
    (folder / "config.json").write_text(json.dumps(config_json))
    return reference, folder


def test_fp8_checkpoint_matches_transformers_on_the_decoded_weights(fp8_pair):
    reference, folder = fp8_pair
    engine = localmoe.load(str(folder), device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference(ids).logits
        greedy = reference.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = engine.model(ids, engine.model.new_cache(1, 20), all_logits=True)
    assert (got - expected).abs().max().item() < 1e-4  # float32: the same weights, summed in another order
    assert list(engine.generate_ids(ids[0].tolist(), 12)) == greedy[0, 20:].tolist()


def test_experts_stay_fp8_from_disk_to_slot(fp8_pair):
    _, folder = fp8_pair
    ids = list(range(3, 23))
    resident = localmoe.load(str(folder), device="cpu", dtype=torch.float32)
    options = RuntimeOptions(expert_slots=4, miss_policy="copy", prefetch=0)
    offloaded = localmoe.load(str(folder), device="cpu", dtype=torch.float32, options=options)
    store = offloaded.experts.cache.store
    assert isinstance(store.layout, Fp8Layout) and isinstance(resident.experts.layout, Fp8Layout)
    block = next(iter(store.source.blocks.values()))
    weights = 3 * block.hidden_size * block.intermediate_size
    assert weights <= store.expert_bytes < weights + weights // 8  # a byte per weight and its block scales
    assert list(offloaded.generate_ids(ids, 8)) == list(resident.generate_ids(ids, 8))
    total = offloaded.experts.cache.totals()
    assert total.misses > 0 and total.bytes_copied == total.misses * store.expert_bytes


def test_fp8_without_a_block_size_is_refused(fp8_pair, tmp_path):
    _, folder = fp8_pair
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(folder / "model.safetensors", broken)  # a symlink would lead outside the folder: refused
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]["weight_block_size"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(localmoe.LocalMoEError, match="FP8 without a .rows, columns. weight_block_size"):
        localmoe.load(str(broken), device="cpu")


@pytest.mark.parametrize("tokens", [1, 24])
def test_triton_kernels_decode_fp8_in_registers(tokens):
    triton_experts = pytest.importorskip("localmoe.kernels.triton_experts")
    g = torch.Generator().manual_seed(tokens)
    slots_count, hidden, inter = 5, 32, 24

    def fp8(rows: int, columns: int) -> Fp8Weights:
        bits = torch.randn(slots_count, rows, columns, generator=g).to(torch.float8_e4m3fn).view(torch.uint8)
        return Fp8Weights(
            bits, torch.rand(slots_count, rows // BLOCK, columns // BLOCK, generator=g) / 8, BLOCK, torch.float32
        )

    x = torch.randn(tokens, hidden, generator=g)
    gate_up, down = fp8(2 * inter, hidden), fp8(hidden, inter)
    slots = torch.randint(-1, slots_count, (tokens, 2), generator=g)
    expected, got = torch.zeros(tokens * 2, hidden), torch.zeros(tokens * 2, hidden)
    expert_pair_outputs(expected, x, gate_up, down, slots, GatedActivation())
    triton_experts.triton_pair_outputs(got, x, gate_up, down, slots, GatedActivation())
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
