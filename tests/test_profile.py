"""Routing profiles: kept across runs, bounded, refused when they belong to another model or are broken."""

from collections import Counter

import pytest

from localmoe.errors import LocalMoEError
from localmoe.runtime import profile as profiles
from localmoe.runtime.profile import RoutingProfile


def test_saved_and_read_back(tmp_path):
    profile = RoutingProfile()
    profile.add(Counter({(1, 0): 3, (1, 2): 1, (3, 1): 4}), top_k=2)
    path = tmp_path / "p" / "profile.json"
    profile.save(path)
    again = RoutingProfile.load(path)
    assert again == profile and again.tokens == {1: 2, 3: 2}
    assert again.shares() == {(1, 0): 1.5, (1, 2): 0.5, (3, 1): 2.0}
    assert again.hottest() == [(3, 1), (1, 0), (1, 2)]
    assert [p.name for p in path.parent.iterdir()] == ["profile.json"]  # no temporary file left behind


def test_a_missing_profile_is_empty(tmp_path):
    assert RoutingProfile.load(tmp_path / "none.json") == RoutingProfile()


def test_counts_halve_past_the_horizon(monkeypatch):
    monkeypatch.setattr(profiles, "HORIZON", 10)
    profile = RoutingProfile()
    profile.add(Counter({(0, 0): 8, (0, 1): 4, (1, 0): 2}), top_k=1)
    assert profile.tokens == {0: 6, 1: 2} and profile.counts == {(0, 0): 4, (0, 1): 2, (1, 0): 2}


@pytest.mark.parametrize("text", ["{", '{"format": 99}', '{"format": 1, "tokens": {"0": 1}, "counts": {"0": "x"}}'])
def test_a_broken_profile_is_refused_in_one_line(tmp_path, text):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(LocalMoEError, match="is not a routing profile .*delete it"):
        RoutingProfile.load(path)


def test_a_profile_of_another_model_is_refused(tmp_path):
    profile = RoutingProfile(Counter({4: 1}), Counter({(4, 9): 1}))
    with pytest.raises(LocalMoEError, match="recorded for another model .*expert 9 of MoE layer 4"):
        profile.check({1, 4}, 8, tmp_path / "p.json")
    profile.check({1, 4}, 10, tmp_path / "p.json")
