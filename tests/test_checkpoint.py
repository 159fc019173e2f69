"""The checkpoint reader and the loader on good and broken checkpoints: every broken one is one clear line."""

import dataclasses
import hashlib
import json
import os
import re
import shutil

import pytest
import torch
from conftest import MISTRAL4, MIXTRAL, hf_model, save_hf

import localmoe
from localmoe import checkpoint, loader
from localmoe.checkpoint import Checkpoint
from localmoe.errors import LocalMoEError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return save_hf(hf_model("MixtralConfig", **MIXTRAL), tmp_path_factory.mktemp("ckpt"), "sharded")


@pytest.fixture
def broken(sharded, tmp_path):
    """A private copy of the sharded checkpoint to damage."""
    return shutil.copytree(sharded, tmp_path / "broken")


def load_error(source) -> str:
    with pytest.raises(LocalMoEError) as info:
        localmoe.load(str(source), device="cpu")
    message = str(info.value)
    assert "\n" not in message
    return message


def index(folder) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


def write_index(folder, data: dict) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(data))


def test_tensors_are_lazy_views_of_the_shards(sharded):
    ckpt = Checkpoint.open(sharded)
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    assert name in ckpt
    assert ckpt.info(name).shape == (MIXTRAL["hidden_size"], MIXTRAL["intermediate_size"])
    # the same memory-mapped bytes each time, not a fresh copy
    assert ckpt.tensor(name).data_ptr() == ckpt.tensor(name).data_ptr()
    assert ckpt.config["model_type"] == "mixtral"
    assert ckpt.generation_config["eos_token_id"] == MIXTRAL["eos_token_id"]


def test_loading_never_writes_to_the_checkpoint(sharded):
    def digest():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(sharded.iterdir())}

    before = digest()
    engine = localmoe.load(str(sharded), device="cpu")
    list(engine.generate_ids([1, 2, 3], 4))
    assert digest() == before


def test_missing_path():
    assert "no such folder" in load_error("/no/such/checkpoint")
    assert "no such folder" in load_error("./relative/missing")


def test_path_to_a_file(sharded):
    assert "is a file" in load_error(sharded / "config.json")


def test_missing_shard(broken):
    shard = sorted(broken.glob("model-*.safetensors"))[3]
    shard.unlink()
    message = load_error(broken)
    assert shard.name in message and "incomplete" in message


def test_truncated_shard(broken):
    shard = sorted(broken.glob("model-*.safetensors"))[2]
    os.truncate(shard, shard.stat().st_size // 2)
    message = load_error(broken)
    assert shard.name in message and "truncated" in message


def test_resident_tensor_missing_from_index(broken):
    data = index(broken)
    del data["weight_map"]["model.layers.1.self_attn.q_proj.weight"]
    write_index(broken, data)
    message = load_error(broken)
    assert "lacks tensor model.layers.1.self_attn.q_proj.weight" in message


def test_expert_tensor_missing_from_index(broken):
    data = index(broken)
    del data["weight_map"]["model.layers.2.block_sparse_moe.experts.4.w3.weight"]
    write_index(broken, data)
    assert "model.layers.2.block_sparse_moe.experts.4.w3.weight" in load_error(broken)


def test_index_names_a_tensor_its_shard_lacks(broken):
    data = index(broken)
    name = "model.norm.weight"
    other = next(s for s in sorted(set(data["weight_map"].values())) if s != data["weight_map"][name])
    data["weight_map"][name] = other
    write_index(broken, data)
    message = load_error(broken)
    assert other in message and "different revisions" in message


def test_shapes_that_do_not_match_the_config(broken):
    config = json.loads((broken / "config.json").read_text())
    config["vocab_size"] += 1
    (broken / "config.json").write_text(json.dumps(config))
    assert "config.json implies" in load_error(broken)


def edit_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))  # NaN is written as JSON allows


