"""Speculative decoding against plain decoding: the same tokens on every family, all-resident and
offloaded, whatever the drafts (all kept, all rejected, any mix), with EOS and max_new_tokens inside a
kept run, and the cache left as plain decoding leaves it."""

import http.client
import json
from collections import Counter

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_FAMILIES, hf_model, save_hf, serve_app
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_mtp import RELEASES

import localmoe
from localmoe.bench import LaunchCounter
from localmoe.cli import main
from localmoe.models import state as layer_state
from localmoe.models.layers import CausalLM
from localmoe.models.moe import moe_blocks
from localmoe.models.state import CompressedKV, RecurrentState
from localmoe.options import RuntimeOptions
from localmoe.runtime.generate import GenerationStats, generate_tokens
from localmoe.runtime.sampling import Sampler, SamplingParams
from localmoe.runtime.speculative import Drafter, MtpDrafter, PromptLookup, SpeculationStats
from localmoe.runtime.steps import StaticSteps
from localmoe.server import Server

NEW = 12
# random tokens, then their first half again: prompt lookup finds something to draft
PROMPT = torch.randint(0, 200, (10,), generator=torch.Generator().manual_seed(5)).tolist()
PROMPT += PROMPT[:5]
# one family per kind of state: keys and values, rings (windows, convolutions), latents, the delta rule,
# lightning attention, Mamba-1 and -2 scans, DeepSeek-V4's compressed entries, ZAYA's combined states
KINDS = ["mixtral", "gpt_oss", "deepseek_v3", "qwen3_next", "minimax", "jamba", "nemotron_h", "deepseek_v4"]
KINDS += ["lfm2_moe", "zaya", "kimi_linear"]


class Scripted(Drafter):
    """A test double: drafts the known plain continuation, with its tokens wrong (plus one) from the
    position `plan` gives for each round (None: all right), `length` tokens long."""

    def __init__(self, continuation: list[int], vocab: int, plan=(), wrong_from: int | None = None, prompt=PROMPT):
        self.continuation, self.vocab, self.prompt = continuation, vocab, len(prompt)
        self.plan, self.rounds, self.wrong_from = list(plan), 0, wrong_from

    def propose(self, tokens, limit):
        if self.plan:
            length, wrong_from = self.plan[self.rounds % len(self.plan)]
        else:
            length, wrong_from = limit, self.wrong_from
        self.rounds += 1
        right = self.continuation[len(tokens) - self.prompt :][: min(length, limit)]
        return [t if wrong_from is None or i < wrong_from else (t + 1) % self.vocab for i, t in enumerate(right)]


def always_right(continuation, vocab):
    return Scripted(continuation, vocab)


def always_wrong(continuation, vocab):
    return Scripted(continuation, vocab, wrong_from=0)


def mixed(continuation, vocab, prompt=PROMPT):
    return Scripted(continuation, vocab, plan=[(3, 1), (2, None), (3, 0), (1, None), (3, 2)], prompt=prompt)


def assert_plain(model, prompt, got: list[int], expected: list[int], sampling: SamplingParams | None = None):
    """`got` (speculative) equals `expected` (plain decoding), or first differs at a token that rounding
    decides: T tokens through one forward pass round differently from T single-token steps, and where a
    router's top-k is a near-tie, that picks another expert and can change the token (measured: Kimi
    Linear's tiny model, two experts 6e-8 apart at 0.71). Such a token is one that plain decoding itself
    changes to the speculative one when its embeddings are perturbed by 1e-5 of their scale, in one of
    eight draws; any other difference fails."""
    if got == expected:
        return
    k = next(i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b) if got[:1] else 0
    assert k < min(len(got), len(expected)), f"the same tokens but {len(got)} of them, not {len(expected)}"
    embed = model.model.embed_tokens
    for seed in range(8):
        noise = torch.Generator().manual_seed(seed)

        def perturb(module, args, out, noise=noise):
            return out + torch.randn(out.shape, generator=noise) * out.abs().mean() * 1e-5

        hook = embed.register_forward_hook(perturb)
        try:
            sampler = Sampler(sampling or SamplingParams(), "cpu")
            perturbed = list(generate_tokens(model, prompt, k + 1, sampler=sampler))
        finally:
            hook.remove()
        if perturbed[:k] == expected[:k] and perturbed[k] == got[k]:
            print(f"token {k}: {got[k]} for plain {expected[k]}, rounding-sensitive (perturbation {seed} gives it)")
            return
    raise AssertionError(f"token {k}: plain {expected[k]}, speculative {got[k]}, and no perturbation explains it")


def vocab(engine) -> int:
    return engine.model.model.embed_tokens.weight.shape[0]


def checkpoint(family: str, folder) -> str:
    config_class, config = TINY_FAMILIES[family]
    return str(save_hf(hf_model(config_class, **config), folder, "sharded"))


