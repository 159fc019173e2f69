"""The trace simulator: counts worked out by hand, Belady as the bound of every online policy, the trace
formats, and the same numbers as a real run for the same routing."""

import functools
import itertools
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy
import pytest
import torch
from conftest import LONGCAT_FLASH, MIXTRAL, hf_model, save_hf
from hypothesis import given, settings
from hypothesis import strategies as st

import localmoe
from localmoe.engine import RuntimeOptions
from localmoe.errors import LocalMoEError
from localmoe.simulate import Trace, load_trace, replay, static_oracle_hit_rate

A, B, C = 0, 1, 2


def one_layer(*experts: int) -> Trace:
    return Trace([[[[e]] for e in experts]], layers=[0], num_experts=3)


def test_counts_worked_out_by_hand():
    """Uses A B A C B A through 2 slots.

    LRU: A, B miss; A hits; C evicts B; B evicts A; A evicts C: 1 hit.
    LFU: A hits (A used twice); C evicts B (once); B evicts C; A hits: 2 hits.
    Belady: A hits; C evicts A (next needed at 5, B at 4); B hits; A misses: 2 hits.
    """
    trace = one_layer(A, B, A, C, B, A)
    assert [replay(trace, 2, policy).counters.hits for policy in ("lru", "lfu", "belady")] == [1, 2, 2]
    assert replay(trace, 2, "lru").counters.misses == 5
    assert replay(trace, 3, "lru").counters.hits == 3  # every expert fits: only first uses miss
    assert static_oracle_hit_rate(trace, 1) == 3 / 6  # A alone, pinned


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    layers=st.integers(1, 3),
    experts=st.integers(2, 6),
    top_k=st.integers(1, 2),
    tokens=st.integers(1, 30),
)
def test_belady_bounds_every_online_policy(data, layers, experts, top_k, tokens):
    """Must-admit Belady (one shared pool) bounds every policy that copies each miss, with quotas or
    without; Belady with bypass bounds those, every policy with bypass, and the static oracle."""
    top_k = min(top_k, experts)
    choose = st.lists(st.integers(0, experts - 1), min_size=top_k, max_size=top_k, unique=True)
    requests = [[[data.draw(choose) for _ in range(layers)] for _ in range(tokens)]]
    weigh = st.floats(0, 1, allow_nan=False)
    probabilities = [[[{e: data.draw(weigh) for e in row} for row in token] for token in requests[0]]]
    trace = Trace(requests, list(range(layers)), experts, probabilities=probabilities)
    slots = data.draw(st.integers(top_k, layers * experts))
    best = replay(trace, slots, "belady", shared=True).counters.hits
    best_bypass = replay(trace, slots, "belady", shared=True, miss="bypass").counters.hits
    assert best <= best_bypass
    # the static oracle starts with its experts in place: up to their first uses, which Belady misses
    static = static_oracle_hit_rate(trace, slots) * tokens * layers * top_k
    assert static <= best_bypass + min(slots, len(set(trace.uses()))) + 1e-9
    for policy in ("lru", "lfu", "score"):
        for shared in (True, False):
            counters = replay(trace, slots, policy, shared=shared).counters
            assert counters.hits <= best
            assert counters.hits + counters.misses == counters.uses == tokens * layers * top_k
            bypassed = replay(trace, slots, policy, shared=shared, miss="bypass").counters
            assert bypassed.hits <= best_bypass
            assert bypassed.hits + bypassed.misses + bypassed.on_cpu == tokens * layers * top_k
            assert replay(trace, slots, policy, shared=shared, miss="direct").counters.hits <= best_bypass


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    layers=st.integers(1, 2),
    experts=st.integers(2, 4),
    top_k=st.integers(1, 2),
    tokens=st.integers(1, 6),
)
def test_belady_uncached_is_the_optimum(data, layers, experts, top_k, tokens):
    """The bound for misses left uncached equals an exhaustive search: before each token's step the pool
    may be any part of what it held and what the last step used."""
    top_k = min(top_k, experts)
    choose = st.lists(st.integers(0, experts - 1), min_size=top_k, max_size=top_k, unique=True)
    trace = Trace([[[data.draw(choose) for _ in range(layers)] for _ in range(tokens)]], list(range(layers)), experts)
    slots = data.draw(st.integers(1, layers * experts))
    visits = trace.visits()
    steps = [frozenset(key for visit in visits[t * layers : (t + 1) * layers] for key in visit) for t in range(tokens)]

    @functools.cache
    def most_hits(time: int, pool: frozenset) -> int:
        if time == len(steps):
            return 0
        held = sorted(pool | steps[time])
        keep = (frozenset(c) for n in range(min(slots, len(held)) + 1) for c in itertools.combinations(held, n))
        return len(pool & steps[time]) + max(most_hits(time + 1, k) for k in keep)

    assert replay(trace, slots, "belady", shared=True, miss="bypass").counters.hits == most_hits(0, frozenset())


def test_belady_uncached_weighs_what_comes_after_a_tie():
    """At the second visit B and C are both needed next: bringing C in for A (needed later) finds 4 hits
    where keeping A finds 3; the online policies' rule keeps A (it is in use) and ties C with B."""
    trace = Trace([[[[A, B]], [[A, C]], [[B, C]], [[A, C]]]], layers=[0], num_experts=3)
    assert replay(trace, 2, "belady", shared=True, miss="bypass").counters.hits == 4
    with pytest.raises(LocalMoEError, match="shared pool"):
        replay(trace, 2, "belady", miss="bypass")


