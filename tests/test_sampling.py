"""Sampling: reproducible with a seed, top-k 1 is greedy, filters never let a banned token through,
and the checkpoint's generation_config supplies the defaults."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from localmoe.errors import LocalMoEError
from localmoe.runtime.sampling import Sampler, SamplingParams, allowed_probabilities, penalize_repetition

CPU = torch.device("cpu")
NOTHING_SEEN = torch.tensor([], dtype=torch.long)


def draws(params: SamplingParams, logits: torch.Tensor, n: int = 200) -> list[int]:
    sampler = Sampler(params, CPU)
    return [int(sampler(logits, NOTHING_SEEN)) for _ in range(n)]


def test_same_seed_same_tokens():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, seed=7)
    assert draws(params, logits) == draws(params, logits)
    assert draws(params, logits) != draws(SamplingParams(temperature=1.0, seed=8), logits)


def test_top_k_one_and_temperature_zero_are_greedy():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    best = int(logits.argmax())
    assert set(draws(SamplingParams(temperature=1.5, top_k=1, seed=0), logits)) == {best}
    assert set(draws(SamplingParams(temperature=0.0), logits)) == {best}


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    counts = torch.bincount(torch.tensor(draws(SamplingParams(temperature=1.0, seed=3), logits, 3000)), minlength=3)
    assert torch.allclose(counts / 3000, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    top_k=st.integers(0, 20),
    top_p=st.floats(0.05, 1.0),
    min_p=st.floats(0.0, 0.9),
)
def test_filters_only_allow_their_sets(seed, top_k, top_p, min_p):
    logits = torch.randn(40, generator=torch.Generator().manual_seed(seed)) * 3
    probs = allowed_probabilities(logits, top_k, top_p, min_p)
    allowed = set(torch.nonzero(probs).flatten().tolist())
    assert allowed and int(logits.argmax()) in allowed
    order = logits.argsort(descending=True).tolist()
    if top_k:
        assert allowed <= set(order[:top_k])
    full = logits.softmax(-1)
    if top_p < 1:
        # every allowed token is in the smallest top set whose mass reaches top_p
        mass, needed = 0.0, set()
        for token in order:
            needed.add(token)
            mass += float(full[token])
            if mass >= top_p - 1e-5:  # the sampler sums float32 probabilities: a tail within 1e-5 may stay
                break
        assert allowed <= needed
    if min_p and not top_k and top_p == 1:
        assert all(full[t] >= min_p * full.max() - 1e-7 for t in allowed)
    sampled = draws(SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed), logits, 50)
    assert set(sampled) <= allowed


def test_repetition_penalty_as_transformers_applies_it():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = penalize_repetition(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]


def test_defaults_from_generation_config():
    assert SamplingParams.from_generation_config({}).greedy
    config = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "repetition_penalty": 1.1}
    params = SamplingParams.from_generation_config(config)
    assert (params.temperature, params.top_k, params.top_p, params.repetition_penalty) == (0.6, 20, 0.95, 1.1)
    overridden = SamplingParams.from_generation_config(config, temperature=0.0, top_k=None, seed=5)
    assert overridden.greedy and overridden.top_k == 20 and overridden.seed == 5


@pytest.mark.parametrize("bad", [{"temperature": -1.0}, {"top_p": 0.0}, {"min_p": 1.0}, {"repetition_penalty": 0.0}])
def test_bad_settings_are_one_line_errors(bad):
    with pytest.raises(LocalMoEError):
        SamplingParams.from_generation_config({}, **bad)


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": float("nan")},
        {"repetition_penalty": float("nan")},
        {"top_p": float("nan")},
        {"presence_penalty": 3.0},
        {"frequency_penalty": float("nan")},
        {"logit_bias": ((1, 101.0),)},
        {"seed": 2**70},
        {"temperature": "hot"},
    ],
)
def test_nan_and_out_of_range_values_are_refused(bad):
    with pytest.raises(LocalMoEError, match=next(iter(bad))):
        SamplingParams.check_overrides(**bad)


def test_a_bad_checkpoint_default_names_generation_config():
    with pytest.raises(LocalMoEError, match="generation_config.json: temperature"):
        SamplingParams.from_generation_config({"do_sample": True, "temperature": float("nan")})
    # overridden, the bad default no longer matters
    assert SamplingParams.from_generation_config({"do_sample": True, "temperature": float("nan")}, temperature=0.5)


def test_presence_and_frequency_penalties_count_the_output_only():
    logits = torch.zeros(5)
    seen = torch.tensor([3, 3, 1, 1, 1, 2])  # the prompt is [3, 3]: the first call's ids
    sampler = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), CPU)
    sampler(logits, seen[:2])
    adjusted = sampler._adjusted(logits, seen)
    assert adjusted.tolist() == [0.0, -(0.5 + 3 * 0.25), -(0.5 + 0.25), 0.0, 0.0]


def test_logit_bias_moves_the_choice():
    logits = torch.tensor([3.0, 0.0, 1.0])
    assert int(Sampler(SamplingParams(logit_bias=((1, 5.0),)), CPU)(logits, NOTHING_SEEN)) == 1
    assert int(Sampler(SamplingParams(logit_bias=((0, -100.0),)), CPU)(logits, NOTHING_SEEN)) == 2


def test_the_record_holds_the_log_softmax_of_the_raw_logits():
    logits = torch.randn(30, generator=torch.Generator().manual_seed(4))
    params = SamplingParams(temperature=0.7, top_k=3, repetition_penalty=1.3, seed=1)
    sampler = Sampler(params, CPU, top_logprobs=5)
    token = int(sampler(logits, torch.tensor([0, 1])))
    [step] = sampler.steps
    expected = logits.log_softmax(-1)
    assert step.token == token and step.logprob == pytest.approx(float(expected[token]))
    assert [t for t, _ in step.top] == expected.topk(5).indices.tolist()


class OnlyEven:
    """A constraint that allows even token ids, and is finished after two tokens."""

    def __init__(self):
        self.accepted, self.finished = [], False

    def mask(self, logits):
        return logits.masked_fill(torch.arange(logits.numel()) % 2 == 1, float("-inf"))

    def accept(self, token):
        self.accepted.append(token)
        self.finished = len(self.accepted) == 2


def test_a_constraint_masks_before_sampling_and_follows_the_choice():
    constraint = OnlyEven()
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0), CPU, constraint=constraint)
    logits = torch.tensor([0.0, 9.0, 0.0, 9.0])
    tokens = [int(sampler(logits, NOTHING_SEEN)) for _ in range(2)]
    assert all(t % 2 == 0 for t in tokens) and constraint.accepted == tokens and sampler.finished
