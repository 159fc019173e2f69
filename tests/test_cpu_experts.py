"""The miss policy's choice, given bandwidths, and its calibration cache."""

import json

import pytest
import torch
from conftest import MIXTRAL, hf_model, save_hf

import localmoe
from localmoe.engine import RuntimeOptions
from localmoe.runtime import cpu_experts
from localmoe.runtime.cpu_experts import Bandwidths, experts_for_cpu

MB = 10**6


def test_one_token_goes_where_it_is_done_first():
    # copying an expert takes 10 ms, one token through the CPU 20 ms
    rates = Bandwidths(copy=100 * MB / 0.010, cpu=100 * MB / 0.020)
    assert experts_for_cpu({1: 1}, 100 * MB, rates) == set()
    assert experts_for_cpu({1: 1, 2: 1}, 100 * MB, rates) == set()  # 20 ms either way: copies win ties
    assert experts_for_cpu({1: 1, 2: 1, 3: 1}, 100 * MB, rates) == {3}  # the third copy would end at 30 ms
    assert experts_for_cpu({1: 1, 2: 1, 3: 1, 4: 1}, 100 * MB, rates) == {3}


def test_tokens_make_the_cpu_dearer():
    # one token through the CPU takes 5 ms, a copy 10 ms
    rates = Bandwidths(copy=100 * MB / 0.010, cpu=100 * MB / 0.005)
    assert experts_for_cpu({7: 1}, 100 * MB, rates) == {7}
    assert experts_for_cpu({7: 3}, 100 * MB, rates) == set()
    # the expert with most tokens is placed first: it takes the copy, the single-token one the CPU
    assert experts_for_cpu({7: 1, 8: 5}, 100 * MB, rates) == {7}
    # a prefill: many tokens per expert keeps copying
    assert experts_for_cpu({e: 40 for e in range(8)}, 100 * MB, rates) == set()


def test_nothing_missed_nothing_chosen():
    assert experts_for_cpu({}, 100 * MB, Bandwidths(1.0, 1e12)) == set()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(save_hf(hf_model("MixtralConfig", **MIXTRAL), tmp_path_factory.mktemp("mixtral"), "sharded"))


def load(path: str, **options) -> localmoe.Engine:
    options = {"expert_slots": 3, "miss_policy": "auto", **options}
    return localmoe.load(path, device="cpu", dtype=torch.float32, options=RuntimeOptions(**options))


def test_calibration_is_measured_once_per_machine(checkpoint, localmoe_cache, monkeypatch):
    (localmoe_cache / cpu_experts.CALIBRATION_FILE).unlink(missing_ok=True)
    measured, checked = [], []
    real = cpu_experts._measure

    def measure(*args, samples=3):
        (measured if samples == 3 else checked).append(1)
        return real(*args, samples=samples)

    monkeypatch.setattr(cpu_experts, "_measure", measure)
    monkeypatch.setattr(cpu_experts, "FAR", 1e9)  # this test's checks never differ enough
    first = load(checkpoint).bandwidths
    assert len(measured) == 1 and not checked and first.copy > 0 and first.cpu > 0
    assert load(checkpoint).bandwidths == first and len(measured) == 1 and len(checked) == 1
    assert load(checkpoint, copy_bandwidth=5, cpu_bandwidth=7).bandwidths == Bandwidths(5e9, 7e9)  # GB/s
    assert load(checkpoint, cpu_bandwidth=7).bandwidths == Bandwidths(first.copy, 7e9)
    assert len(measured) == 1
    # a damaged file is measured again, not trusted
    path = localmoe_cache / cpu_experts.CALIBRATION_FILE
    key = next(iter(json.loads(path.read_text())))
    path.write_text(json.dumps({key: {"copy": -1, "cpu": "fast"}}))
    load(checkpoint)
    assert len(measured) == 2 and json.loads(path.read_text())[key]["copy"] > 0
    path.write_text("{not json")
    load(checkpoint)
    assert len(measured) == 3


def test_a_calibration_far_from_a_start_check_is_measured_again(checkpoint, localmoe_cache, monkeypatch, capsys):
    """One measured while the machine was busy (here: a thousand times too slow) is not kept for good."""
    load(checkpoint)
    path = localmoe_cache / cpu_experts.CALIBRATION_FILE
    known = json.loads(path.read_text())
    key = next(iter(known))
    near = {**known[key]}
    slow = {"copy": known[key]["copy"] / 1000, "cpu": known[key]["cpu"] / 1000}
    path.write_text(json.dumps({**known, key: slow}))
    checks = [Bandwidths(**slow), Bandwidths(**near)]  # what the start's check finds, then the measurement
    monkeypatch.setattr(cpu_experts, "_measure", lambda *args, samples=3: checks.pop(0))
    assert load(checkpoint).bandwidths == Bandwidths(**slow)  # near enough to its check: kept
    assert json.loads(path.read_text())[key] == slow
    checks = [Bandwidths(**near), Bandwidths(**near)]
    monkeypatch.setattr(cpu_experts, "_measure", lambda *args, samples=3: checks.pop(0))
    assert load(checkpoint).bandwidths == Bandwidths(**near)
    assert json.loads(path.read_text())[key] == near and not checks
    assert "far from those measured now: measuring again" in capsys.readouterr().err


def test_copy_and_cpu_policies_measure_nothing(checkpoint, monkeypatch):
    monkeypatch.setattr(cpu_experts, "_measure", lambda *args: pytest.fail("measured"))
    for miss in ("copy", "cpu"):
        assert load(checkpoint, miss_policy=miss).bandwidths is None


def test_the_report_counts_the_cpu(checkpoint):
    engine = load(checkpoint, miss_policy="cpu")
    list(engine.generate_ids([1, 2, 3], 4))
    report = engine.cache_report()
    assert "on cpu" in report and "computed on the CPU from the host store:" in report
    assert "misses: cpu" in engine.summary()
    assert "misses: auto (copy 1 GB/s, CPU 2 GB/s)" in load(checkpoint, copy_bandwidth=1, cpu_bandwidth=2).summary()


def test_an_unknown_policy_is_refused(checkpoint):
    with pytest.raises(localmoe.LocalMoEError, match="unknown miss_policy 'gpu'"):
        load(checkpoint, miss_policy="gpu")
