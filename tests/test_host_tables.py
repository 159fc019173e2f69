"""Lookup tables kept in host memory (Qwen4-Exp's n-gram tables): never on the device, mapped from the
checkpoint's shards or copied into RAM as the plan says, and the same tokens either way."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TINY_FAMILIES, hf_model, save_hf

import localmoe
from localmoe.loader import footprint, load_resident_weights, model_skeleton, open_checkpoint
from localmoe.models.layers import host_tables
from localmoe.options import RuntimeOptions

PROMPT = [5, 17, 200, 3, 17, 200, 3, 41, 9, 250, 17, 200]


@pytest.fixture(scope="module")
def qwen4_exp(tmp_path_factory) -> str:
    config_class, config = TINY_FAMILIES["qwen4_exp_text"]
    return str(save_hf(hf_model(config_class, **config), tmp_path_factory.mktemp("qwen4"), "sharded"))


def skeleton(path: str):
    ckpt, family = open_checkpoint(path)
    return ckpt, model_skeleton(ckpt, family, torch.float32)


def table_sources(parts) -> dict[str, list[str]]:
    """Each host table's checkpoint tensors, block by block."""
    return {
        prefix: [parts.resident_sources[f"{prefix}.{name}"] for name, _ in table.named_parameters()]
        for prefix, table in host_tables(parts.model).items()
    }


def mapped_file(address: int) -> Path | None:
    """The file whose mapping holds `address` in this process (Linux), or None."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *_, path = line.split(maxsplit=5)
        low, high = (int(end, 16) for end in span.split("-"))
        if low <= address < high:
            return Path(path) if path.startswith("/") else None
    return None


def test_the_plan_counts_the_tables_as_host_memory(qwen4_exp):
    ckpt, parts = skeleton(qwen4_exp)
    sources = table_sources(parts)
    table_bytes = sum(ckpt.info(name).nbytes for names in sources.values() for name in names)  # float32 as stored
    every = sum(p.numel() * 4 for p in parts.model.parameters())
    fp = footprint(parts)
    assert len(sources) == 2 and fp.host_table_bytes == table_bytes
    assert fp.resident_bytes == every - table_bytes
    assert fp.lookup_bytes < fp.resident_bytes  # the tables are no resident embedding either


@pytest.mark.parametrize("tables", ["mmap", "ram"])
def test_the_tables_never_reach_the_device(qwen4_exp, tables):
    """Loaded for the `meta` device, every weight is there but the tables' rows, which stay on the host:
    mapped from the shards (the mapping itself, no copy) or copied into RAM; a lookup gathers the rows
    its ids name, in either block."""
    ckpt, parts = skeleton(qwen4_exp)
    sources = table_sources(parts)
    load_resident_weights(parts, ckpt, "meta", tables)
    assert {p.device.type for p in parts.model.parameters()} == {"meta"}
    assert not any("ngram_embedding" in name for name, _ in parts.model.named_parameters())
    for prefix, table in host_tables(parts.model).items():
        stored = [ckpt.tensor(name) for name in sources[prefix]]
        for block, tensor in zip(table.blocks, stored, strict=True):
            assert block.device.type == "cpu" and torch.equal(block, tensor)
            mapped = block.data_ptr() == tensor.data_ptr()
            assert mapped == (tables == "mmap")
            if mapped:
                assert mapped_file(block.data_ptr()).parent == Path(qwen4_exp)
        whole = torch.cat(stored)
        ids = torch.tensor([[0, table.per_part - 1, table.per_part, whole.shape[0] - 1, 7]])
        assert torch.equal(table(ids), whole[ids])


def test_tables_mapped_or_in_ram_give_the_same_tokens(qwen4_exp):
    """The tables in RAM with every expert resident, and mapped from the shards with the experts offloaded
    to the fewest slots: the same logits and tokens; the load summary says where the tables are."""
    resident = localmoe.load(qwen4_exp, device="cpu", dtype=torch.float32)
    mapped = localmoe.load(
        qwen4_exp, device="cpu", dtype=torch.float32, options=RuntimeOptions(host_budget=2**20, expert_slots=2)
    )
    assert (resident.plan.tables, mapped.plan.tables, mapped.plan.store) == ("ram", "mmap", "mmap")
    assert "lookup tables" in resident.plan.describe() and "lookup tables (" in mapped.summary()
    assert "the model gathers rows of its lookup tables on the host each step" in mapped.graphs_barred()
    mapped.options = replace(mapped.options, cuda_graphs="on")  # refused in one line, never captured
    with pytest.raises(localmoe.LocalMoEError, match="cannot be captured here: .*gathers rows of its lookup tables"):
        mapped.graphs_barred()
    mapped.options = replace(mapped.options, cuda_graphs="auto")
    ids = torch.tensor([PROMPT])
    logits = [e.model(ids, e.model.new_cache(1, ids.shape[1]), all_logits=True) for e in (resident, mapped)]
    assert torch.equal(*logits)
    assert list(resident.generate_ids(PROMPT, 12)) == list(mapped.generate_ids(PROMPT, 12))
