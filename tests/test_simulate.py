"""The trace simulator: counts worked out by hand, Belady as the bound of every online policy, the trace
formats, and the same numbers as a real run for the same routing."""

import json
from dataclasses import replace

import numpy
import pytest
import torch
from conftest import MIXTRAL, hf_model, save_hf
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


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    layers=st.integers(1, 3),
    experts=st.integers(2, 6),
    top_k=st.integers(1, 2),
    tokens=st.integers(1, 30),
)
def test_belady_bounds_every_online_policy(data, layers, experts, top_k, tokens):
    top_k = min(top_k, experts)
    choose = st.lists(st.integers(0, experts - 1), min_size=top_k, max_size=top_k, unique=True)
    requests = [[[data.draw(choose) for _ in range(layers)] for _ in range(tokens)]]
    trace = Trace(requests, list(range(layers)), experts)
    slots = data.draw(st.integers(top_k, layers * experts))
    best = replay(trace, slots, "belady").counters.hits
    for policy in ("lru", "lfu"):
        counters = replay(trace, slots, policy).counters
        assert counters.hits <= best
        assert counters.hits + counters.misses == counters.uses == tokens * layers * top_k


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


def test_a_run_and_its_replay_count_the_same(tmp_path):
    """One prompt token, so every forward pass is one token: the replay makes the same layer visits."""
    folder = save_hf(hf_model("MixtralConfig", **MIXTRAL), tmp_path / "m", "sharded")
    options = RuntimeOptions(expert_slots=5, policy="lfu", prefetch=1, prefetch_margin=1, trace=tmp_path / "run.jsonl")
    engine = localmoe.load(str(folder), device="cpu", dtype=torch.float32, options=options)
    list(engine.generate_ids([7], 40))
    trace = load_trace(tmp_path / "run.jsonl")
    assert trace.tokens == 40 and trace.predicted is not None  # the last token is never fed back, the prompt is
    simulated, real = replay(trace, 5, "lfu", prefetch=True).counters, engine.experts.cache.totals()
    assert replace(simulated, bytes_copied=0) == replace(real, bytes_copied=0)
    assert simulated.bytes_copied * engine.experts.cache.store.expert_bytes == real.bytes_copied  # one-byte experts
