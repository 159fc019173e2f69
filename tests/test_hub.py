"""A Hub model through huggingface_hub's own code, against a Hub on loopback (tests/fake_hub.py): `plan`
reads the shards' headers and no shard body; a loaded model is named by its repo id."""

import os
import subprocess
import sys

import pytest
from conftest import MIXTRAL, hf_model
from fake_hub import FakeHub

from localmoe.demo import byte_level_tokenizer

REPO = "someone/tiny-moe"
PLAN = ["--device", "cpu", "--vram-budget", "2MiB", "--host-budget", "1GiB"]

pytestmark = pytest.mark.slow  # processes that import torch


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny Mixtral in shards of about 300 kB: more than the 100 kB huggingface_hub reads of a header."""
    folder = tmp_path_factory.mktemp("hub") / "model"
    hf_model("MixtralConfig", **MIXTRAL).save_pretrained(folder, max_shard_size="300KB")
    byte_level_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


def localmoe(*args: str, hub: FakeHub, home, offline: bool = False) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(home / "hf"),
        "LOCALMOE_CACHE": str(home / "localmoe"),
        "HF_HUB_DISABLE_XET": "1",
        **({"HF_HUB_OFFLINE": "1"} if offline else {}),
    }
    return subprocess.run([sys.executable, "-m", "localmoe", *args], env=env, capture_output=True, text=True)


def test_plan_reads_the_shard_headers_and_no_shard(checkpoint, tmp_path):
    shards = {p.name: p.stat().st_size for p in checkpoint.glob("*.safetensors")}
    with FakeHub(REPO, checkpoint) as hub:
        planned = localmoe("plan", REPO, *PLAN, hub=hub, home=tmp_path)
        assert planned.returncode == 0, planned.stderr
        reads = [r for r in hub.requests if r.path in shards and r.method == "GET"]
        assert {r.path for r in reads} == set(shards)  # every header read...
        for read in reads:  # ...by a range request, and nothing beyond the first 100 kB of a shard
            assert read.range is not None and read.sent <= 100_001 < shards[read.path]
        assert sum(r.sent for r in reads) < sum(shards.values()) / 2
        assert not list((tmp_path / "hf" / "hub" / "models--someone--tiny-moe").rglob("*.safetensors"))
        local = localmoe("plan", str(checkpoint), *PLAN, hub=hub, home=tmp_path)
        assert planned.stdout == local.stdout  # the same plan as from the files themselves

        offline = localmoe("plan", REPO, *PLAN, hub=hub, home=tmp_path, offline=True)
        assert offline.returncode == 2 and "Traceback" not in offline.stderr
        assert offline.stderr.strip().splitlines()[-1].startswith("localmoe: error: the shards of someone/tiny-moe")


def test_a_hub_model_is_named_by_its_repo_id(checkpoint, tmp_path):
    with FakeHub(REPO, checkpoint) as hub:
        args = ["-p", "Hi", "-n", "2", "--device", "cpu", "--expert-slots", "4", "--expert-bits", "8"]
        result = localmoe("generate", REPO, *args, hub=hub, home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"\n{REPO}: MixtralForCausalLM on cpu" in "\n" + result.stderr
    [profile] = (tmp_path / "localmoe" / "profiles").glob("*.json")
    [quantized] = (p for p in (tmp_path / "localmoe" / "quantized").iterdir() if p.is_dir())
    assert profile.name.startswith("someone--tiny-moe-") and quantized.name.startswith("someone--tiny-moe-")
