"""Routing profiles: kept across runs, bounded, refused when they belong to another model or are broken."""

import threading
from collections import Counter
from pathlib import Path

import pytest

from localmoe import files
from localmoe.errors import LocalMoEError
from localmoe.files import locked
from localmoe.runtime import profile as profiles
from localmoe.runtime.profile import RoutingProfile, merge_into, read_profile


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


BROKEN = ["{", '{"format": 99}', '{"format": 1, "tokens": {"0": 1}, "counts": {"0": "x"}}', "[]", "[" * 100_000]


@pytest.mark.parametrize("text", BROKEN)
def test_a_broken_profile_of_the_users_is_refused_in_one_line_and_left_alone(tmp_path, text):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(LocalMoEError) as refused:
        read_profile(path, own=False, layers={0}, num_experts=4)
    message = str(refused.value)
    assert "is not a routing profile" in message and str(path) in message and "\n" not in message
    assert "delete" not in message  # the file is the user's: it may be anything of theirs
    assert path.read_text() == text


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero here")
def test_an_endless_file_is_read_no_further_than_a_profile_can_be(monkeypatch):
    monkeypatch.setattr(profiles, "MAX_BYTES", 1000)
    with pytest.raises(LocalMoEError, match="/dev/zero is not a routing profile .*larger than"):
        read_profile(Path("/dev/zero"), own=False, layers={0}, num_experts=4)


@pytest.mark.parametrize("text", BROKEN)
def test_localmoe_replaces_its_own_broken_profile_with_a_notice(tmp_path, text, capsys):
    path = tmp_path / "p.json"
    path.write_text(text)
    assert read_profile(path, own=True, layers={0}, num_experts=4) == RoutingProfile()
    assert "is not a routing profile" in capsys.readouterr().err
    merge_into(path, Counter({(0, 1): 2}), 1, own=True, layers={0}, num_experts=4)
    assert RoutingProfile.load(path).counts == {(0, 1): 2}


def test_a_profile_of_another_model_is_refused(tmp_path):
    profile = RoutingProfile(Counter({4: 1}), Counter({(4, 9): 1}))
    with pytest.raises(LocalMoEError, match="recorded for another model .*expert 9 of MoE layer 4"):
        profile.check({1, 4}, 8, tmp_path / "p.json")
    profile.check({1, 4}, 10, tmp_path / "p.json")
    profile.save(tmp_path / "p.json")
    with pytest.raises(LocalMoEError, match="recorded for another model"):
        read_profile(tmp_path / "p.json", own=False, layers={1, 4}, num_experts=8)
    # localmoe's own profile of a checkpoint that was replaced by another model at the same path: start again
    assert read_profile(tmp_path / "p.json", own=True, layers={1, 4}, num_experts=8) == RoutingProfile()


def test_runs_that_save_at_once_merge_their_counts(tmp_path):
    """A run saving while another holds the profile's lock waits, then adds its counts to what the
    other wrote: none is lost."""
    path, waiting = tmp_path / "p.json", threading.Event()
    RoutingProfile(Counter({0: 1}), Counter({(0, 0): 1})).save(path)

    def second_run():
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(files, "_stderr", lambda message: waiting.set())
            merge_into(path, Counter({(0, 2): 5}), 1, own=True, layers={0}, num_experts=4)

    with locked(path):
        thread = threading.Thread(target=second_run)
        thread.start()
        assert waiting.wait(timeout=120)
        # the first run's save, made while the second waits
        first = RoutingProfile.load(path)
        first.add(Counter({(0, 1): 3}), 1)
        first.save(path)
    thread.join(timeout=120)
    assert RoutingProfile.load(path).counts == {(0, 0): 1, (0, 1): 3, (0, 2): 5}
