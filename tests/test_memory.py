"""The memory plan: sizes, the slot count a budget buys, where the experts' host copy goes, and the
one-line error when a budget cannot work."""

from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from conftest import MIXTRAL, hf_model, save_hf

from localmoe.cli import main
from localmoe.errors import LocalMoEError
from localmoe.options import parse_size
from localmoe.runtime.memory import Footprint, format_bytes, format_rate, plan_memory

MiB, GiB = 2**20, 2**30
# Mixtral-8x7B in bf16, roughly: 1.6 GB of non-expert weights, 256 experts of 352 MB, top-2.
MIXTRAL_8X7B = Footprint(
    resident_bytes=1_600 * MiB,
    expert_bytes=336 * MiB,
    moe_layers=32,
    experts_per_layer=8,
    top_k=2,
    kv_bytes_per_token=128 * 1024,
    activation_bytes_per_token=400 * 1024,
    max_positions=32768,
)
CUDA = torch.device("cuda")


@pytest.mark.parametrize(
    "text,expected",
    [("12GiB", 12 * GiB), ("512MiB", 512 * MiB), ("1.5G", int(1.5 * GiB)), ("24GB", 24 * 10**9), ("4096B", 4096)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_a_slow_rate_is_not_shown_as_zero():
    """A calibration that measured 24.5 MB/s once read "0.0 GB/s" in every summary line."""
    assert [format_rate(r) for r in (24.5e6, 13.52e9, 850e3, 12)] == ["24.5 MB/s", "13.5 GB/s", "850 kB/s", "12 B/s"]


def test_parse_size_rejects_nonsense():
    with pytest.raises(LocalMoEError, match="cannot read the size 'lots'"):
        parse_size("lots")


def test_a_size_without_a_unit_is_refused():
    """`--vram-budget 12` meant as 12 GiB would plan for 12 bytes: refused, with the spellings that work."""
    with pytest.raises(LocalMoEError, match="'12' has no unit: write 12GiB, 12GB or, in bytes, 12B"):
        parse_size("12")
    result = CliRunner().invoke(main, ["plan", "no-such-model", "--vram-budget", "12"])
    assert result.exit_code == 2 and "has no unit" in result.stderr


def test_budget_buys_slots():
    small = plan_memory(MIXTRAL_8X7B, CUDA, vram_budget=12 * GiB, host_budget=128 * GiB)
    large = plan_memory(MIXTRAL_8X7B, CUDA, vram_budget=24 * GiB, host_budget=128 * GiB)
    assert 2 <= small.slots < large.slots < MIXTRAL_8X7B.total_experts
    assert small.device_bytes <= 12 * GiB and large.device_bytes <= 24 * GiB
    assert small.store == "pinned"  # 84 GiB of experts fit the 128 GiB host budget


def test_short_host_ram_reads_experts_through_mmap():
    plan = plan_memory(MIXTRAL_8X7B, CUDA, vram_budget=12 * GiB, host_budget=32 * GiB)
    assert plan.store == "mmap"


def test_everything_fits():
    plan = plan_memory(MIXTRAL_8X7B, CUDA, vram_budget=200 * GiB, host_budget=1 * GiB)
    assert plan.all_resident and plan.store == "none"


def test_budget_too_small_says_what_is_needed():
    with pytest.raises(LocalMoEError) as info:
        plan_memory(MIXTRAL_8X7B, CUDA, vram_budget=2 * GiB, host_budget=128 * GiB)
    message = str(info.value)
    needed = MIXTRAL_8X7B.resident_bytes + 4096 * (128 + 0) * 1024 + 512 * 400 * 1024 + 2 * 336 * MiB
    assert "too small" in message and format_bytes(needed) in message and "\n" not in message


def test_expert_slots_override_the_plan_within_the_budget():
    plan = plan_memory(MIXTRAL_8X7B, CUDA, vram_budget=24 * GiB, host_budget=128 * GiB, expert_slots=10)
    assert plan.slots == 10
    with pytest.raises(LocalMoEError, match="too small"):
        plan_memory(MIXTRAL_8X7B, CUDA, vram_budget=12 * GiB, host_budget=128 * GiB, expert_slots=60)


def test_context_beyond_the_model_is_refused_and_the_default_fits_it():
    """One rule: a context asked for beyond the model's positions is refused; left out, the default
    context is lowered to the model's."""
    with pytest.raises(LocalMoEError, match="context 1000000 is out of range: this model has 32768 positions"):
        plan_memory(MIXTRAL_8X7B, CUDA, vram_budget=24 * GiB, context=10**6)
    assert plan_memory(MIXTRAL_8X7B, CUDA, vram_budget=24 * GiB).context == 4096
    short = replace(MIXTRAL_8X7B, max_positions=1000)
    assert plan_memory(short, CUDA, vram_budget=24 * GiB).context == 1000


def test_plan_command_without_a_gpu(tmp_path):
    folder = save_hf(hf_model("MixtralConfig", **MIXTRAL), tmp_path / "m", "sharded")

    def plan(*flags):
        result = CliRunner().invoke(main, ["plan", str(folder), *flags])
        return result.exit_code, result.stdout + result.stderr

    # float32: 1.7 MiB of weights, KV cache and workspace, then 72 KiB per expert
    code, wide = plan("--device", "cuda", "--vram-budget", "4MiB", "--host-budget", "1GiB")
    assert code == 0 and "--expert-slots 15" in wide and "host RAM (pinned)" not in wide
    code, narrow = plan("--device", "cuda", "--vram-budget", "2MiB", "--host-budget", "1GiB")
    assert code == 0 and "--expert-slots 4 " in narrow and "host RAM (pinned)" in narrow
    code, forced = plan("--device", "cuda", "--vram-budget", "4MiB", "--expert-slots", "4", "--host-budget", "1GiB")
    assert code == 0 and "expert slots (4 of 15 experts)" in forced
    code, error = plan("--device", "cuda", "--vram-budget", "100KiB")
    assert code == 2 and "too small" in error and len(error.strip().splitlines()) == 1
    code, error = plan("--device", "cuda")
    assert code == 2 and "give --vram-budget" in error


def test_disk_speed_estimate():
    from localmoe.runtime.memory import MemoryPlan

    fp = Footprint(
        resident_bytes=0,
        expert_bytes=100 * 2**20,
        moe_layers=10,
        experts_per_layer=8,
        top_k=2,
        active_experts_per_token=20,
        kv_bytes_per_token=0,
        activation_bytes_per_token=0,
        max_positions=4096,
    )
    plan = MemoryPlan("cuda", fp, 4096, 512, slots=20, store="mmap", device_budget=0, host_budget=0)
    # 20 experts a token, a quarter of them in slots: 15 reads of 100 MiB at 1.5 GiB/s -> 1 token/s
    assert abs(plan.disk_tokens_per_s(15 * 100 * 2**20) - 1.0) < 1e-9
    assert "at most about 1 decode tokens/s" in plan.describe(15 * 100 * 2**20)
