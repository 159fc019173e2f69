"""What only a CUDA machine can check: the current device follows --device cuda:N, the mmap tier's reader
thread, and misses read over the bus, each giving the all-resident tokens. Skipped without CUDA."""

import threading

import pytest
import torch
from conftest import TINY_FAMILIES, hf_model, save_hf

import localmoe
from localmoe.engine import RuntimeOptions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
PROMPT = list(range(3, 27))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    config_class, config = TINY_FAMILIES["qwen3_moe"]
    return str(save_hf(hf_model(config_class, **config), tmp_path_factory.mktemp("qwen3"), "sharded"))


def tokens(path: str, device: str = "cuda", **options) -> list[int]:
    engine = localmoe.load(path, device=device, dtype=torch.float32, options=RuntimeOptions(profile=None, **options))
    try:
        return list(engine.generate_ids(PROMPT, 12))
    finally:
        engine.close()


@pytest.mark.parametrize(
    "options",
    [
        {"expert_slots": 4, "miss_policy": "direct"},
        {"expert_slots": 4, "miss_policy": "copy"},
        {"expert_slots": 4, "miss_policy": "copy", "host_budget": 1},  # the mmap tier, through the reader thread
    ],
    ids=["direct", "copy", "mmap"],
)
def test_offloaded_on_cuda_gives_the_all_resident_tokens(checkpoint, options):
    assert tokens(checkpoint, **options) == tokens(checkpoint)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_n_is_the_current_device_of_the_loading_thread_and_of_a_worker(checkpoint):
    engine = localmoe.load(checkpoint, device="cuda:1", options=RuntimeOptions(expert_slots=4, profile=None))
    assert torch.cuda.current_device() == 1
    seen = []

    def worker():
        engine.use_device()
        seen.append(torch.cuda.current_device())
        list(engine.generate_ids(PROMPT, 4))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [1]


def test_host_tables_on_cuda_give_the_same_tokens(tmp_path_factory):
    """Qwen4-Exp's n-gram tables stay on the host, their gathered rows copied over from pinned memory without
    waiting: mapped from the shards with offloaded experts, the tokens of the tables in RAM with every
    expert resident."""
    from localmoe.models.layers import host_tables

    config_class, config = TINY_FAMILIES["qwen4_exp_text"]
    path = str(save_hf(hf_model(config_class, **config), tmp_path_factory.mktemp("qwen4"), "sharded"))
    engine = localmoe.load(path, device="cuda", dtype=torch.float32, options=RuntimeOptions(profile=None))
    try:
        tables = host_tables(engine.model).values()
        assert tables and {block.device.type for table in tables for block in table.blocks} == {"cpu"}
        ids = torch.tensor([[0, 5, 70]], device="cuda")
        table = next(iter(tables))
        assert torch.equal(table(ids).cpu(), torch.cat(table.blocks)[ids.cpu()])
    finally:
        engine.close()
    assert tokens(path) == tokens(path, expert_slots=2, host_budget=1)
