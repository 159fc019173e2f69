"""Quantized experts: the packing round trip, the runtime on quantized rows, and the on-disk cache."""

import json

import pytest
import torch
from conftest import MIXTRAL, NEMOTRON_H, QWEN3_MOE, hf_model, save_hf
from hypothesis import given, settings
from hypothesis import strategies as st

import localmoe
from localmoe.engine import RuntimeOptions, plan_for
from localmoe.kernels.quantized import QuantSpec, dequantize, quantize
from localmoe.runtime import expert_store

GROUP = 16  # divides the tiny models' widths (64, 96, 48)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 4),
    group=st.sampled_from([2, 8, 32]),
    bits=st.sampled_from([4, 8]),
    offset=st.floats(-2, 2),
    spread=st.floats(0, 3),
    seed=st.integers(0, 2**16),
)
def test_round_trip_is_within_half_a_step(rows, groups, group, bits, offset, spread, seed):
    w = offset + spread * torch.randn(rows, groups * group, generator=torch.Generator().manual_seed(seed))
    spec = QuantSpec(bits, group)
    q, scale, zero = quantize(w, spec)
    assert q.dtype == torch.uint8 and q.shape == (rows, groups * group * bits // 8)
    assert scale.shape == zero.shape == (rows, groups) and scale.dtype == zero.dtype == torch.float16
    back = dequantize(q, scale, zero, spec, torch.float32)
    step = scale.float().repeat_interleave(group, dim=1)
    # half a step, plus the float16 rounding of the scale: relative, and absolute where it is subnormal
    levels = 2**bits - 1
    assert ((back - w).abs() <= 0.5 * step + 2e-3 * (w.abs() + step) + levels * 2**-24).all()


def test_four_bit_packing_order():
    spec = QuantSpec(4, 2)
    w = torch.tensor([[0.0, 15.0, 7.5, 0.0]])  # one row, two groups: (0, 15) and (7.5, 0)
    q, scale, zero = quantize(w, spec)
    assert q.tolist() == [[0xF0, 0x0F]]  # the even column in the low nibble
    assert torch.equal(dequantize(q, scale, zero, spec, torch.float32), w)


def test_an_all_zero_group():
    q, scale, zero = quantize(torch.zeros(2, 8), QuantSpec(8, 8))
    assert torch.equal(dequantize(q, scale, zero, QuantSpec(8, 8), torch.float32), torch.zeros(2, 8))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(save_hf(hf_model("Qwen3MoeConfig", **QWEN3_MOE), tmp_path_factory.mktemp("qwen3"), "sharded"))


def load(path: str, **options) -> localmoe.Engine:
    options = {"expert_group_size": GROUP, **options}
    return localmoe.load(path, device="cpu", dtype=torch.float32, options=RuntimeOptions(**options))


def run(engine) -> tuple[list[int], torch.Tensor]:
    prompt = list(range(3, 27))
    cache = engine.model.new_cache(1, len(prompt))
    return list(engine.generate_ids(prompt, 8)), engine.model(torch.tensor([prompt]), cache, all_logits=True)


@pytest.mark.parametrize("bits", [8, 4])
def test_offloaded_quantized_experts_equal_resident_ones(checkpoint, bits):
    """Misses copied, computed on the CPU, and copied from the mapped cache files: the resident result."""
    tokens, logits = run(load(checkpoint, expert_bits=bits))
    for miss, options in (
        ("copy", dict(expert_slots=4)),
        ("cpu", dict(expert_slots=9)),
        ("copy", dict(expert_slots=4, host_budget=1)),
    ):
        got_tokens, got_logits = run(load(checkpoint, expert_bits=bits, miss_policy=miss, **options))
        assert got_tokens == tokens and torch.equal(got_logits, logits), (miss, options)


def test_ungated_experts_quantized(tmp_path):
    """Nemotron-H's experts (up and down only, in a latent space 32 wide): offloaded equals resident, and
    8 bits stay close to 16."""
    config = {**NEMOTRON_H, "moe_latent_size": 32}
    path = str(save_hf(hf_model("NemotronHConfig", **config), tmp_path, "sharded"))
    tokens, logits = run(load(path, expert_bits=8))
    got_tokens, got_logits = run(load(path, expert_bits=8, expert_slots=3, miss_policy="copy"))
    assert got_tokens == tokens and torch.equal(got_logits, logits)
    _, logits16 = run(load(path))
    assert (logits - logits16).abs().max().item() < 0.05 * logits16.abs().max().item()


def test_eight_bits_stay_close_to_sixteen(checkpoint):
    _, logits16 = run(load(checkpoint))
    _, logits8 = run(load(checkpoint, expert_bits=8))
    _, logits4 = run(load(checkpoint, expert_bits=4))
    error8 = (logits8 - logits16).abs().max().item()
    error4 = (logits4 - logits16).abs().max().item()
    assert error8 < 0.05 * logits16.abs().max().item() and error8 < error4


@torch.inference_mode()
def test_eight_bits_agree_on_greedy_tokens(checkpoint):
    """Given the same prefixes, the 8-bit model picks the 16-bit model's token at 99% of positions or more."""
    prompts = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(4))
    agree = 0
    engines = load(checkpoint), load(checkpoint, expert_bits=8)
    for prompt in prompts:
        picks = [e.model(prompt[None], e.model.new_cache(1, 32), all_logits=True).argmax(-1) for e in engines]
        agree += (picks[0] == picks[1]).sum().item()
    assert agree >= 0.99 * prompts.numel()


