"""The model against itself: incremental decode, chunked prefill and batching all equal one full forward."""

import pytest
import torch
from conftest import TINY_FAMILIES, hf_model, save_hf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import localmoe
from localmoe.models import state as layer_state

TOLERANCE = 1e-5
# Rounding that grows through the stack of a random model, not a mismatch: the chunked and the
# token-by-token delta rule round differently (Qwen3-Next's logits reach 7.4 here: 2e-4 is 3e-5 of
# them; Ling 3's reach 3.3, measured 6e-5 apart at most), Gemma 4 renormalises four times a layer, and
# Step-3.7's and MiniMax-M3's logits reach 6.1 and 7.4 through norms that scale by 1 + weight (measured
# 2.4e-5 and 1.1e-5 apart at most);
# Inkling 2's and Inkling 2 Loop's reach 2.5 through float32 mixes of block states and dynamic convolutions
# (measured 1.05e-5 and 1.6e-5 apart at most over 30 random chunkings).
LOOSER = {
    "qwen3.5": 1e-4,
    "qwen3-next": 2e-4,
    "gemma4-ring": 1e-4,
    "bailing-hybrid": 1e-4,
    "step3p7-ring": 1e-4,
    "minimax-m3": 1e-4,
    "inkling2-ring": 3e-5,
    "inkling2-loop-ring": 3e-5,
    # the chunked and the token-by-token delta rule again, through hyper-connections (logits reach 3.3:
    # measured 2.0e-5 apart at most over 60 random chunkings)
    "glm5-next": 1e-4,
    # and through Qwen4-Exp's gated hyper-connections and PLE (logits reach 3.4: measured 1.8e-5 apart at
    # most over 60 random chunkings)
    "qwen4-exp": 1e-4,
}

# name: (family in TINY_FAMILIES, overrides of its config, the rewind slack of windowed layers: small,
# so that they use rings)
MODELS = {
    "mixtral": ("mixtral", {}, None),
    # a window shorter than the sequence exercises the explicit-mask path of chunked prefill
    "mixtral-window": ("mixtral", {"sliding_window": 6}, None),
    "mixtral-window-ring": ("mixtral", {"sliding_window": 6}, 4),
    "qwen3": ("qwen3_moe", {"mlp_only_layers": [1]}, None),
    "deepseek-v3": ("deepseek_v3", {}, None),
    "gpt-oss-ring": ("gpt_oss", {}, 0),
    # lightning attention first: its state carries across chunks and blocks
    "minimax": ("minimax", {"layer_types": ["linear_attention", "full_attention"] * 2}, None),
    "qwen3.5": ("qwen3_5_moe_text", {}, None),
    "llama4-ring": ("llama4_text", {"num_experts_per_tok": 1, "attention_chunk_size": 5}, 2),
    "gemma4-ring": ("gemma4_text", {"sliding_window": 5}, 3),
    # the indexer picks 4 of the earlier tokens: its keys carry over chunks, its choice reaches shared layers
    "glm5": ("glm_moe_dsa", {"index_topk": 4}, None),
    # compressor windows that close inside and across chunks, and pending tokens carried between them
    "deepseek-v4": ("deepseek_v4", {}, None),
    "qwen3-next": ("qwen3_next", {}, None),
    "qwen3-vl-moe": ("qwen3_vl_moe_text", {}, None),
    # Mamba-2 state, keys and values without rotary, and blocks with no state
    "nemotron-h": ("nemotron_h", {}, None),
    "granite-h": ("granitemoehybrid", {"position_embedding_type": "rope"}, None),
    # short convolutions whose rings of past inputs rewind within their slack (4), or not (2)
    "lfm2-moe-ring": ("lfm2_moe", {}, 4),
    "lfm2-moe-short-ring": ("lfm2_moe", {}, 2),
    # Kimi Delta Attention (three convolution windows and a matrix) beside latent attention
    "kimi-linear": ("kimi_linear", {}, None),
    # rings of keys and values with a small slack, per-layer head counts, a global layer without rotary
    "laguna-ring": ("laguna", {}, 3),
    "afmoe-ring": ("afmoe", {}, 3),
    # rings of narrower values, on layers with sinks and twice the KV heads
    "mimo-v2-flash-ring": ("mimo_v2_flash", {}, 3),
    # windowed layers with their own head count in rings, global ones whole
    "step3p7-ring": ("step3p5", {}, 3),
    # block-sparse attention: the indexer's keys carry over chunks, its blocks span chunk boundaries
    "minimax-m3": ("minimax_m3_vl_text", {}, None),
    # keys and values beside rings of the convolutions' inputs and of the delayed values
    "zaya-ring": ("zaya", {}, 4),
    # rings of keys and values, of the key and value convolutions' inputs and of the layer outputs'
    # convolutions, with no rotary: positions from a relative bias
    "inkling-ring": ("inkling_text", {}, 4),
    # Inkling's states, with dynamic convolutions; block states carried between layers within a pass
    "inkling2-ring": ("inkling2_text", {}, 4),
    # the same, with the middle block looped three times, each pass on states of its own
    "inkling2-loop-ring": ("inkling2_loop_text", {}, 4),
    "bailing-hybrid": ("bailing_hybrid", {}, None),
    # Mamba-1 state (a convolution window and a state per channel) beside keys and values without rotary
    "jamba": ("jamba", {}, None),
    # queries from routed attention experts, keys and values shared by them
    "jetmoe": ("jetmoe", {}, None),
    # sinks in latent attention over chunks, the indexer's choice shared by later layers, hyper-connections
    "hy-v4": ("hy_v4", {"index_topk": 4}, None),
    # two latent attention states per layer, side by side
    "longcat-flash": ("longcat_flash", {}, None),
    # the indexer's blocks of four closing inside and across chunks, its choice shared by the next layer, the
    # query's own incomplete block; bounded Kimi Delta Attention; hyper-connections averaged at the end
    "glm5-next": ("glm5_next_text", {}, None),
    # PLE's n-gram tokens and dilated convolution across chunks, the QSA indexer's blocks closing inside and
    # across chunks, Gated DeltaNet, gated hyper-connections
    "qwen4-exp": ("qwen4_exp_text", {}, None),
}

