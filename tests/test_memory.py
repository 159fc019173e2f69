"""The memory plan: sizes, the slot count a budget buys, where the experts' host copy goes, and the
one-line error when a budget cannot work."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from conftest import MIXTRAL, hf_model, save_hf

from localmoe.cli import main
from localmoe.errors import LocalMoEError
from localmoe.options import parse_size
from localmoe.runtime import memory
from localmoe.runtime.memory import Footprint, Speculating, format_bytes, format_rate, plan_memory

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
    # with prefill chunks of 64 tokens, the smallest the plan tries to make room
    needed = MIXTRAL_8X7B.resident_bytes + 4096 * (128 + 0) * 1024 + 64 * 400 * 1024 + 2 * 336 * MiB
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
    assert code == 0 and "--expert-slots 5 " in narrow and "host RAM (pinned)" in narrow
    assert "prefill in chunks of 64 tokens, not 256" in narrow  # the prefill attention made room for a slot
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


# Qwen3-30B-A3B's attention: 32 query heads of 128 (keys and values 256 wide per head)
QWEN3_30B = replace(
    MIXTRAL_8X7B, expert_bytes=9 * MiB, moe_layers=48, experts_per_layer=128, top_k=8, attention_heads=32,
    attention_head_width=256,
)  # fmt: skip


def test_the_workspace_counts_the_prefill_attention():
    """SDPA's math kernel (grouped-query heads with a mask, on CUDA) keeps three float32 [heads, chunk,
    context] score tensors and every head's keys and values: about 0.9 GiB at a 4K context."""
    plan = plan_memory(QWEN3_30B, CUDA, vram_budget=24 * GiB, host_budget=128 * GiB)
    attention = 4 * 32 * (3 * 512 * 4096 + 256 * 4096)
    assert plan.workspace_bytes == 512 * 400 * 1024 + attention and 0.85 * GiB < attention < 0.9 * GiB
    assert "workspace (512-token prefill chunks)" in plan.describe()


def test_the_prefill_chunk_shrinks_where_its_attention_would_crowd_out_the_experts():
    fixed = QWEN3_30B.resident_bytes + 4096 * QWEN3_30B.kv_bytes_per_token + 8 * QWEN3_30B.expert_bytes
    room = fixed + QWEN3_30B.activation_bytes_per_token * 512 + QWEN3_30B.attention_bytes(128, 4096)
    plan = plan_memory(QWEN3_30B, CUDA, vram_budget=room, host_budget=128 * GiB)
    assert plan.prefill_chunk == 128 and plan.slots >= 8
    assert "prefill in chunks of 128 tokens, not 512" in plan.describe()
    assert plan_memory(QWEN3_30B, CUDA, vram_budget=24 * GiB).prefill_chunk == 512  # room enough: as asked


def test_a_budget_above_the_free_memory_is_lowered_to_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(memory, "_free_device_memory", lambda device: 10 * GiB)
    plan = plan_memory(MIXTRAL_8X7B, CUDA, vram_budget=12 * GiB, host_budget=128 * GiB)
    assert plan.device_budget == 10 * GiB and plan.device_bytes <= 10 * GiB
    notice = [line for line in plan.describe().splitlines() if line.startswith("the device budget of 12.00 GiB")]
    assert notice == [
        "the device budget of 12.00 GiB is more than the 10.00 GiB free on cuda (less a headroom): planning for that"
    ]
    assert plan_memory(MIXTRAL_8X7B, CUDA, vram_budget=8 * GiB, host_budget=128 * GiB).notices == ()


def test_a_pinned_store_leaves_a_margin_of_ram(monkeypatch):
    """84 GiB of Mixtral experts: pinned when the RAM available holds them with the margin to spare, else
    read through mmap; the plan says what the margin is."""
    total = 128 * GiB
    for available, store in ((100 * GiB, "pinned"), (90 * GiB, "mmap")):
        monkeypatch.setattr(
            memory.psutil, "virtual_memory", lambda a=available: SimpleNamespace(available=a, total=total)
        )
        plan = plan_memory(MIXTRAL_8X7B, CUDA, vram_budget=12 * GiB)
        assert plan.host_margin == total // 10 and plan.host_budget == available - total // 10
        assert plan.store == store
        assert f"less {format_bytes(total // 10)} kept for the OS and the load" in plan.describe()
    assert memory.host_ram_margin() >= 2 * GiB


def test_the_floor_reads_one_row_of_an_embedding_table():
    tables = replace(MIXTRAL_8X7B, lookup_bytes=32000 * 4096 * 2, lookup_row_bytes=4096 * 2)
    saved = MIXTRAL_8X7B.read_per_token - tables.read_per_token
    assert saved == 32000 * 4096 * 2 - 4096 * 2