def test_copies_move_quantized_bytes_and_the_plan_fits_more_slots(checkpoint):
    engine = load(checkpoint, expert_bits=4, expert_slots=4, miss_policy="copy", prefetch=0)
    run(engine)
    cache = engine.experts.cache
    total = cache.totals()
    assert cache.store.expert_bytes == cache.store.layout.numel < engine.plan.footprint.expert_bytes * 4
    assert total.misses > 0 and total.bytes_copied == total.misses * cache.store.expert_bytes

    def plan(bits: int, budget: int):
        options = RuntimeOptions(vram_budget=budget, expert_bits=bits, expert_group_size=GROUP)
        return plan_for(checkpoint, device="cpu", dtype=torch.float32, options=options)

    everything = plan(16, 2**40)
    budget = everything.device_bytes - everything.pool_bytes + 6 * everything.footprint.expert_bytes
    slots = {bits: plan(bits, budget).slots for bits in (16, 8, 4)}
    assert slots[16] == 6 and slots[16] < slots[8] < slots[4]


def test_bad_settings_are_one_line_errors(checkpoint):
    with pytest.raises(localmoe.LocalMoEError, match="expert_group_size 20 must be even and divide"):
        load(checkpoint, expert_bits=8, expert_group_size=20)
    with pytest.raises(localmoe.LocalMoEError, match="expert_bits 3 is not supported: use 16, 8 or 4"):
        load(checkpoint, expert_bits=3)
    with pytest.raises(localmoe.LocalMoEError, match="expert_group_size 0 must be even"):
        load(checkpoint, expert_bits=4, expert_group_size=0)


def quantized_folder(localmoe_cache, checkpoint_name: str):
    folders = [f for f in (localmoe_cache / "quantized").iterdir() if f.name.startswith(checkpoint_name)]
    assert len(folders) == 1
    return folders[0]


def test_the_second_start_reads_the_cache_and_damage_is_rebuilt(tmp_path, localmoe_cache, monkeypatch, capsys):
    path = str(save_hf(hf_model("MixtralConfig", **MIXTRAL), tmp_path / "mixtral", "single"))
    tokens, logits = run(load(path, expert_bits=8))
    folder = quantized_folder(localmoe_cache, "mixtral")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["layers"]) == ["0", "1", "2"]
    assert (tmp_path / "mixtral").stat().st_mtime_ns  # the checkpoint is untouched (see test_checkpoint)

    real = expert_store.packed_layer
    monkeypatch.setattr(expert_store, "packed_layer", lambda *a: pytest.fail("quantized again"))
    got_tokens, got_logits = run(load(path, expert_bits=8))  # read back, nothing quantized
    assert got_tokens == tokens and torch.equal(got_logits, logits)
    got_tokens, _ = run(load(path, expert_bits=8, expert_slots=3, host_budget=1, miss_policy="copy"))  # mapped
    assert got_tokens == tokens
    monkeypatch.setattr(expert_store, "packed_layer", real)

    capsys.readouterr()
    layer1 = folder / "layer-1.bin"
    data = bytearray(layer1.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    layer1.write_bytes(bytes(data))
    (folder / "layer-2.bin").write_bytes((folder / "layer-2.bin").read_bytes()[:100])  # truncated
    got_tokens, got_logits = run(load(path, expert_bits=8))
    err = capsys.readouterr().err
    assert "layer 1" in err and "layer 2" in err and "damaged: rebuilding" in err and "layer 0" not in err
    assert got_tokens == tokens and torch.equal(got_logits, logits)
    assert json.loads((folder / "manifest.json").read_text()) == manifest  # the same bytes again


def test_other_settings_get_their_own_cache(tmp_path, localmoe_cache):
    path = str(save_hf(hf_model("MixtralConfig", **MIXTRAL), tmp_path / "other", "single"))
    load(path, expert_bits=8)
    load(path, expert_bits=4)
    load(path, expert_bits=8, expert_group_size=32)
    folders = [f for f in (localmoe_cache / "quantized").iterdir() if f.name.startswith("other")]
    assert len(folders) == 3