def test_a_layer_count_the_weights_lack_fails_before_the_model_is_built(broken, monkeypatch):
    edit_config(broken, num_hidden_layers=1_000_000)
    real = loader.family_for
    unbuilt = lambda config: dataclasses.replace(real(config), model=lambda args: pytest.fail("built"))  # noqa: E731
    monkeypatch.setattr(loader, "family_for", unbuilt)
    message = load_error(broken)
    assert "num_hidden_layers 1000000" in message and "no tensor of layer 3 (3 layers in all)" in message


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"num_hidden_layers": 0}, "num_hidden_layers is 0, and must be at least 1"),
        ({"hidden_size": -64}, "hidden_size is -64, and must be at least 1"),
        ({"num_attention_heads": "4"}, "num_attention_heads is '4', not an integer"),
        ({"num_local_experts": 2.5}, "num_local_experts is 2.5, not an integer"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps is nan, not a finite number"),
        ({"tie_word_embeddings": "no"}, "tie_word_embeddings is 'no', not true or false"),
        ({"sliding_window": [4]}, "sliding_window is [4], not an integer or null"),
        ({"rope_parameters": {"rope_theta": float("nan")}}, "rope_theta is nan, not a positive number"),
        ({"num_experts_per_tok": 9}, "routes each token to 9 experts, and has 5 per layer"),
        ({"num_key_value_heads": 3}, "4 attention heads, which cannot share 3 key-value heads"),
        ({"head_dim": None, "hidden_size": 66}, "hidden_size 66 does not split over 4 attention heads"),
    ],
    ids=lambda value: "-" if isinstance(value, str) else "+".join(value),
)
def test_a_damaged_config_value_is_one_line_naming_it(broken, changes, problem):
    edit_config(broken, **changes)
    message = load_error(broken)
    assert problem in message and "the config is damaged" in message


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"n_group": 0}, "n_group is 0, and must be at least 1"),
        ({"n_group": 3}, "n_group 3, which does not divide its 8 experts"),
        ({"topk_group": 3}, "topk_group 3, more than its n_group 2"),
        ({"topk_group": 1, "num_experts_per_tok": 5}, "routes each token to 5 experts, more than 1 groups of 4 hold"),
    ],
)
def test_grouped_routing_that_contradicts_itself_is_refused(changes, problem):
    from localmoe.models import family_for

    config = {"architectures": ["Mistral4ForCausalLM"], "model_type": "mistral4", **MISTRAL4, **changes}
    with pytest.raises(LocalMoEError, match=re.escape(problem)):
        family_for(config).args.from_config(config)


def retype(folder, tensor: str, dtype: str) -> None:
    """Rewrite the header of `tensor`'s shard to claim `dtype` for it, leaving its bytes as they are."""
    shard = folder / index(folder)["weight_map"][tensor]
    data = shard.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header[tensor]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode()
    shard.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length :])


@pytest.mark.parametrize(
    "tensor",
    ["model.layers.1.self_attn.q_proj.weight", "model.layers.2.block_sparse_moe.experts.4.w3.weight"],
    ids=["resident", "expert"],
)
def test_a_tensor_whose_dtype_is_not_a_weights_is_refused(broken, tensor):
    retype(broken, tensor, "I32")  # the same four bytes per value as the F32 it holds
    message = load_error(broken)
    assert f"tensor {tensor}" in message and "stored as int32" in message and "float32" in message


def test_damaged_config(broken):
    (broken / "config.json").write_text('{"architectures": ["MixtralForCausalLM"],')
    assert "not valid JSON" in load_error(broken)


def test_no_config(broken):
    (broken / "config.json").unlink()
    assert "no config.json" in load_error(broken)


def test_pickle_only_checkpoint_is_refused_unopened(tmp_path):
    """A .bin whose unpickling would write a file: refusing must not unpickle it."""
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["MixtralForCausalLM"], **MIXTRAL}))
    torch.save(Payload(), folder / "pytorch_model.bin")
    message = load_error(folder)
    assert "pytorch_model.bin" in message and "never unpickles" in message
    assert not marker.exists()


def test_unknown_architecture(broken):
    config = json.loads((broken / "config.json").read_text())
    config.update(architectures=["FooMoeForCausalLM"], model_type="foo_moe")
    (broken / "config.json").write_text(json.dumps(config))
    message = load_error(broken)
    assert "FooMoeForCausalLM" in message and "MixtralForCausalLM" in message and "Qwen3MoeForCausalLM" in message


def test_multimodal_config_without_text_config(broken):
    config = json.loads((broken / "config.json").read_text())
    config.update(architectures=["Llama4ForConditionalGeneration"], model_type="llama4")
    (broken / "config.json").write_text(json.dumps(config))
    assert "declares Llama4ForConditionalGeneration but has no text_config" in load_error(broken)