def test_belady_keeps_the_expert_needed_soonest():
    trace = one_layer(A, B, C, A, B)  # at C, A is needed again before B: B goes, then misses once more
    assert replay(trace, 2, "belady").counters.hits == 1
    assert replay(trace, 2, "belady", shared=True, miss="bypass").counters.hits == 2  # C is not worth a slot
    with pytest.raises(LocalMoEError, match="without prefetch, pinning or a profile"):
        replay(trace, 2, "belady", pin_hot=1)


def test_trace_formats_read_the_same(tmp_path):
    ids = [[[[1, 2], [0, 3]], [[2, 1], [3, 0]]], [[[0, 1], [1, 2]]]]  # requests x tokens x layers x k
    numpy.savez(tmp_path / "t.npz", expert_ids=numpy.array([ids[0]]), layers=numpy.array([4, 9]), num_experts=5)
    (tmp_path / "t.json").write_text(json.dumps({"expert_ids": ids, "layers": [4, 9], "num_experts": 5}))
    rows = ["request,token,layer,e0,e1"] + [
        f"{r},{t},{layer},{a},{b}"
        for r, request in enumerate(ids)
        for t, token in enumerate(request)
        for layer, (a, b) in zip([4, 9], token, strict=True)
    ]
    (tmp_path / "t.csv").write_text("\n".join(rows))
    for name in ("t.json", "t.csv"):
        trace = load_trace(tmp_path / name)
        assert (trace.requests, trace.layers) == (ids, [4, 9])
    npz = load_trace(tmp_path / "t.npz")
    assert (npz.requests, npz.layers, npz.num_experts) == ([ids[0]], [4, 9], 5)
    with pytest.raises(LocalMoEError, match="trace formats are"):
        (tmp_path / "t.txt").write_text("x")
        load_trace(tmp_path / "t.txt")


@pytest.mark.parametrize(
    ("policy", "miss"), [("lfu", "copy"), ("score", "copy"), ("score", "bypass")], ids=["lfu", "score", "bypass"]
)
def test_a_run_and_its_replay_count_the_same(tmp_path, policy, miss):
    """One prompt token, so every forward pass is one token: the replay makes the same layer visits,
    with the router's probabilities the run recorded where the policy weighs them."""
    folder = save_hf(hf_model("MixtralConfig", **MIXTRAL), tmp_path / "m", "sharded")
    options = RuntimeOptions(
        expert_slots=5, policy=policy, prefetch=1, prefetch_margin=1, trace=tmp_path / "run.jsonl", miss_policy=miss
    )
    engine = localmoe.load(str(folder), device="cpu", dtype=torch.float32, options=options)
    list(engine.generate_ids([7], 40))
    trace = load_trace(tmp_path / "run.jsonl")
    assert trace.tokens == 40 and trace.predicted is not None  # the last token is never fed back, the prompt is
    assert (trace.probabilities is not None) == (policy == "score")
    simulated = replay(trace, 5, policy, prefetch=True, miss=miss).counters
    real = engine.experts.cache.totals()
    assert replace(simulated, bytes_copied=0) == replace(real, bytes_copied=0, cpu_seconds=0.0)
    assert simulated.bytes_copied * engine.experts.cache.store.expert_bytes == real.bytes_copied  # one-byte experts
    assert miss == "copy" or real.on_cpu > 0


def test_identity_experts_are_no_uses_in_a_replay(tmp_path):
    """LongCat-Flash's trace lists its identity choices as -1: the replay, like the run, counts none."""
    folder = save_hf(hf_model("LongcatFlashConfig", **LONGCAT_FLASH), tmp_path / "m", "sharded")
    options = RuntimeOptions(expert_slots=4, policy="lru", prefetch=0, trace=tmp_path / "run.jsonl", miss_policy="copy")
    engine = localmoe.load(str(folder), device="cpu", dtype=torch.float32, options=options)
    list(engine.generate_ids([7], 20))
    trace = load_trace(tmp_path / "run.jsonl")
    assert any(-1 in experts for request in trace.requests for token in request for experts in token)
    simulated = replay(trace, 4, "lru").counters
    real = engine.experts.cache.totals()
    assert replace(simulated, bytes_copied=0) == replace(real, bytes_copied=0, cpu_seconds=0.0)


@pytest.mark.slow
def test_the_script_writes_its_tables_into_the_benchmarks_page(tmp_path):
    ids = [[[[t % 5, (t + 2) % 5], [(3 * t) % 5, (t + 1) % 5]] for t in range(12)] for _ in range(3)]
    (tmp_path / "t.json").write_text(json.dumps({"expert_ids": ids, "num_experts": 5}))
    script = Path(__file__).resolve().parent.parent / "scripts" / "simulate_cache.py"
    args = [str(tmp_path / "t.json"), "--out", str(tmp_path / "results"), "--docs", str(tmp_path / "b.md")]
    done = subprocess.run([sys.executable, str(script), *args, "--decays", "0.9,1.0"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "b.md").read_text()
    assert "## Cache policies on the routing of t.json" in page and "| score | per layer | profile |" in page
    assert "| 0.9 |" in page and "Belady" in done.stdout
