"""Rotary settings: every supported `rope_type` against transformers, and old and new config spellings."""

import json

import pytest
import torch
from conftest import DEEPSEEK_V2, GLM4_MOE, GPT_OSS, MIXTRAL, PHIMOE, hf_model, save_hf
from test_parity import PHIMOE_LONGROPE

import localmoe
from localmoe.errors import LocalMoEError
from localmoe.models.rotary import rope_inv_freq, rope_parameters

HEAD_DIM, MAX_POSITIONS = 64, 4096
MLA_YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "mscale": 0.9,
    "mscale_all_dim": 0.8,
}

VARIANTS = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 2.5},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    # DeepSeek-style yarn: the attention factor from mscale / mscale_all_dim
    "yarn-mscale": {
        "rope_type": "yarn",
        "factor": 40.0,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
        "beta_fast": 32,
        "beta_slow": 1,
        "original_max_position_embeddings": 256,
    },
    "yarn-untruncated": {
        "rope_type": "yarn",
        "factor": 2.0,
        "original_max_position_embeddings": 2048,
        "truncate": False,
    },
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_inverse_frequencies_match_transformers(variant):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_theta": 500000.0, **VARIANTS[variant]}
    config = LlamaConfig(
        hidden_size=HEAD_DIM * 4,
        num_attention_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters=params,
    )
    got, got_scaling = rope_inv_freq(dict(params), HEAD_DIM, MAX_POSITIONS)
    if params["rope_type"] == "default":
        expected = 1.0 / (params["rope_theta"] ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
        expected_scaling = 1.0
    else:
        expected, expected_scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert got_scaling == pytest.approx(expected_scaling)


def test_old_config_spelling_reads_the_same():
    new = {
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 1e6,
            "factor": 4.0,
            "original_max_position_embeddings": 8,
        }
    }
    old = {
        "rope_theta": 1e6,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    }
    assert rope_parameters(old, 10_000.0) == rope_parameters(new, 10_000.0)
    assert rope_parameters({}, 1e6) == {"rope_type": "default", "rope_theta": 1e6}


def test_unsupported_rope_type_is_an_error():
    with pytest.raises(LocalMoEError, match="rope_type 'dynamic' is not supported"):
        rope_inv_freq({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, HEAD_DIM, MAX_POSITIONS)


def test_checkpoint_with_an_old_style_config_loads_the_same(tmp_path):
    """A config as older Hub repos write it (top-level rope_theta, rope_scaling, torch_dtype) gives the
    same logits as the 5.x spelling of the same settings."""
    scaling = {"factor": 4.0, "original_max_position_embeddings": 64}
    # head_dim spelled out: transformers' yarn reads config.head_dim, which Mixtral leaves None by default
    rope = {"rope_type": "yarn", "rope_theta": 5e5, **scaling}
    reference = hf_model("MixtralConfig", **MIXTRAL, head_dim=16, rope_parameters=rope)
    folder = save_hf(reference, tmp_path / "new", "single")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    new = localmoe.load(str(folder), device="cpu").model
    expected = new(ids, new.new_cache(1, 12), all_logits=True)

    config = json.loads((folder / "config.json").read_text())
    del config["rope_parameters"], config["dtype"]
    config.update(rope_theta=5e5, rope_scaling={"type": "yarn", **scaling}, torch_dtype="float32")
    (folder / "config.json").write_text(json.dumps(config))
    old = localmoe.load(str(folder), device="cpu")
    assert old.parts.dtype == torch.float32
    got = old.model(ids, old.model.new_cache(1, 12), all_logits=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with torch.no_grad():
        assert (got - reference(ids).logits).abs().max().item() < 1e-4


def old_style(config: dict) -> dict:
    """A 5.x config rewritten the way older Hub repos spell it: top-level rope_theta and
    partial_rotary_factor, rope_scaling with `type` (none for plain rotary), torch_dtype."""
    config = dict(config)
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        config["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    kind = rope.pop("rope_type")
    config["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    config["torch_dtype"] = config.pop("dtype")
    return config


@pytest.mark.parametrize(
    "config_class,config",
    [
        ("Glm4MoeConfig", GLM4_MOE),  # partial rotary at the top level
        ("DeepseekV2Config", {**DEEPSEEK_V2, "rope_parameters": MLA_YARN}),  # yarn with mscale_all_dim
        ("GptOssConfig", GPT_OSS),  # yarn without truncation
        ("PhimoeConfig", {**PHIMOE, "rope_parameters": PHIMOE_LONGROPE}),  # longrope with its mscales
    ],
    ids=["glm4", "deepseek-v2", "gpt-oss", "phimoe"],
)
def test_every_rotary_setting_reads_the_same_in_the_old_spelling(tmp_path, config_class, config):
    folder = save_hf(hf_model(config_class, **config), tmp_path, "single")
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    new = localmoe.load(str(folder), device="cpu").model
    expected = new(ids, new.new_cache(1, 40), all_logits=True)
    (folder / "config.json").write_text(json.dumps(old_style(json.loads((folder / "config.json").read_text()))))
    old = localmoe.load(str(folder), device="cpu").model
    torch.testing.assert_close(old(ids, old.new_cache(1, 40), all_logits=True), expected, rtol=0, atol=0)
