"""Quantized experts: the packing round trip, the runtime on quantized rows, and the on-disk cache."""

import errno
import io
import json
import subprocess
import sys
import threading

import pytest
import torch
from conftest import MIXTRAL, NEMOTRON_H, QWEN3_MOE, hf_model, save_hf
from hypothesis import given, settings
from hypothesis import strategies as st

import localmoe
from localmoe import files
from localmoe.checkpoint import Checkpoint
from localmoe.engine import RuntimeOptions, plan_for
from localmoe.files import HOST
from localmoe.kernels.quantized import QuantSpec, dequantize, quantize
from localmoe.runtime import expert_store
from localmoe.runtime.quantized_cache import QuantizedLayers, cache_folder

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
    folders = [f for f in folders if f.is_dir()]  # beside each folder: its lock file
    assert len(folders) == 1
    return folders[0]


def settings_folder(checkpoint: str, bits: int, group: int):
    return cache_folder(Checkpoint.open(checkpoint), f"bits={bits} group={group} dtype={torch.float32}")


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
    folders = [f for f in (localmoe_cache / "quantized").iterdir() if f.name.startswith("other") and f.is_dir()]
    assert len(folders) == 3


@pytest.mark.parametrize("manifest", ["[]", '{"layers": []}', '{"layers": {"0": 5}}', "{"])
def test_a_manifest_of_the_wrong_shape_is_rebuilt_with_a_notice(checkpoint, localmoe_cache, manifest, capsys):
    tokens, _ = run(load(checkpoint, expert_bits=8, expert_group_size=8))
    folder = settings_folder(checkpoint, 8, 8)
    (folder / "manifest.json").write_text(manifest)
    capsys.readouterr()
    assert run(load(checkpoint, expert_bits=8, expert_group_size=8))[0] == tokens
    assert "the manifest of the quantized experts" in capsys.readouterr().err
    assert sorted(json.loads((folder / "manifest.json").read_text())["layers"]) == ["0", "1", "2", "3"]


def test_runs_that_meet_quantize_each_layer_once(tmp_path):
    """A run that finds a layer missing while another builds it waits for the other's lock, then reads
    what the other built."""
    folder, building, waiting, first = tmp_path / "quantized", threading.Event(), threading.Event(), []

    def build(rows):
        building.set()
        assert waiting.wait(timeout=120)  # the second run asks for the layer meanwhile
        rows.copy_(torch.arange(rows.numel(), dtype=torch.uint8).view(rows.shape))

    def first_run():
        first.append(QuantizedLayers(folder).rows(0, (3, 8), allocate, build, mapped=False))

    thread = threading.Thread(target=first_run)
    thread.start()
    assert building.wait(timeout=120)
    second = QuantizedLayers(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "stderr", io.StringIO())
        patch.setattr(second, "_waiting", lambda message: waiting.set() or QuantizedLayers._waiting(second, message))
        rows = second.rows(0, (3, 8), allocate, lambda rows: pytest.fail("quantized twice"), mapped=True)
        QuantizedLayers._waiting(second, "localmoe: waiting for another localmoe run, for the next layer")
        told = sys.stderr.getvalue()  # once for the run, not once per layer
    thread.join(timeout=120)
    assert torch.equal(rows, first[0]) and second.built == 0
    assert told.count("waiting for another localmoe run") == 1 and second.waited


def allocate(shape):
    return torch.empty(shape, dtype=torch.uint8)


def test_a_full_disk_costs_the_cache_and_nothing_else(checkpoint, localmoe_cache, monkeypatch, capsys):
    tokens, _ = run(load(checkpoint))

    def full_disk(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    settings = {"expert_bits": 4, "expert_group_size": 8}
    resident, _ = run(load(checkpoint, **settings))
    assert "could not keep the quantized experts" in capsys.readouterr().err
    mapped, _ = run(load(checkpoint, **settings, expert_slots=3, host_budget=1, miss_policy="copy"))
    assert mapped == resident
    folder = settings_folder(checkpoint, 4, 8)
    assert not list(folder.parent.rglob("*.tmp")) and not (folder / "manifest.json").exists()


def test_a_start_sweeps_what_killed_runs_left(checkpoint, localmoe_cache):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = localmoe_cache / "quantized" / "some-folder" / f"layer-3.bin.{HOST}.{int(dead.stdout)}.00c0ffee.tmp"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(bytes(1000))
    load(checkpoint)
    assert not orphan.exists()


@pytest.mark.parametrize(
    "widths, default",
    [((4096, 14336), 64), ((64, 48), 16), ((48, 40), 8), ((30, 50), 10)],
    ids=["mixtral", "tiny", "issue 24", "not a power of two"],
)
def test_the_default_group_size_is_the_largest_that_divides_every_width(widths, default):
    assert QuantSpec.fitting(4, None, *widths).group == default
    assert QuantSpec.fitting(8, 2, *widths).group == 2  # as asked, where it fits
    if default < 64:
        with pytest.raises(localmoe.LocalMoEError, match=f"must be even and divide .*: try {default}$"):
            QuantSpec.fitting(4, default * 2, *widths)


def test_widths_without_an_even_divisor_cannot_be_quantized():
    with pytest.raises(localmoe.LocalMoEError, match=r"widths \(63, 45\) have no even common divisor"):
        QuantSpec.fitting(4, None, 63, 45)
    with pytest.raises(localmoe.LocalMoEError, match="none does, so they cannot be quantized"):
        QuantSpec.fitting(4, 2, 63, 45)


def test_a_start_with_the_default_group_size_uses_the_fitting_one(checkpoint):
    engine = localmoe.load(checkpoint, device="cpu", dtype=torch.float32, options=RuntimeOptions(expert_bits=8))
    assert engine.experts.layout.spec == QuantSpec(8, 16)  # widths 64 and 48: 64 and 32 do not divide 48