# The chat rewind alone for families whose kinds of state MODELS already covers in depth:
# name: (family in TINY_FAMILIES, the rewind slack of windowed layers)
REWIND_ONLY = {
    "dots1-ring": ("dots1", 3),
    "solar-open": ("solar_open", None),
    "exaone-moe-ring": ("exaone_moe", 3),
    "hy-v3": ("hy_v3", None),
    "sarvam-moe": ("sarvam_moe", None),
    "deepseek-v32": ("deepseek_v32", None),
    "cohere2-moe-ring": ("cohere2_moe", 3),
    "glm4v-moe": ("glm4v_moe_text", None),
    "granitemoe": ("granitemoe", None),
    "granitemoeshared": ("granitemoeshared", None),
    # rings of keys and values on layers with sinks, some without position embeddings
    "granitemoe-swa-ring": ("granitemoe_swa", 3),
    "flex-olmo": ("flex_olmo", None),
    "dbrx": ("dbrx", None),
    "qwen3-omni-moe": ("qwen3_omni_moe_text", None),
    "aria-text": ("aria_text", None),
    "ernie4-5-vl-moe": ("ernie4_5_vl_moe_text", None),
    # latents of every position in sliding layers beside indexed ones
    "dots3-note": ("dots3_note_text", None),
    "axk1": ("axk1", None),
    "flint-ring": ("flint", 3),
    "hy-v4-vl": ("hy_v4_vl_text", None),
    "lara-mini-ring": ("lara_mini", 3),
    "mistral-large4": ("mistral_large4_text", None),
    "kolibri1-ring": ("kolibri1", 3),
    "beam-ring": ("beam", 3),
    "axk2": ("axk2", None),
    "muse-spark-ring": ("muse_spark_text", 3),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, tmp_path_factory):
    family, overrides, _ = MODELS[request.param]
    config_class, config = TINY_FAMILIES[family]
    folder = save_hf(hf_model(config_class, **{**config, **overrides}), tmp_path_factory.mktemp("m"), "sharded")
    return localmoe.load(str(folder), device="cpu", dtype=torch.float32).model


@pytest.fixture
def tolerance(request) -> float:
    return LOOSER.get(request.node.callspec.params["model"], TOLERANCE)


@pytest.fixture(scope="module", params=list(REWIND_ONLY))
def rewound(request, tmp_path_factory):
    config_class, config = TINY_FAMILIES[REWIND_ONLY[request.param][0]]
    folder = save_hf(hf_model(config_class, **config), tmp_path_factory.mktemp("r"), "sharded")
    return localmoe.load(str(folder), device="cpu", dtype=torch.float32).model