def test_host_tables_take_host_memory_never_the_device():
    """40 GiB of lookup tables beside Mixtral's 84 GiB of experts: no device byte, whatever their home; in RAM
    when the host budget holds them after the experts' pinned copy, else mapped from the checkpoint."""
    tables = replace(MIXTRAL_8X7B, host_table_bytes=40 * GiB)
    for host, store, home in ((256 * GiB, "pinned", "ram"), (100 * GiB, "pinned", "mmap"), (64 * GiB, "mmap", "ram")):
        plan = plan_memory(tables, CUDA, vram_budget=12 * GiB, host_budget=host)
        without = plan_memory(MIXTRAL_8X7B, CUDA, vram_budget=12 * GiB, host_budget=host)
        assert (plan.store, plan.tables) == (store, home) and without.tables is None
        assert (plan.slots, plan.device_bytes) == (without.slots, without.device_bytes)
        where = "host RAM" if home == "ram" else "checkpoint files (mmap)"
        assert any(line.startswith("lookup tables") and where in line for line in plan.describe().splitlines())
    # on the CPU the device is the host: the tables come after everything the plan puts there
    cpu = torch.device("cpu")
    assert plan_memory(tables, cpu, vram_budget=12 * GiB, host_budget=100 * GiB).tables == "mmap"
    assert plan_memory(tables, cpu, vram_budget=12 * GiB, host_budget=200 * GiB).tables == "ram"


# Qwen3-Next-like recurrent states, DeepSeek-V4-like compressors, a 152K-token vocabulary, 2048-wide hidden
# states (bf16)
RECURRENT = replace(
    QWEN3_30B, recurrent_state_bytes=36 * 2 * MiB, pending_state_bytes=3 * MiB, trail_bytes_per_token=MiB,
    logits_bytes_per_token=152064 * 2, hidden_bytes_per_token=2048 * 2,
)  # fmt: skip


def test_speculation_is_counted_where_it_is_on_and_only_there():
    """A check keeps the recurrent states after each of its positions and the compressors' projections of its
    tokens and of those pending before it; MTP drafts keep the prompt's hidden states and compute the
    prefill's logits at every position."""
    budget = dict(vram_budget=24 * GiB, host_budget=128 * GiB)
    off = plan_memory(RECURRENT, CUDA, **budget)
    lookup = plan_memory(RECURRENT, CUDA, **budget, speculating=Speculating(4))
    mtp = plan_memory(RECURRENT, CUDA, **budget, speculating=Speculating(4, mtp=True))
    assert off.speculation_bytes == 0 and "speculative decoding" not in off.describe()
    assert lookup.speculation_bytes == 5 * 73 * MiB + 3 * MiB  # a check of 5 tokens needs less than a prefill chunk
    assert mtp.speculation_bytes == lookup.speculation_bytes + 4096 * 2048 * 2 + 512 * 152064 * 2
    for plan in (lookup, mtp):
        assert plan.device_bytes == off.device_bytes - off.pool_bytes + plan.speculation_bytes + plan.pool_bytes
        assert plan.slots < off.slots and plan.device_bytes <= 24 * GiB
        assert f"speculative decoding ({'MTP' if plan is mtp else 'lookup'}, 4-token drafts" in plan.describe()
    # just enough for one layer's experts without speculation (at the smallest prefill chunk): too small with it
    small = plan_memory(RECURRENT, CUDA, **budget, prefill_chunk=64)
    fixed = small.device_bytes - small.pool_bytes + RECURRENT.top_k * RECURRENT.expert_bytes
    plan_memory(RECURRENT, CUDA, vram_budget=fixed, host_budget=128 * GiB, prefill_chunk=64)
    with pytest.raises(LocalMoEError, match="too small.*speculative decoding"):
        plan_memory(
            RECURRENT, CUDA, vram_budget=fixed, host_budget=128 * GiB, prefill_chunk=64, speculating=Speculating(4)
        )


def test_a_check_longer_than_the_prefill_chunk_counts_its_activations():
    """64 drafts and the chosen token against a 64-token prefill chunk: one token's activations and attention
    more, and the logits of all 65."""
    plan = plan_memory(RECURRENT, CUDA, vram_budget=24 * GiB, host_budget=128 * GiB, prefill_chunk=64)
    check = plan_memory(
        RECURRENT, CUDA, vram_budget=24 * GiB, host_budget=128 * GiB, prefill_chunk=64, speculating=Speculating(64)
    )
    more = (
        RECURRENT.activation_bytes_per_token + RECURRENT.attention_bytes(65, 4096) - RECURRENT.attention_bytes(64, 4096)
    )
    assert check.speculation_bytes == 65 * 73 * MiB + 3 * MiB + more + 65 * RECURRENT.logits_bytes_per_token
    assert plan.speculation_bytes == 0
