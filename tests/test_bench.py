"""`localmoe tune` and `localmoe bench` on a tiny model, and the floor arithmetic."""

import json
import shlex

import pytest
import torch
from click.testing import CliRunner

from localmoe.bench import decode_floor, write_benchmarks
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


def test_the_floor_reads_one_embedding_row_a_token(tiny_mixtral):
    """The tiny Mixtral's untied embedding table (258 x 64 in float32) counts one row per token; its LM
    head, the same size, is read whole."""
    footprint = plan_for(str(tiny_mixtral), device="cpu", dtype=torch.float32).footprint
    assert (footprint.lookup_bytes, footprint.lookup_row_bytes) == (258 * 64 * 4, 64 * 4)
    bandwidth = {"host_to_device": 1.0, "device_memory": 1.0}
    read = decode_floor(footprint, bandwidth, copied_per_token=0)["read_bytes_per_token"]
    assert (
        read
        == footprint.resident_bytes - 257 * 64 * 4 + footprint.moe_layers * footprint.top_k * footprint.expert_bytes
    )


def test_cpu_results_are_written_as_multiples_of_llama_cpp_and_of_the_floor(tmp_path):
    """scripts/bench_cpu.py's section: localmoe's 4-bit row set against llama.cpp's experts-only file (the
    same bytes per token), not against the file with everything quantized."""

    def row(engine, fmt, decode, floor):
        rate = {"median": decode, "min": decode - 1, "max": decode + 1, "runs": [decode]}
        return {"engine": engine, "format": fmt, "prefill": rate, "decode": rate, "read_per_token": 2**20,
                "floor_decode": floor, "floor_prefill": floor, "detail": ""}  # fmt: skip

    config = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128, "num_local_experts": 8}
    config |= {"num_experts_per_tok": 2, "num_hidden_layers": 2}
    rows = [row("llama.cpp", "4 bit", 5.0, 50.0), row("llama.cpp", "4 bit, experts only", 4.0, 40.0)]
    rows.append(row("localmoe", "4 bit", 6.0, 40.0))
    bandwidth = {"median": 1e10, "min": 1e10, "max": 1e10, "runs": [1e10]}
    result = {"date": "2026-12-02 03:00 UTC", "command": "python scripts/bench_cpu.py", "machine": {"cpu": "x"}}
    result |= {"threads": 2, "prompt_tokens": 32, "new_tokens": 16, "rounds": 1}
    result["models"] = [{"model": "mixtral", "config": config, "bandwidth": bandwidth, "rows": rows}]
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "one.json").write_text(json.dumps(result))
    write_benchmarks(tmp_path, tmp_path / "benchmarks.md")
    text = (tmp_path / "benchmarks.md").read_text()
    assert "| localmoe | 4 bit | 6.0 (5.0-7.0) | 1.50 | 15% |" in text
    assert "| llama.cpp | 4 bit, experts only | 4.0 (3.0-5.0) |  | 10% |" in text
