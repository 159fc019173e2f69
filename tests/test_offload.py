"""The offloading runtime: any slot count, policy and prefetch setting gives exactly the all-resident
tokens and logits, and the cache's counters and buffers keep their invariants."""

import json
from collections import Counter

import pytest
import torch
from conftest import QWEN3_MOE, TINY_FAMILIES, hf_model, save_hf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import localmoe
from localmoe.engine import RuntimeOptions
from localmoe.errors import LocalMoEError
from localmoe.models.moe import Routing, moe_blocks
from localmoe.runtime.expert_cache import ExpertCache, SlotTable
from localmoe.runtime.expert_store import ExpertStore
from localmoe.runtime.miss_policy import MissPolicy
from localmoe.runtime.offload import OffloadedExperts
from localmoe.runtime.profile import RoutingProfile
from localmoe.runtime.resident import ResidentExperts
from localmoe.runtime.routing_log import RoutingLog

PROMPT, DECODE = 24, 10
FAMILIES = {
    "mixtral": TINY_FAMILIES["mixtral"],
    "qwen3": ("Qwen3MoeConfig", {**QWEN3_MOE, "mlp_only_layers": [1]}),  # 3 MoE layers x 7 experts, top-3
    "deepseek_v3": TINY_FAMILIES["deepseek_v3"],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {
        name: str(save_hf(hf_model(config_class, **config), tmp_path_factory.mktemp(name), "sharded"))
        for name, (config_class, config) in FAMILIES.items()
    }


@pytest.fixture(scope="module")
def references(checkpoints):
    """The all-resident run of each family: greedy tokens and the logits of every step."""
    return {name: run(localmoe.load(path, device="cpu", dtype=torch.float32)) for name, path in checkpoints.items()}


def prompt() -> list[int]:
    return torch.randint(0, 256, (PROMPT,), generator=torch.Generator().manual_seed(5)).tolist()


def run(engine) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens from the engine, and the logits of the prompt and of each decode step of a fixed
    continuation, through the same experts backend."""
    tokens = list(engine.generate_ids(prompt(), DECODE))
    cache = engine.model.new_cache(1, PROMPT + DECODE)
    logits = [engine.model(torch.tensor([prompt()]), cache, all_logits=True)]
    logits += [engine.model(torch.tensor([[token]]), cache) for token in tokens[:-1]]
    return tokens, logits


def total_experts(engine) -> int:
    return engine.plan.footprint.total_experts


def offloaded(path: str, **options) -> localmoe.Engine:
    engine = localmoe.load(path, device="cpu", dtype=torch.float32, options=RuntimeOptions(**options))
    assert isinstance(engine.experts, OffloadedExperts)
    return engine


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    family=st.sampled_from(sorted(FAMILIES)),
    spare=st.integers(min_value=0, max_value=20),
    policy=st.sampled_from(["lru", "lfu", "score"]),
    prefetch=st.integers(min_value=0, max_value=2),
    margin=st.integers(min_value=0, max_value=2),
    miss=st.sampled_from(["direct", "copy", "cpu", "auto", "bypass"]),
    cpu_bandwidth=st.sampled_from([1e8, 1e9, 1e10]),  # against copies at 1e9: auto gives the CPU none, some, most
    mmap=st.booleans(),
)
def test_any_cache_gives_the_all_resident_tokens_and_logits(
    checkpoints, references, family, spare, policy, prefetch, margin, miss, cpu_bandwidth, mmap
):
    path = checkpoints[family]
    top_k = FAMILIES[family][1]["num_experts_per_tok"]
    total = localmoe.load(path, device="cpu").plan.footprint.total_experts
    slots = min(top_k + spare, total - 1)  # from the smallest pool that works to all but one expert
    if miss == "direct" and mmap:
        miss = None  # the default: experts mapped from the checkpoint cannot be read in place, so copied
    engine = offloaded(
        path,
        expert_slots=slots,
        policy=policy,
        prefetch=0 if miss == "direct" else prefetch,  # direct admits a step later instead
        prefetch_margin=margin,
        miss_policy=miss,
        copy_bandwidth=1e9,
        cpu_bandwidth=cpu_bandwidth,
        host_budget=1 if mmap else None,
    )
    tokens, logits = run(engine)
    expected_tokens, expected_logits = references[family]
    assert tokens == expected_tokens
    for got, expected in zip(logits, expected_logits, strict=True):
        assert torch.equal(got, expected)
    assert_counters_add_up(engine)


def test_pinned_hot_experts_and_mmap_store_give_the_same_tokens(checkpoints, references):
    for family, path in checkpoints.items():
        top_k = FAMILIES[family][1]["num_experts_per_tok"]
        engine = offloaded(path, expert_slots=top_k + 3, pin_hot=3, host_budget=1)
        assert engine.plan.store == "mmap"
        tokens, _ = run(engine)
        assert tokens == references[family][0]
        assert len(engine.experts.cache.pinned) == 3


def test_a_routing_profile_warms_the_next_run_and_pins_its_hottest(checkpoints, references, tmp_path):
    path, profile = checkpoints["qwen3"], tmp_path / "profile.json"
    first = offloaded(path, expert_slots=9, profile=str(profile))
    assert run(first)[0] == references["qwen3"][0]
    first.save_profile()
    first.save_profile()  # nothing new since: the counts are not added twice
    saved = RoutingProfile.load(profile)
    assert sum(saved.counts.values()) == sum(first.experts.cache.token_counts.values())
    second = offloaded(path, expert_slots=9, profile=str(profile), pin_hot=2)
    cache = second.experts.cache
    assert cache.pinned == set(saved.hottest()[:2])
    assert len(cache.slot_of) == cache.totals().warmup_copies > 2  # the rest warmed, within quotas
    assert run(second)[0] == references["qwen3"][0]
    assert cache.totals().hits > first.experts.cache.totals().hits


def test_a_profile_of_another_model_is_refused(checkpoints, tmp_path):
    profile = tmp_path / "profile.json"
    RoutingProfile(Counter({0: 1}), Counter({(0, 99): 1})).save(profile)
    with pytest.raises(LocalMoEError, match="recorded for another model"):
        offloaded(checkpoints["qwen3"], expert_slots=9, profile=str(profile))


@pytest.mark.parametrize("miss", ["copy", "auto", "direct"])
def test_counters_add_up(checkpoints, miss):
    """Every use is a hit, a miss, read in place or computed on the CPU; copies account for every byte
    copied, reads in place for every byte read where it lies."""
    engine = offloaded(
        checkpoints["qwen3"],
        expert_slots=5,
        prefetch=0 if miss == "direct" else 2,
        prefetch_margin=1,
        pin_hot=1,
        miss_policy=miss,
        copy_bandwidth=1e9,
        cpu_bandwidth=1e9,
    )
    run(engine)
    snapshot = engine.expert_cache()
    total = snapshot.total
    assert total.uses > 0 and (total.prefetch_issued > 0) == (miss != "direct") and snapshot.pinned == 1
    assert (total.on_cpu > 0) == (miss == "auto") and (total.cpu_seconds > 0) == (miss == "auto")
    assert (total.direct > 0) == (total.admissions > 0) == (miss == "direct")
    assert_counters_add_up(engine)


@pytest.mark.parametrize("miss", ["direct", "copy"])
def test_identity_experts_take_no_slot(tmp_path, miss):
    """LongCat-Flash's identity experts are choices of no expert for the runtime: the cache counts the
    routed choices alone, each once, and never gives an identity a slot."""
    config_class, config = TINY_FAMILIES["longcat_flash"]
    path = str(save_hf(hf_model(config_class, **config), tmp_path, "sharded"))
    engine = offloaded(path, expert_slots=config["moe_topk"], miss_policy=miss)
    routed, identities = [], []

    def count(_, __, routing) -> None:
        routed.append(int((routing.ids < 6).sum()))
        identities.append(int((routing.ids >= 6).sum()))

    for block in moe_blocks(engine.model):
        block.gate.register_forward_hook(count)
    list(engine.generate_ids(prompt(), DECODE))
    engine.experts.settle()
    cache = engine.experts.cache
    assert sum(identities) > 0
    assert {expert for _, expert in cache.token_counts} <= set(range(6))
    assert {expert for _, expert in cache.slot_of} <= set(range(6))
    assert sum(cache.token_counts.values()) == sum(routed)
    assert_counters_add_up(engine)


def assert_counters_add_up(engine: localmoe.Engine) -> None:
    snapshot, cache = engine.expert_cache(), engine.experts.cache
    for counters in [*snapshot.per_layer.values(), snapshot.total]:
        assert counters.hits + counters.misses + counters.direct + counters.on_cpu == counters.uses
        copies = counters.misses + counters.prefetch_wasted + counters.warmup_copies + counters.admissions
        assert counters.bytes_copied == copies * cache.store.expert_bytes
        assert counters.bytes_direct == counters.direct * cache.store.expert_bytes
        assert counters.prefetch_used + counters.prefetch_wasted <= counters.prefetch_issued
    # every copy took a free slot or evicted an expert: what is left is what the pool holds
    assert snapshot.total.bytes_copied // cache.store.expert_bytes - snapshot.total.evictions == len(cache.slot_of)


def cache_path_engine(path: str, slots: int) -> localmoe.Engine:
    """An engine whose experts go through the expert cache even when every expert has a slot."""
    engine, cpu = localmoe.load(path, device="cpu", dtype=torch.float32), torch.device("cpu")
    store = ExpertStore(engine.parts.experts, torch.float32, "ram", cpu)
    blocks = moe_blocks(engine.model)
    specs = [block.spec for block in blocks]
    table = SlotTable([spec.layer for spec in specs], specs[0].experts, cpu)
    predictors = {block.layer_idx: block.gate.scores for block in blocks}
    cache = ExpertCache(store, slots, cpu, "lru", table=table)
    engine.experts = OffloadedExperts(cache, specs, predictors, prefetch=1, miss_policy=MissPolicy())
    for block in blocks:
        block.experts = engine.experts
    return engine


def test_no_misses_once_every_expert_is_cached(checkpoints, references):
    engine = cache_path_engine(checkpoints["mixtral"], slots=15)
    warm = run(engine)
    before = engine.experts.cache.totals()
    assert before.bytes_copied == 15 * engine.experts.cache.store.expert_bytes  # each expert copied once
    again = run(engine)
    assert again[0] == warm[0] and all(torch.equal(a, b) for a, b in zip(again[1], warm[1], strict=True))
    after = engine.experts.cache.totals()
    assert after.misses == before.misses and after.bytes_copied == before.bytes_copied
    assert after.uses > before.uses
    assert warm[0] == references["mixtral"][0]


def test_each_expert_copied_at_most_once_per_layer_visit(checkpoints):
    engine = offloaded(checkpoints["mixtral"], expert_slots=6, prefetch=2, prefetch_margin=1, miss_policy="copy")
    experts, cache = engine.experts, engine.experts.cache
    spans: list[list[tuple[int, int]]] = []
    copy_to = cache.store.copy_to

    def recording_copy(row, layer, expert, then=None):
        spans[-1].append((layer, expert))
        return copy_to(row, layer, expert, then)

    def visit(layer, x, routing):
        spans.append([])
        return experts(layer, x, routing)

    cache.store.copy_to = recording_copy
    for block in moe_blocks(engine.model):
        block.experts = visit
    list(engine.generate_ids(prompt(), DECODE))
    assert any(spans)
    for span in spans:
        assert len(span) == len(set(span))
    # In decode (one round per layer), what a visit prefetched is not copied again by the next visit.
    layers = sorted(experts.specs)
    decode_spans = spans[len(layers) :]
    for this, following in zip(decode_spans, decode_spans[1:], strict=False):
        assert not set(this) & set(following)


def test_pool_is_allocated_once_within_the_plan(checkpoints):
    engine = offloaded(checkpoints["qwen3"], expert_slots=4)
    cache = engine.experts.cache
    pointers = (cache.rows.data_ptr(), cache.gate_up.data_ptr(), cache.down.data_ptr())
    run(engine)
    run(engine)
    assert (cache.rows.data_ptr(), cache.gate_up.data_ptr(), cache.down.data_ptr()) == pointers
    assert cache.rows.numel() * cache.rows.element_size() == engine.plan.pool_bytes
    assert engine.plan.device_bytes <= engine.plan.device_budget


def test_trace_has_every_token_at_every_moe_layer(checkpoints, tmp_path):
    trace = tmp_path / "routing.jsonl"
    engine = offloaded(checkpoints["mixtral"], expert_slots=4, trace=trace)
    tokens = list(engine.generate_ids(prompt(), 6))
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    layers = sorted(engine.experts.specs)
    positions = PROMPT + len(tokens) - 1  # the last token is never fed back
    assert len(rows) == positions * len(layers)
    assert {row["token"] for row in rows} == set(range(positions))
    assert all(len(row["experts"]) == 2 and len(row["weights"]) == 2 for row in rows)
    assert abs(sum(rows[0]["weights"]) - 1) < 1e-6  # Mixtral renormalises its top-k


def test_resident_run_writes_the_same_trace(checkpoints, tmp_path):
    resident = localmoe.load(
        checkpoints["mixtral"], device="cpu", dtype=torch.float32, options=RuntimeOptions(trace=tmp_path / "a")
    )
    assert isinstance(resident.experts, ResidentExperts)
    list(resident.generate_ids(prompt(), 4))
    # LRU: the score policy's runs also record the router's distribution, which the resident run has no use for
    offload = offloaded(checkpoints["mixtral"], expert_slots=3, prefetch=0, trace=tmp_path / "b", policy="lru")
    list(offload.generate_ids(prompt(), 4))
    assert (tmp_path / "a").read_text() == (tmp_path / "b").read_text()


def test_trace_with_prefetch_records_the_predictions(checkpoints, tmp_path):
    offload = offloaded(
        checkpoints["mixtral"], expert_slots=3, prefetch=1, prefetch_margin=1, trace=tmp_path / "t", miss_policy="copy"
    )
    list(offload.generate_ids(prompt(), 4))
    rows = [json.loads(line) for line in (tmp_path / "t").read_text().splitlines()]
    last = max(offload.experts.specs)
    assert all(len(row["predicted"]) == 3 for row in rows if row["layer"] != last)  # top-2 + margin 1
    assert all("predicted" not in row for row in rows if row["layer"] == last)


@pytest.mark.parametrize(
    "options,needle",
    [
        ({"expert_slots": 1}, "expert_slots 1 is out of range"),
        ({"expert_slots": 99}, "expert_slots 99 is out of range"),
        ({"expert_slots": 4, "pin_hot": 3}, "use at most 2"),
        ({"vram_budget": 10_000}, "too small"),
    ],
)
def test_bad_runtime_options(checkpoints, options, needle):
    with pytest.raises(localmoe.LocalMoEError, match=needle):
        localmoe.load(checkpoints["mixtral"], device="cpu", options=RuntimeOptions(**options))


def test_the_list_covers_every_registered_family():
    from localmoe.models import FAMILIES

    assert set(TINY_FAMILIES) == {family.model_type for family in FAMILIES}


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_every_family_offloaded_equals_resident(family, tmp_path):
    """The smallest pool, a middling one and all but one expert, with prefetch two layers ahead, misses
    copied; the smallest pool with misses computed on the CPU; and the smallest and middling ones with
    misses read in place."""
    config_class, config = TINY_FAMILIES[family]
    path = str(save_hf(hf_model(config_class, **config), tmp_path, "sharded"))
    resident = localmoe.load(path, device="cpu", dtype=torch.float32)
    expected_tokens, expected_logits = run(resident)
    fp = resident.plan.footprint
    sizes = sorted({fp.top_k, (fp.top_k + fp.total_experts) // 2, fp.total_experts - 1})
    copied = [(size, "copy") for size in sizes]
    for slots, miss in [*copied, (fp.top_k, "cpu"), (fp.top_k, "direct"), (sizes[1], "direct")]:
        depth = 0 if miss == "direct" else 2
        tokens, logits = run(offloaded(path, expert_slots=slots, prefetch=depth, prefetch_margin=1, miss_policy=miss))
        assert tokens == expected_tokens, f"{slots} slots, {miss}"
        assert all(torch.equal(a, b) for a, b in zip(logits, expected_logits, strict=True)), f"{slots} slots, {miss}"


def test_the_routing_log_learns_only_the_rows_a_step_wrote():
    """A step that runs some layers (a draft through the multi-token-prediction layer alone) is learned
    for those only; a replayed decode step, which writes its rows without telling the log how many, for
    the rows it wrote."""
    log = RoutingLog({3: 2, 5: 2}, 4, torch.device("cpu"), weights=False)
    table = torch.tensor([0, -1, 1, -1], dtype=torch.int32)

    def run(layer: int, ids: torch.Tensor) -> None:
        log.lookup(layer, table, ids)
        log.record(layer, Routing(torch.ones(ids.shape), ids, torch.rand(ids.shape[0], 4)))

    run(3, torch.tensor([[0, 1], [2, 3], [1, 2]]))
    run(5, torch.tensor([[3, 0], [1, 2], [0, 2]]))
    log.close()
    log._rows("ids", 3, 1).copy_(torch.tensor([[2, 0]]))  # what a captured one-token step writes on replay
    log.close()
    run(5, torch.tensor([[3, 1]]))
    log.close()
    both, replayed, drafted = log.taken()
    assert [(r.layer, r.ids.shape) for r in both] == [(3, (3, 2)), (5, (3, 2))]
    assert [(r.layer, r.ids.tolist()) for r in replayed] == [(3, [[2, 0]])]
    assert [(r.layer, r.ids.tolist(), r.slots.tolist()) for r in drafted] == [(5, [[3, 1]], [[-1, -1]])]


def test_a_replayed_check_is_learned_for_the_rows_its_step_says():
    """A captured speculative check writes its rows on replay without a lookup: told its token count first
    (StepHooks.tokens), the log learns every one of them, also after a shorter step; the room for them was
    made before the capture, so the buffers the capture holds are the log's."""
    log = RoutingLog({3: 2}, 4, torch.device("cpu"), weights=False)
    log.expect(4)  # before anything is captured
    captured = log._rows("ids", 3, 4)  # what the captured check writes into
    ids = torch.tensor([[1, 0]])
    log.lookup(3, torch.tensor([0, -1, 1, -1], dtype=torch.int32), ids)  # a one-token step, run eagerly
    log.record(3, Routing(torch.ones(ids.shape), ids, torch.rand(1, 4)))
    log.close()
    log.expect(4)
    captured.copy_(torch.tensor([[2, 0], [3, 1], [0, 1], [2, 3]]))  # the replay
    log.close()
    one, replayed = log.taken()
    assert one[0].ids.tolist() == [[1, 0]] and replayed[0].ids.tolist() == [[2, 0], [3, 1], [0, 1], [2, 3]]