@pytest.fixture(autouse=True)
def rewind_slack(request, monkeypatch):
    """The model's rewind slack while the test allocates caches."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    slack = MODELS[params["model"]][2] if "model" in params else None
    if "rewound" in params:
        slack = REWIND_ONLY[params["rewound"]][1]
    if slack is not None:
        monkeypatch.setattr(layer_state, "REWIND_SLACK", slack)


def tokens(batch: int, length: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def full_forward(model, ids):
    return model(ids, model.new_cache(ids.shape[0], ids.shape[1]), all_logits=True)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=6))
def test_any_chunking_equals_full_forward(model, tolerance, chunks):
    """Prefill in pieces of any size, then decode: the same logits as one pass over everything."""
    ids = tokens(1, sum(chunks))
    expected = full_forward(model, ids)
    cache = model.new_cache(1, ids.shape[1])
    got, start = [], 0
    for size in chunks:
        got.append(model(ids[:, start : start + size], cache, all_logits=True))
        start += size
    assert cache.pos == ids.shape[1]
    assert (torch.cat(got, dim=1) - expected).abs().max().item() < tolerance


def test_batch_of_two_equals_each_alone(model, tolerance):
    ids = tokens(2, 10)
    batched = full_forward(model, ids)
    cache = model.new_cache(2, 14)
    model(ids, cache)
    steps = tokens(2, 4, seed=4)
    decoded = [model(steps[:, i : i + 1], cache) for i in range(4)]
    for row in range(2):
        alone = full_forward(model, torch.cat([ids[row : row + 1], steps[row : row + 1]], dim=1))
        assert (batched[row] - alone[0, :10]).abs().max().item() < tolerance
        for i, logits in enumerate(decoded):
            assert (logits[row, -1] - alone[0, 10 + i]).abs().max().item() < tolerance


def test_overrunning_the_allocated_context_is_an_error(model):
    cache = model.new_cache(1, 8)
    model(tokens(1, 6), cache)
    with pytest.raises(localmoe.LocalMoEError, match="do not fit the 8-token context"):
        model(tokens(1, 3), cache)


def test_rewinding_keeps_what_it_can(model, tolerance):
    """Keys and values can be kept for any prefix; a ring of them for a rewind up to its slack; a
    recurrent state only when nothing is dropped."""
    rewind_and_continue(model, tolerance)


def test_the_other_families_rewind_a_chat(rewound):
    rewind_and_continue(rewound, TOLERANCE)


def rewind_and_continue(model, tolerance: float) -> None:
    """Feed 14 tokens, rewind 3 as a chat does when the template re-renders the last reply, feed the rest:
    the logits of one pass over everything."""
    ids = tokens(1, 20)
    expected = full_forward(model, ids)
    cache = model.new_cache(1, 20)
    model(ids[:, :14], cache)
    assert cache.rewind(14) == 14
    kept = cache.rewind(14 - 3)
    assert kept == (0 if any(map(cannot_rewind(3), cache.layers)) else 11)
    got = model(ids[:, kept:], cache, all_logits=True)
    assert (got - expected[:, kept:]).abs().max().item() < tolerance


def test_a_check_is_cut_back_into(model, tolerance):
    """A forward pass that keeps its trail (a speculative check) can be cut back to any of its positions,
    recurrent states (into the state after that position) and DeepSeek-V4's pooled entries included."""
    ids = tokens(1, 20)
    expected = full_forward(model, ids)
    for keep in (13, 15, 17):  # not 12: a check keeps at least its first token
        cache = model.new_cache(1, 20)
        model(ids[:, :12], cache)
        model(ids[:, 12:18], cache, trail=True)
        kept = cache.rewind(keep)
        assert kept == (0 if any(map(cannot_rewind(18 - keep, into_check=True), cache.layers)) else keep)
        got = model(ids[:, kept:], cache, all_logits=True)
        assert (got - expected[:, kept:]).abs().max().item() < tolerance


def cannot_rewind(positions: int, into_check: bool = False):
    """Whether a state cannot be cut back `positions`; `into_check`: into a forward pass that kept its trail."""

    def test(state) -> bool:
        if isinstance(state, layer_state.CombinedState):
            return any(map(test, state.states.values()))
        if isinstance(state, (layer_state.WindowKV, layer_state.ConvRing)):
            return positions > layer_state.REWIND_SLACK
        return isinstance(state, (layer_state.RecurrentState, layer_state.CompressedKV)) and not into_check

    return test


def test_a_forward_cut_short_is_not_trusted(model, tolerance, monkeypatch):
    """Ctrl-C in the middle of a forward pass: some layers have taken the new tokens, others not."""
    ids = tokens(1, 12)
    expected = full_forward(model, ids)
    cache = model.new_cache(1, 12)
    model(ids[:, :6], cache)
    last = model.model.layers[-1]
    monkeypatch.setattr(last, "forward", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        model(ids[:, 6:], cache)
    monkeypatch.undo()
    kept = cache.rewind(6)
    plain_kinds = (layer_state.AttentionKV, layer_state.LatentKV, layer_state.NoState)
    parts = [part for state in cache.layers for part in getattr(state, "states", {"": state}).values()]
    plain = all(isinstance(state, plain_kinds) for state in parts)
    assert kept == (6 if plain else 0)
    got = model(ids[:, kept:], cache, all_logits=True)
    assert (got - expected[:, kept:]).abs().max().item() < tolerance
