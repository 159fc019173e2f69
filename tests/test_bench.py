"""`localmoe tune` and `localmoe bench` on a tiny model, and the floor arithmetic."""

import shlex

import pytest
import torch
from click.testing import CliRunner

from localmoe.bench import decode_floor
from localmoe.cli import main
from localmoe.engine import RuntimeOptions, plan_for
from localmoe.options import parse_size
from localmoe.runtime.memory import Footprint

BUDGET = "2MiB"  # the tiny Mixtral in float32: room for 4 of its 15 experts


def test_tune_times_each_setting_several_times_and_prints_a_command_that_runs(tiny_mixtral):
    runner = CliRunner()
    tuned = runner.invoke(
        main, ["tune", str(tiny_mixtral), "--vram-budget", BUDGET, "--dtype", "float32", "--tokens", "4"]
    )
    assert tuned.exit_code == 0, tuned.output
    tries = [line for line in tuned.stdout.splitlines() if "tok/s" in line and "--policy" in line]
    assert len(tries) >= 5  # policy, prefetch depth, margin, pinning and the miss policy were each tried
    for line in tries:  # each with the speeds of its runs (3 by default, more where tried again)
        assert len(line.split("(")[1].split(")")[0].split(", ")) >= 3
    assert {"copy", "cpu", "auto", "bypass"} <= {line.split("--miss-policy ")[1].split()[0] for line in tries}
    assert {"score", "lfu", "lru"} <= {line.split("--policy ")[1].split()[0] for line in tries}
    planned = int(tuned.stdout.split(" expert slots:")[0].split()[-1])
    pools = {int(line.split(" slots ")[0].split()[-1]) for line in tries}
    assert min(pools) < planned == max(pools)  # smaller pools tried by resizing, then back
    words = shlex.split(tuned.stdout.strip().splitlines()[-1].removeprefix("fastest: "))
    assert words[:2] == ["localmoe", "generate"]
    pasted = runner.invoke(main, words[1:])  # as pasted: nothing to add
    assert pasted.exit_code == 0, pasted.output
    budget = parse_size(words[words.index("--vram-budget") + 1])
    assert budget <= parse_size(BUDGET)
    options = RuntimeOptions(vram_budget=budget, expert_slots=int(words[words.index("--expert-slots") + 1]))
    assert plan_for(str(tiny_mixtral), device="cpu", dtype=torch.float32, options=options).device_bytes <= budget


def test_tune_says_when_there_is_nothing_to_tune(tiny_mixtral):
    result = CliRunner().invoke(main, ["tune", str(tiny_mixtral), "--tokens", "3"])
    assert result.exit_code == 0 and "every expert fits" in result.stdout


def test_bench_reports_the_floor(tiny_mixtral):
    result = CliRunner().invoke(main, ["bench", str(tiny_mixtral), "--vram-budget", BUDGET, "--tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "decode tok/s" in result.stdout and "floor:" in result.stdout and "|" not in result.stdout
    markdown = CliRunner().invoke(
        main, ["bench", str(tiny_mixtral), "--vram-budget", BUDGET, "--tokens", "4", "--markdown", "--stats"]
    )
    assert markdown.exit_code == 0 and markdown.stdout.startswith("| run | misses |")
    assert "expert slots" in markdown.stderr  # --stats: the plan and the counters


FOOTPRINT = Footprint(
    resident_bytes=1000,
    expert_bytes=100,
    moe_layers=4,
    experts_per_layer=8,
    top_k=2,
    kv_bytes_per_token=0,
    activation_bytes_per_token=0,
    max_positions=10,
)


def test_floor_on_a_gpu_is_set_by_the_slower_of_bus_and_memory():
    bandwidth = {"host_to_device": 100.0, "device_memory": 1000.0}
    # reads 1000 + 4 x 2 x 100 = 1800 bytes: 1.8 s at 1000 B/s; copies 300 bytes: 3 s at 100 B/s
    floor = decode_floor(FOOTPRINT, bandwidth, copied_per_token=300)
    assert floor["floor_s"] == pytest.approx(3.0) and floor["bound"] == "host-to-device copies"
    assert decode_floor(FOOTPRINT, bandwidth, copied_per_token=0)["floor_s"] == pytest.approx(1.8)


def test_floor_on_the_cpu_counts_copies_as_ram_traffic():
    floor = decode_floor(FOOTPRINT, {"ram": 100.0}, copied_per_token=100)
    assert floor["floor_s"] == pytest.approx((1800 + 200) / 100)