def test_remote_code_is_refused(broken):
    config = json.loads((broken / "config.json").read_text())
    config.update(architectures=["FooMoeForCausalLM"], auto_map={"AutoModelForCausalLM": "modeling_foo.FooMoe"})
    (broken / "config.json").write_text(json.dumps(config))
    assert "never runs checkpoint code" in load_error(broken)


def test_auto_map_of_a_built_in_architecture_uses_the_built_in(broken):
    config = json.loads((broken / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_mixtral.MixtralForCausalLM"}
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "modeling_mixtral.py").write_text("raise SystemExit('checkpoint code ran')\n")
    assert localmoe.load(str(broken), device="cpu").parts.family.model_type == "mixtral"


# --- Hub repo ids, through the Hugging Face cache ------------------------------------------------------------


@pytest.fixture
def hub_cache(sharded, tmp_path, monkeypatch):
    """A Hugging Face cache holding `tiny/mixtral` at one commit, with the Hub unreachable (offline): as
    the Hub writes it, each snapshot file a relative symlink to its blob."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--tiny--mixtral"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in sharded.iterdir():
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, repo / "blobs" / blob)
        (snapshot / file.name).symlink_to(f"../../blobs/{blob}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return repo


def test_repo_id_in_the_cache_opens_offline(hub_cache):
    ckpt = Checkpoint.open("tiny/mixtral")
    assert ckpt.path == hub_cache / "snapshots" / COMMIT
    assert localmoe.load("tiny/mixtral", device="cpu").parts.family.model_type == "mixtral"


def test_repo_id_not_in_the_cache(hub_cache):
    message = load_error("tiny/absent")
    assert "not in the Hugging Face cache" in message and "hf download tiny/absent" in message


def test_a_snapshot_symlink_that_leaves_the_repo_is_refused(hub_cache, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shard = next((hub_cache / "snapshots" / COMMIT).glob("model-*.safetensors"))
    shutil.copy(shard.resolve(), outside)
    shard.unlink()
    shard.symlink_to(outside)
    message = load_error("tiny/mixtral")
    assert f"{shard.name} leads outside the checkpoint folder" in message


@pytest.mark.parametrize(
    "shard",
    ["../outside.safetensors", "{abs}", "sub/../../outside.safetensors", "link.safetensors"],
    ids=["parent", "absolute", "through a subfolder", "symlink"],
)
def test_a_shard_outside_the_folder_is_refused_unopened(broken, tmp_path, shard, monkeypatch):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(next(broken.glob("model-*.safetensors")).read_bytes())
    (broken / "link.safetensors").symlink_to(outside)
    shard = shard.replace("{abs}", str(outside))
    data = index(broken)
    data["weight_map"] = {name: shard for name in data["weight_map"]}
    write_index(broken, data)
    opened = []
    monkeypatch.setattr(checkpoint, "safe_open", lambda path, **kw: opened.append(path))
    message = load_error(broken)
    assert "leads outside the checkpoint folder" in message and "localmoe reads only the files in" in message
    assert opened == []


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_a_metadata_file_that_leaves_the_folder_is_refused(broken, tmp_path, name):
    outside = tmp_path / name
    shutil.move(broken / name, outside)
    (broken / name).symlink_to(outside)
    assert f"{name} leads outside the checkpoint folder" in load_error(broken)


def test_a_weight_map_of_the_wrong_shape_is_refused(broken):
    data = index(broken)
    data["weight_map"][next(iter(data["weight_map"]))] = 3
    write_index(broken, data)
    assert "maps a tensor to something other than a file name" in load_error(broken)


def test_cached_repo_missing_a_shard(hub_cache):
    next((hub_cache / "snapshots" / COMMIT).glob("model-*.safetensors")).unlink()
    assert "download is incomplete" in load_error("tiny/mixtral")


def test_quantized_checkpoint_the_family_cannot_read_is_refused(broken):
    """An AWQ release read as plain weights would load and talk nonsense: refuse it instead."""
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128}
    (broken / "config.json").write_text(json.dumps(config))
    message = load_error(broken)
    assert "quantized (awq)" in message and "bf16" in message


def test_readme_lists_the_registry():
    from pathlib import Path

    from localmoe.models import families_table

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    listed = readme.split("<!-- families:start -->\n")[1].split("\n<!-- families:end -->")[0]
    assert listed == families_table(markdown=True), (
        "README.md's family table is stale: paste `localmoe families --markdown` into it"
    )