@pytest.fixture(scope="module", params=list(TINY_FAMILIES))
def every_family(request, tmp_path_factory):
    return checkpoint(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module", params=KINDS)
def each_kind(request, tmp_path_factory):
    path = checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    engine = localmoe.load(path, device="cpu", dtype=torch.float32)
    return engine, list(engine.generate_ids(PROMPT, NEW))


def offloaded(path: str, slots: int) -> localmoe.Engine:
    return localmoe.load(path, device="cpu", dtype=torch.float32, options=RuntimeOptions(expert_slots=slots))


def test_every_family_speculates_exactly(every_family):
    """Drafts all kept, all rejected, mixed and from prompt lookup, all-resident; offloaded, prompt lookup and
    drafts all rejected with the fewest slots (every check's tokens route past them), drafts all kept with a
    middling number."""
    resident = localmoe.load(every_family, device="cpu", dtype=torch.float32)
    model, expected = resident.model, list(resident.generate_ids(PROMPT, NEW))
    for make in (always_right, always_wrong, mixed):
        got = list(resident.generate_ids(PROMPT, NEW, drafter=make(expected, vocab(resident)), draft_tokens=3))
        assert_plain(model, PROMPT, got, expected)
    assert_plain(model, PROMPT, list(resident.generate_ids(PROMPT, NEW, drafter=PromptLookup())), expected)
    fp = resident.plan.footprint
    fewest, middling = offloaded(every_family, fp.top_k), offloaded(every_family, (fp.top_k + fp.total_experts) // 2)
    runs = [(fewest, PromptLookup()), (fewest, always_wrong(expected, vocab(resident)))]
    runs += [(middling, always_right(expected, vocab(resident)))]
    for engine, drafter in runs:
        assert_plain(model, PROMPT, list(engine.generate_ids(PROMPT, NEW, drafter=drafter)), expected)


# the cache settings beside the slot counts above: misses computed on the CPU, misses bypassing the slots, and
# experts quantized by localmoe
CACHE_SETTINGS = [{"miss_policy": "cpu"}, {"miss_policy": "bypass"}, {"expert_bits": 8}]


def test_every_cache_setting_speculates_exactly(tmp_path):
    """With the fewest slots and mixed drafts, each setting's own plain tokens (a model with delta-rule states
    rolled back and a check's tokens routed together)."""
    path = checkpoint("qwen3_next", tmp_path)
    top_k = localmoe.load(path, device="cpu", dtype=torch.float32).plan.footprint.top_k
    for setting in CACHE_SETTINGS:
        options = RuntimeOptions(expert_slots=top_k, **setting)
        engine = localmoe.load(path, device="cpu", dtype=torch.float32, options=options)
        expected = list(engine.generate_ids(PROMPT, NEW))
        got = list(engine.generate_ids(PROMPT, NEW, drafter=mixed(expected, vocab(engine)), draft_tokens=3))
        assert_plain(engine.model, PROMPT, got, expected)
        assert engine.stats.speculation.verifications > 0 and engine.stats.experts_loaded is not None, setting


def test_drafts_all_kept_and_all_rejected_are_counted(tmp_path):
    engine = localmoe.load(checkpoint("mixtral", tmp_path), device="cpu", dtype=torch.float32)
    expected = list(engine.generate_ids(PROMPT, NEW))
    assert list(engine.generate_ids(PROMPT, NEW, drafter=always_right(expected, vocab(engine)))) == expected
    kept = engine.stats.speculation
    # the prefill's token, then rounds of four drafts and the target's own token, then one plain step
    assert (kept.drafted, kept.accepted, kept.verifications, kept.fed_again) == (8, 8, 2, 0)
    assert kept.rates() == [1.0] * 4
    assert list(engine.generate_ids(PROMPT, NEW, drafter=always_wrong(expected, vocab(engine)))) == expected
    rejected = engine.stats.speculation
    assert rejected.accepted == 0 and rejected.verifications == NEW - 2 and rejected.rates() == [0.0] * 4
    assert rejected.drafted == 4 * (NEW - 5) + 3 + 2 + 1  # shorter drafts once max_new_tokens is near
    stats = GenerationStats()  # an EOS as the second of four drafts: the two after it are not counted
    eos = frozenset({expected[2]})
    drafter = always_right(expected, vocab(engine))
    assert list(generate_tokens(engine.model, PROMPT, NEW, eos_ids=eos, stats=stats, drafter=drafter)) == expected[:3]
    assert (stats.speculation.drafted, stats.speculation.accepted) == (2, 2)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    plan=st.lists(st.tuples(st.integers(1, 5), st.one_of(st.none(), st.integers(0, 4))), min_size=1, max_size=4),
    draft_tokens=st.integers(1, 5),
)
def test_any_drafts_give_the_plain_tokens(each_kind, plan, draft_tokens):
    engine, expected = each_kind
    drafter = Scripted(expected, vocab(engine), plan)
    got = list(engine.generate_ids(PROMPT, NEW, drafter=drafter, draft_tokens=draft_tokens))
    assert_plain(engine.model, PROMPT, got, expected)


def test_seeded_sampling_draws_what_plain_decoding_draws(each_kind):
    """One sampler call per token, in order: the same draws from the same generator."""
    engine, _ = each_kind
    sampling = SamplingParams(temperature=1.5, top_k=50, repetition_penalty=1.1, seed=7)
    sampled = list(engine.generate_ids(PROMPT, NEW, sampling))
    for make in (always_right, mixed):
        got = list(engine.generate_ids(PROMPT, NEW, sampling, drafter=make(sampled, vocab(engine))))
        assert_plain(engine.model, PROMPT, got, sampled, sampling)


@pytest.mark.parametrize("stop_at", [3, 4, 7])
def test_eos_and_the_token_limit_inside_a_kept_run(each_kind, stop_at):
    """Drafts of five, all kept: the run ends at the EOS token or at max_new_tokens though the draft
    went on, and the cache holds what plain decoding's does (every token but the last)."""
    engine, expected = each_kind
    model = engine.model
    for eos, limit in ((frozenset({expected[stop_at]}), NEW), (frozenset(), stop_at + 1)):
        want = expected[: expected.index(expected[stop_at]) + 1] if eos else expected[:limit]
        cache = model.new_cache(1, len(PROMPT) + NEW)
        drafter = always_right(expected, vocab(engine))
        got = list(generate_tokens(model, PROMPT, limit, eos_ids=eos, cache=cache, drafter=drafter, draft_tokens=5))
        assert_plain(model, PROMPT, got, want)
        assert cache.pos == len(PROMPT) + len(got) - 1


def test_a_run_stopped_early_leaves_the_cache_as_plain_decoding_does(each_kind):
    """The consumer stops reading in the middle of a kept run (a stop string); the conversation then
    goes on from the cache, as a chat's next turn does."""
    engine, expected = each_kind
    model = engine.model
    cache = model.new_cache(1, 64)
    tokens = generate_tokens(model, PROMPT, NEW, cache=cache, drafter=always_right(expected, vocab(engine)))
    got = [next(tokens) for _ in range(3)]
    tokens.close()
    assert cache.pos == len(PROMPT) + 2
    follow = PROMPT + got + [5, 6]
    plain = list(generate_tokens(model, follow, 6))
    drafter = mixed(plain, vocab(engine))
    drafter.continuation = [0] * (len(follow) - len(PROMPT)) + plain
    reuse = len(PROMPT) + 2
    assert_plain(
        model, follow, list(generate_tokens(model, follow, 6, cache=cache, reuse=reuse, drafter=drafter)), plain
    )


def kept_bytes(kept) -> int:
    """The bytes of the tensors in nested tuples, lists and dicts, each storage once (views share one)."""
    storages = {}

    def walk(item):
        if isinstance(item, torch.Tensor):
            storages[item.untyped_storage().data_ptr()] = item.untyped_storage().nbytes()
        elif isinstance(item, (tuple, list, dict)):
            for inner in item.values() if isinstance(item, dict) else item:
                walk(inner)

    walk(kept)
    return sum(storages.values())


def kept_by_check(state) -> list:
    """What a layer's state keeps of the check it took last: a recurrent state's states after each position,
    a compressor's projections and gates of its pending and new tokens and the overlap before it."""
    if isinstance(state, RecurrentState):
        return [state.pieces]
    if isinstance(state, CompressedKV):
        trails = [pooled.trail for pooled in (state.compressor, state.indexer) if pooled is not None]
        return [(trail.kv, trail.gate, trail.overlap) for trail in trails]
    return []


RECURRENT_KINDS = ["qwen3_next", "kimi_linear", "minimax", "jamba", "nemotron_h"]


@pytest.mark.parametrize("family", [*RECURRENT_KINDS, "deepseek_v4"])
def test_the_plan_counts_what_a_check_keeps(family, tmp_path):
    """What a check of four drafts keeps beside the cache (the recurrent states after each position, the
    compressors' projections of its tokens) is in the plan where speculation is on, and
    `localmoe plan` shows it; nothing where it is off."""
    path = checkpoint(family, tmp_path)
    engine = localmoe.load(path, device="cpu", dtype=torch.float32, speculative="lookup", draft_tokens=4)
    model = engine.model
    cache = model.new_cache(1, 64)
    list(generate_tokens(model, PROMPT, 3, cache=cache))  # the compressors hold pending tokens
    with torch.no_grad():
        model(torch.tensor([PROMPT[:5]]), cache, all_logits=True, trail=True)
    kept = kept_bytes([kept_by_check(state) for state in cache.layers])
    assert 0 < kept <= engine.plan.speculation_bytes
    assert localmoe.load(path, device="cpu", dtype=torch.float32).plan.speculation_bytes == 0
    shown = CliRunner().invoke(main, ["plan", path, "--device", "cpu", "--speculative", "lookup"])
    assert shown.exit_code == 0 and "speculative decoding (lookup, 4-token drafts" in shown.stdout, shown.output
    assert "speculative decoding" not in CliRunner().invoke(main, ["plan", path, "--device", "cpu"]).stdout


@pytest.mark.parametrize("family", [*RECURRENT_KINDS, "deepseek_v4"])
def test_a_rejection_feeds_nothing_again_where_states_keep_their_trail(family, tmp_path):
    """Recurrent states and DeepSeek-V4's pooled entries are cut back into the check's trail: with every draft
    rejected, one forward pass per token after the prefill, none fed again."""
    engine = localmoe.load(checkpoint(family, tmp_path), device="cpu", dtype=torch.float32)
    expected = list(engine.generate_ids(PROMPT, NEW))
    passes = []
    hook = engine.model.model.layers[0].register_forward_hook(lambda *_: passes.append(1))
    try:
        got = list(engine.generate_ids(PROMPT, NEW, drafter=always_wrong(expected, vocab(engine)), draft_tokens=3))
    finally:
        hook.remove()
    assert_plain(engine.model, PROMPT, got, expected)
    stats = engine.stats.speculation
    assert stats.verifications > 0 and stats.fed_again == 0
    assert len(passes) == NEW  # the prefill, then one pass per new token


def test_where_a_state_cannot_be_cut_back_the_kept_tokens_are_fed_again(tmp_path, monkeypatch):
    """A ring with one position of slack cannot be cut back two or more into a check: the cache restarts and
    every kept token is fed again, still to the plain tokens."""
    monkeypatch.setattr(layer_state, "REWIND_SLACK", 1)
    engine = localmoe.load(checkpoint("gpt_oss", tmp_path), device="cpu", dtype=torch.float32)
    expected = list(engine.generate_ids(PROMPT, NEW))
    drafter = Scripted(expected, vocab(engine), plan=[(3, 0)])
    got = list(engine.generate_ids(PROMPT, NEW, drafter=drafter, draft_tokens=3))
    assert_plain(engine.model, PROMPT, got, expected)
    stats = engine.stats.speculation
    # check i (from 0) starts at position len(PROMPT) + i and keeps its first token, all of which is fed again
    # where it is cut back more than one: those of two drafts or more (the last ones draft fewer)
    assert stats.fed_again == sum(len(PROMPT) + i + 1 for i in range(stats.drafted_at[1])) > 0


@pytest.mark.parametrize(
    "rates",
    [
        {},  # the tiny model's: CSA's windows of 4 (one ends in every check of 4), HCA's of 8
        {"compressed_sparse_attention": 2, "heavily_compressed_attention": 3},  # several end in one check
    ],
)
def test_deepseek_v4_checks_are_cut_back_where_windows_end_inside_them(rates, tmp_path):
    """Overlapping windows (CSA, with its indexer's) and plain ones (HCA) completed inside checks, which are
    cut back before, at and after their ends: the plain tokens whatever the drafts, nothing fed again."""
    config_class, config = TINY_FAMILIES["deepseek_v4"]
    config = {**config, "compress_rates": {**config["compress_rates"], **rates}}
    path = save_hf(hf_model(config_class, **config), tmp_path, "sharded")
    engine = localmoe.load(str(path), device="cpu", dtype=torch.float32)
    expected = list(engine.generate_ids(PROMPT, NEW))
    for make in (always_right, always_wrong, mixed):
        for draft_tokens in (3, 5):
            drafter = make(expected, vocab(engine))
            got = list(engine.generate_ids(PROMPT, NEW, drafter=drafter, draft_tokens=draft_tokens))
            assert_plain(engine.model, PROMPT, got, expected)
            stats = engine.stats.speculation
            assert stats.verifications > 0 and stats.fed_again == 0, (make.__name__, draft_tokens)


def test_prompt_lookup_drafts_what_followed_the_latest_longest_match():
    lookup = PromptLookup(longest=3, shortest=1)
    assert lookup.propose([1, 2, 3, 4, 9, 2, 3, 5, 7, 2, 3], 3) == [5, 7, 2]  # 2 3 last followed by 5
    assert lookup.propose([1, 2, 3, 4, 9, 2, 3, 5, 7, 2, 3, 4], 2) == [9, 2]  # 2 3 4: longer than 3 4
    assert PromptLookup().propose([1, 2, 3], 4) == []
    assert PromptLookup(longest=2, shortest=2).propose([1, 2, 1, 3, 1], 4) == []  # a 1-gram is too short here


def test_acceptance_by_position():
    stats = SpeculationStats()
    stats.record(3, 1)
    stats.record(2, 2)
    stats.record(4, 0)
    assert (stats.drafted, stats.accepted, stats.verifications) == (9, 3, 3)
    assert stats.rates() == [2 / 3, 1 / 3, 0.0, 0.0]
    assert "9 drafted, 3 accepted (33.3%)" in stats.summary()


def test_plain_decoding_counts_no_speculation(each_kind):
    engine, _ = each_kind
    stats = GenerationStats()
    list(generate_tokens(engine.model, PROMPT, 3, stats=stats, sampler=Sampler(SamplingParams(), "cpu")))
    assert stats.speculation is None


def test_the_cli_speculates_and_counts(tiny_mixtral):
    args = ["generate", str(tiny_mixtral), "-p", "abcabcabc", "-n", "12", "--device", "cpu", "--expert-slots", "4"]
    plain = CliRunner().invoke(main, args)
    speculative = CliRunner().invoke(main, [*args, "--speculative", "lookup", "--draft-tokens", "3", "--stats"])
    assert plain.exit_code == speculative.exit_code == 0, speculative.output
    assert speculative.stdout == plain.stdout
    assert "speculation: " in speculative.stderr and "experts loaded per decoded token" in speculative.stderr
    assert "speculative: lookup, up to 3 drafted tokens per check" in speculative.stderr
    report = json.loads(CliRunner().invoke(main, [*args, "--speculative", "lookup", "--json"]).stdout)
    assert report["speculation"]["drafted"] >= report["speculation"]["accepted"] >= 0
    assert report["experts_loaded_per_token"] > 0


BAD_FLAGS = [
    (["--speculative", "mtp"], "--speculative mtp drafts with the checkpoint's multi-token-prediction layers"),
    (["--draft-tokens", "3"], "--draft-tokens sets how many tokens speculative decoding drafts"),
    (["--speculative", "off", "--draft-tokens", "3"], "which is off: add --speculative lookup or mtp"),
    (["--speculative", "lookup", "--draft-tokens", "0"], "--draft-tokens"),
    (["--speculative", "lookup", "--draft-tokens", "-2"], "--draft-tokens"),
    (["--speculative", "lookup", "--draft-tokens", "65"], "--draft-tokens"),
    (["--speculative", "lookup", "--draft-tokens", str(10**30)], "--draft-tokens"),
    (["--speculative", "lookup", "--draft-tokens", "four"], "--draft-tokens"),
    (["--speculative", "maybe"], "--speculative"),
]
# the commands that take the flags, with what each needs beside them
COMMANDS = {"generate": ["-p", "hi"], "chat": [], "serve": [], "bench": ["--tokens", "2"]}


@pytest.mark.parametrize("flags,needle", BAD_FLAGS)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_bad_speculative_flags_are_one_line(tiny_mixtral, command, flags, needle):
    args = [command, str(tiny_mixtral), *COMMANDS[command], "--device", "cpu", *flags]
    result = CliRunner().invoke(main, args, input="")
    assert result.exit_code == 2 and needle in result.stderr.strip().splitlines()[-1], result.output
    assert "Traceback" not in result.stderr


def test_serve_takes_the_speculative_flags(tiny_mixtral, monkeypatch):
    """`serve` hands them to the engine it serves (the server is not started: uvicorn.run is recorded)."""
    import uvicorn

    from localmoe import cli, server

    engines, real = [], server.Server.__init__

    def record(self, engine, *args, **kwargs):
        engines.append(engine)
        real(self, engine, *args, **kwargs)

    monkeypatch.setattr(server.Server, "__init__", record)
    monkeypatch.setattr(uvicorn, "run", lambda app, **settings: None)
    monkeypatch.setattr(cli, "_exit_on_sigterm_as_on_ctrl_c", lambda: None)
    flags = ["--speculative", "lookup", "--draft-tokens", "2"]
    result = CliRunner().invoke(main, ["serve", str(tiny_mixtral), "--device", "cpu", *flags])
    assert result.exit_code == 0, result.output
    assert engines[0].speculative == "lookup" and engines[0].options.draft_tokens == 2


def test_chat_turns_speculate_exactly(chat_model):
    """Piped turns, offloaded, with prompt lookup: the answers of plain decoding, and /stats shows the drafts and
    the experts loaded per decoded token."""
    args = ["chat", str(chat_model), "--device", "cpu", "-n", "8", "--expert-slots", "6", "--temperature", "0"]
    turns = "la la la la la la\nla la la\n/stats\n"
    plain = CliRunner().invoke(main, args, input=turns)
    speculative = CliRunner().invoke(main, [*args, "--speculative", "lookup", "--draft-tokens", "3"], input=turns)
    assert plain.exit_code == speculative.exit_code == 0, speculative.output
    assert speculative.stdout == plain.stdout and len(plain.stdout.strip().splitlines()) >= 2
    assert "speculation: " in speculative.stderr and "experts loaded per decoded token" in speculative.stderr
    assert "speculation: " not in plain.stderr


def test_the_python_api_takes_the_settings(tiny_mixtral):
    bad = [
        ({"speculative": "maybe"}, "unknown speculative"),
        ({"speculative": "lookup", "draft_tokens": 65}, "1 to 64"),
    ]
    for given_settings, needle in bad:
        with pytest.raises(localmoe.LocalMoEError, match=needle):
            localmoe.load(str(tiny_mixtral), device="cpu", **given_settings)
    engine = localmoe.load(str(tiny_mixtral), device="cpu", speculative="lookup", draft_tokens=2)
    plain = localmoe.load(str(tiny_mixtral), device="cpu")
    assert engine.speculative == "lookup" and plain.speculative == "off"
    assert engine.generate("abcabcabc", 10) == plain.generate("abcabcabc", 10)
    assert engine.stats.speculation is not None and plain.stats.speculation is None
    assert len(engine.stats.speculation.drafted_at) <= 2


def test_bench_measures_with_and_without_speculation(tiny_mixtral):
    args = ["bench", str(tiny_mixtral), "--device", "cpu", "--expert-slots", "4", "--tokens", "6"]
    result = CliRunner().invoke(main, [*args, "--speculative", "lookup"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.startswith("localmoe")]
    assert [row.split("  ")[0] for row in rows] == ["localmoe", "localmoe, speculative lookup"]
    assert "accepted" in result.stdout and "loaded/token" in result.stdout


def test_metrics_count_the_drafts(chat_model):
    engine = localmoe.load(str(chat_model), device="cpu", expert_slots=6, speculative="lookup")
    with serve_app(Server(engine, "tiny", None, queue_size=2, max_tokens_limit=500).app()) as port:
        body = json.dumps({"model": "tiny", "prompt": "la la la la la", "max_tokens": 8, "temperature": 0})
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200, response.read()
        response.read()
        connection.request("GET", "/metrics")
        metrics = connection.getresponse().read().decode()
        connection.close()
    assert "localmoe_draft_tokens_total " in metrics and "localmoe_draft_tokens_accepted_total " in metrics
    assert "localmoe_verifications_total " in metrics and "localmoe_experts_loaded_per_token " in metrics


@pytest.fixture(scope="module", params=list(RELEASES))
def mtp_release(request, tmp_path_factory):
    return RELEASES[request.param](tmp_path_factory.mktemp(request.param)).folder


class ForcedMtp(Drafter):
    """A test double of the MTP drafter: the engine's runs its layers in every round as it would (their caches
    and routed experts see what they would), and the round's draft is the script's."""

    reads_hidden = True

    def __init__(self, mtp: MtpDrafter, script: Drafter):
        self.mtp, self.script = mtp, script

    def observe(self, start, kept, hidden):
        self.mtp.observe(start, kept, hidden)

    def rewind(self, pos):
        self.mtp.rewind(pos)

    def propose(self, tokens, limit):
        self.mtp.propose(tokens, limit)
        return self.script.propose(tokens, limit)


def test_mtp_speculates_exactly(mtp_release):
    """On by default where the checkpoint has MTP layers; the plain tokens all-resident and offloaded (the MTP
    layer's experts through the expert cache too) with the fewest slots and a middling number, with the MTP
    layers' own drafts and with drafts all rejected and all kept (the MTP layers running all the same)."""
    plain = localmoe.load(str(mtp_release), device="cpu", dtype=torch.float32, speculative="off")
    expected = list(plain.generate_ids(PROMPT, NEW))
    engine = localmoe.load(str(mtp_release), device="cpu", dtype=torch.float32)
    assert engine.speculative == "mtp" and "speculative: mtp" in engine.summary()
    assert_plain(plain.model, PROMPT, list(engine.generate_ids(PROMPT, NEW)), expected)
    assert engine.stats.speculation.drafted > 0
    fp = plain.plan.footprint
    settings = [(fp.top_k, "direct", always_wrong), ((fp.top_k + fp.total_experts) // 2, "copy", always_right)]
    for slots, miss_policy, script in settings:
        options = RuntimeOptions(expert_slots=slots, miss_policy=miss_policy, speculative="mtp", draft_tokens=3)
        offloaded = localmoe.load(str(mtp_release), device="cpu", dtype=torch.float32, options=options)
        assert_plain(plain.model, PROMPT, list(offloaded.generate_ids(PROMPT, NEW)), expected)
        forced = ForcedMtp(offloaded.new_drafter(), script(expected, vocab(plain)))
        got = list(offloaded.generate_ids(PROMPT, NEW, drafter=forced))
        assert_plain(plain.model, PROMPT, got, expected)
        if got == expected:  # (else a token rounding decides was kept, and the script's drafts go wrong after it)
            assert offloaded.stats.speculation.acceptance_rate == (script is always_right)


def test_without_mtp_drafts_the_mtp_layers_are_not_loaded(mtp_release):
    """Speculation off or by lookup: the MTP layers would only take memory, slots and prefetches."""
    with_mtp = localmoe.load(str(mtp_release), device="cpu", dtype=torch.float32)
    for speculative in ("off", "lookup"):
        engine = localmoe.load(str(mtp_release), device="cpu", dtype=torch.float32, speculative=speculative)
        assert engine.model.mtp is None
        routed = len(moe_blocks(with_mtp.model.mtp))
        assert engine.plan.footprint.moe_layers == with_mtp.plan.footprint.moe_layers - routed
        assert not any(name.startswith("mtp.") for name, _ in engine.model.named_parameters())


def test_mtp_drafts_are_the_layers_run_on_the_sequence(mtp_release):
    """The drafter's first drafts after the prompt: layer 0 over the target's hidden states at every prompt
    position and the tokens after them, each next layer over the previous one's outputs and the tokens
    after those (the last ones drafted), then the last layer on at the next positions, fed its own output
    and its draft."""
    engine = localmoe.load(str(mtp_release), device="cpu", dtype=torch.float32)
    model, first = engine.model, list(engine.generate_ids(PROMPT, 1, speculative=False))
    layers, limit = len(model.mtp.layers), len(model.mtp.layers) + 2
    drafter = MtpDrafter(model, 64)
    with torch.no_grad():
        cache = model.new_cache(1, 64)
        _, h = model(torch.tensor([PROMPT]), cache, all_logits=True, hidden=True)
        drafter.observe(0, len(PROMPT), h[0])
        drafts = drafter.propose(PROMPT + first, limit)
        known, expected = PROMPT + first, []
        for depth in range(layers):
            mtp_cache = model.new_mtp_cache(1, 64, depth)
            following = (known[depth + 1 :] + expected)[: len(PROMPT)]
            logits, h = model.mtp_draft(h, torch.tensor([following]), mtp_cache, depth)
            expected.append(int(logits[0, -1].argmax()))
        while len(expected) < limit:
            logits, h = model.mtp_draft(h[:, -1:], torch.tensor([expected[-1:]]), mtp_cache, layers - 1)
            expected.append(int(logits[0, -1].argmax()))
    assert drafts == expected


class Recording(MtpDrafter):
    """The MTP drafter, keeping what it was asked in each round and the logits of its drafts then."""

    rounds: list

    def propose(self, tokens, limit):
        self.rounds = [*getattr(self, "rounds", []), (list(tokens), limit, [])]
        return super().propose(tokens, limit)

    def _step(self, h, following, depth):
        logits, h = super()._step(h, following, depth)
        self.rounds[-1][2].append(logits[0, -1])
        return logits, h


def test_mtp_drafts_after_rejections_are_those_of_the_kept_sequence(mtp_release):
    """After rounds of drafts partly rejected, the drafter's states hold only what the kept tokens give: in
    every round, its draft logits are those of a new drafter shown the whole kept sequence at once."""
    engine = localmoe.load(str(mtp_release), device="cpu", dtype=torch.float32)
    model = engine.model
    drafter = Recording(model, 64)
    list(engine.generate_ids(PROMPT, NEW, drafter=drafter, draft_tokens=3))
    stats = engine.stats.speculation
    assert stats.accepted < stats.drafted  # some were rejected (random weights)
    assert_drafts_of_the_kept_sequence(drafter, drafter.rounds[1:], 64)


def assert_drafts_of_the_kept_sequence(drafter: Recording, rounds: list, context: int) -> None:
    """In each of the `rounds` the drafter recorded, its draft logits are those of a new drafter shown the
    whole kept sequence at once."""
    model = drafter.model
    for tokens, limit, logits in rounds:
        fresh = Recording(model, context, drafts=drafter.depth)
        with torch.no_grad():
            _, h = model(torch.tensor([tokens[:-1]]), model.new_cache(1, context), all_logits=True, hidden=True)
        fresh.observe(0, len(tokens) - 1, h[0])
        fresh.propose(tokens, limit)
        drafting = max(drafter.depth, limit)  # the drafts' steps, the last ones of a round
        expected, logits = fresh.rounds[0][2][-drafting:], logits[-drafting:]
        assert len(expected) == len(logits) == drafting
        assert max((a - b).abs().max() for a, b in zip(expected, logits, strict=True)) < 1e-4, len(tokens)


def test_the_mtp_drafter_goes_on_from_turn_to_turn(mtp_release):
    """A conversation's next turn reuses the cache's prefix and the drafter its own caches: its drafts are
    then those of a new drafter shown the whole kept sequence, and the tokens those of plain decoding. Near
    the end of a turn, with fewer drafts asked than layers, every layer still runs (it could not catch up)."""
    engine = localmoe.load(str(mtp_release), device="cpu", dtype=torch.float32)
    model = engine.model
    cache, drafter = model.new_cache(1, 96), Recording(model, 96, drafts=3)
    first = list(generate_tokens(model, PROMPT, NEW, cache=cache, drafter=drafter, draft_tokens=3))
    follow = [*PROMPT, *first, 5, 6, 7]
    rounds = len(drafter.rounds)
    reuse = len(PROMPT) + NEW - 1  # the cache holds every token but the last chosen
    second = list(generate_tokens(model, follow, NEW, cache=cache, reuse=reuse, drafter=drafter, draft_tokens=3))
    assert_plain(model, follow, second, list(generate_tokens(model, follow, NEW)))
    assert drafter.first == 0 and len(drafter.rounds) > rounds  # the first turn's caches, kept
    assert_drafts_of_the_kept_sequence(drafter, drafter.rounds[rounds:], 96)


# --- static checks and MTP steps (what CUDA graphs capture) -------------------------------------------------

LONG = PROMPT * 4  # 60 tokens: decoding crosses the end of the first bucket (64 keys)


def eager_only(monkeypatch) -> None:
    """Every step eager: the speculative path of a model without static steps."""
    monkeypatch.setattr(CausalLM, "static_decode", property(lambda self: False))
    monkeypatch.setattr(CausalLM, "static_mtp", property(lambda self: False))


def counting_static_steps(monkeypatch) -> Counter:
    """Counts the static steps run, by kind."""
    kinds, call = Counter(), StaticSteps.__call__

    def counted(self, kind, step, **inputs):
        kinds[kind] += 1
        return call(self, kind, step, **inputs)

    monkeypatch.setattr(StaticSteps, "__call__", counted)
    return kinds


@pytest.fixture(scope="module")
def static_family_of(tmp_path_factory):
    """A family's tiny checkpoint (an MTP release where test_mtp has one), written when first asked for."""

    class Checkpoints(dict):
        def __missing__(self, family: str) -> str:
            folder = tmp_path_factory.mktemp(family)
            self[family] = path = (
                str(RELEASES[family](folder).folder) if family in RELEASES else checkpoint(family, folder)
            )
            return path

    return Checkpoints()


# keys and values, a window with sinks, latents with MTP layers, GLM-4.5's MTP layer
@pytest.fixture(params=["qwen3_moe", "gpt_oss", "deepseek_v3", "glm4_moe"])
def static_family(request, static_family_of):
    return static_family_of[request.param]


@pytest.mark.parametrize("placement", ["resident", "offloaded"])
def test_static_speculation_gives_the_plain_tokens_and_the_eager_path_s(static_family, placement, monkeypatch):
    """Checks (and MTP steps) as static steps: the plain tokens, as the eager path gives them, all-resident
    and offloaded (misses read in place, the policy CUDA graphs take), across the first bucket's end and
    up to the context's end (the cache holds the prompt and the new tokens, no more: the last drafts are
    cut short), with drafts of every length (scripted, prompt lookup) or the checkpoint's MTP layers."""
    plain = localmoe.load(static_family, device="cpu", dtype=torch.float32, speculative="off")
    expected = list(plain.generate_ids(LONG, NEW))
    slots = plain.plan.footprint.top_k if placement == "offloaded" else None
    options = RuntimeOptions(expert_slots=slots, miss_policy="direct" if slots else None)
    engine = localmoe.load(static_family, device="cpu", dtype=torch.float32, options=options)
    mtp = engine.speculative == "mtp"
    assert engine.model.static_decode and engine.model.static_mtp == mtp
    for make in [lambda: None] if mtp else [lambda: mixed(expected, vocab(engine), LONG), PromptLookup]:
        with monkeypatch.context() as patch:
            kinds = counting_static_steps(patch)
            assert_plain(plain.model, LONG, list(engine.generate_ids(LONG, NEW, drafter=make())), expected)
        assert kinds["check"] >= engine.stats.speculation.verifications > 0 and (kinds["mtp"] > 0) == mtp
        with monkeypatch.context() as patch:
            eager_only(patch)
            kinds = counting_static_steps(patch)
            assert_plain(plain.model, LONG, list(engine.generate_ids(LONG, NEW, drafter=make())), expected)
        assert not kinds


class DecodeLaunches(LaunchCounter):
    """The kernel-launching ops of the decode steps: from the end of the prefill on."""

    decoding = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.decoding:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


def launches_per_token(engine, drafter, monkeypatch, graphs: bool) -> float:
    """Ops launched per decoded token; with `graphs`, a static step that a graph would replay counts as one."""
    counter = DecodeLaunches()
    with monkeypatch.context() as patch:
        if graphs:
            patch.setattr(StaticSteps, "_run", counter.as_one(StaticSteps._run))
        else:
            eager_only(patch)
        with counter:
            tokens = list(
                engine.generate_ids(LONG, NEW, drafter=drafter, on_prefill=lambda: setattr(counter, "decoding", True))
            )
    return sum(counter.ops.values()) / (len(tokens) - 1)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_captured_checks_launch_a_fraction_of_the_eager_ops(static_family_of, family, monkeypatch):
    """Machine-independent: kernel-launching ops per decoded token, speculative, every step eager against
    static steps counted as one launch each (what a CUDA graph's replay is), the rest (sampling, copies
    into the steps' buffers, the drafter's host work) counted as it runs."""
    engine = localmoe.load(static_family_of[family], device="cpu", dtype=torch.float32)
    drafter = (lambda: None) if engine.speculative == "mtp" else PromptLookup
    eager = launches_per_token(engine, drafter(), monkeypatch, graphs=False)
    captured = launches_per_token(engine, drafter(), monkeypatch, graphs=True)
    print(f"{family}: {eager:.0f} ops per decoded token eager, {captured:.0f} with the static steps captured")
    assert captured * 10 < eager


def test_static_checks_cut_back_window_rings(static_family_of):
    """gpt-oss's windows of 8 in rings (a context past 1032 positions): static checks write the drafts'
    positions into the rings, and the rollback drops the rejected ones; the plain tokens."""
    model = localmoe.load(static_family_of["gpt_oss"], device="cpu", dtype=torch.float32).model
    expected = list(generate_tokens(model, LONG, NEW, cache=model.new_cache(1, 1100)))
    cache = model.new_cache(1, 1100)
    assert type(cache.layers[0]).__name__ == "WindowKV"
    drafter = mixed(expected, model.model.embed_tokens.weight.shape[0], LONG)
    got = list(generate_tokens(model, LONG, NEW, cache=cache, drafter=drafter, draft_tokens=3))
    assert_plain(model, LONG, got, expected)


def test_the_summary_says_what_speculation_runs_as_static_steps(static_family_of, monkeypatch):
    """Checks and MTP drafts run static where the model's layers do (captured where decode steps are:
    nothing in `graphs_barred` is about speculation); where the MTP layers cannot, `drafts_barred` and
    the summary say so; where the backbone cannot, `graphs_barred` says why."""
    engine = localmoe.load(static_family_of["deepseek_v3"], device="cpu", dtype=torch.float32)
    assert engine.drafts_barred() == [] and "not on CUDA" in engine.graphs_barred()
    assert not any(word in reason for reason in engine.graphs_barred() for word in ("specul", "draft", "MTP"))
    assert "(checks: static steps; MTP drafts: static steps)" in engine.summary()
    monkeypatch.setattr(CausalLM, "static_mtp", property(lambda self: False))
    assert engine.drafts_barred() == ["an MTP layer has no static steps"]
    assert "MTP drafts: eager (an MTP layer has no static steps)" in engine.summary()
    eager_only(monkeypatch)
    assert engine.drafts_barred() == [] and "(checks: eager; MTP drafts: eager)" in engine.summary()
    barred = localmoe.load(static_family_of["deepseek_v3"], device="cpu", dtype=torch.float32).graphs_barred()
    assert "the model has layers without static steps" in barred
