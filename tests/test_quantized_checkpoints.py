"""GPTQ, AWQ and ModelOpt NVFP4 checkpoints in Qwen3-MoE and Mixtral, against transformers run on the
weights each format decodes to (packers.py writes them, and decodes them as the formats' own code does);
and the variants localmoe does not read, refused in one line."""

import json
import re
import shutil

import pytest
import torch
from conftest import TINY_FAMILIES
from packers import pack_awq, pack_gptq
from quantized_models import check_against_transformers, linear, quantized_checkpoint

import localmoe
from localmoe.runtime.layouts import Fp8Layout, Nvfp4Layout, QuantizedLayout

QWEN3 = ("Qwen3MoeConfig", {**TINY_FAMILIES["qwen3_moe"][1], "moe_intermediate_size": 32, "head_dim": 16})
MIXTRAL = TINY_FAMILIES["mixtral"]  # experts 96 wide: groups of 32 and 16 divide both widths
FAMILIES = pytest.mark.parametrize("family", [QWEN3, MIXTRAL], ids=["qwen3-moe", "mixtral"])


def act_order_groups(columns: int, group: int, seed: int) -> torch.Tensor:
    """GPTQ's g_idx with desc_act: columns quantized in a shuffled order, `group` at a time."""
    order = torch.randperm(columns, generator=torch.Generator().manual_seed(seed))
    return torch.empty(columns, dtype=torch.long).scatter_(0, order, torch.arange(columns) // group)


# name -> (quantization_config, how to pack a weight); the Hub's default is GPTQ v1, 4 bits, sym
GPTQ = {
    "gptq-4bit-sym": (dict(bits=4, group_size=32, desc_act=False, sym=True), dict(bits=4, group=32, symmetric=True)),
    "gptq-4bit-act-order": (dict(bits=4, group_size=16, desc_act=True, sym=False), dict(bits=4, group=16)),
    "gptq-8bit-per-row-v2": (dict(bits=8, group_size=-1, desc_act=False, sym=False, checkpoint_format="gptq_v2"),
                             dict(bits=8, group=0, v1=False)),
}  # fmt: skip


def gptq(name: str, family) -> tuple:
    config, packing = GPTQ[name]

    def quantize(weight_name, tensor):
        if not linear(weight_name, tensor):
            return None
        g_idx = None
        if config["desc_act"]:
            g_idx = act_order_groups(tensor.shape[1], config["group_size"], seed=len(weight_name))
        if packing["group"] == 0:
            g_idx = torch.zeros(tensor.shape[1], dtype=torch.long)
        tensors, decoded = pack_gptq(tensor, g_idx=g_idx, **packing)
        return {**tensors, "decoded": decoded}

    return quantize, {"quant_method": "gptq", "checkpoint_format": "gptq", **config}


@FAMILIES
@pytest.mark.parametrize("variant", list(GPTQ))
def test_gptq_matches_transformers(tmp_path, family, variant):
    quantize, config = gptq(variant, family)
    reference, folder = quantized_checkpoint(*family, tmp_path, quantize, config)
    store = check_against_transformers(reference, folder, QuantizedLayout)
    spec, layout = store.layout.spec, store.layout
    assert (spec.bits, spec.act_order, spec.symmetric) == (config["bits"], config["desc_act"], config["sym"])
    # the row holds the checkpoint's bytes, with the zero points widened to float16 (none where sym makes
    # them all 2^(bits - 1)), and g_idx only where the groups follow it
    shapes = ((2 * layout.intermediate, layout.hidden), (layout.hidden, layout.intermediate))
    zeros = sum(spec.groups(columns) * rows for rows, columns in shapes)
    zeros_kept = 0 if spec.symmetric else zeros * 2
    g_idx = 0 if spec.act_order else 4 * (2 * layout.hidden + layout.intermediate)
    assert store.expert_bytes == stored_bytes(store.source) - zeros * spec.bits / 8 + zeros_kept - g_idx


@FAMILIES
def test_awq_matches_transformers(tmp_path, family):
    def quantize(name, tensor):
        if not linear(name, tensor):
            return None
        tensors, decoded = pack_awq(tensor, group=32)
        return {**tensors, "decoded": decoded}

    config = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    reference, folder = quantized_checkpoint(*family, tmp_path, quantize, config)
    store = check_against_transformers(reference, folder, QuantizedLayout)
    layout = store.layout
    shapes = ((2 * layout.intermediate, layout.hidden), (layout.hidden, layout.intermediate))
    zeros = sum(layout.spec.groups(columns) * rows for rows, columns in shapes)
    assert store.expert_bytes == stored_bytes(store.source) + zeros * (2 - 0.5)  # zero points: float16, not nibbles


def modelopt_nvfp4(name: str, tensor: torch.Tensor) -> dict | None:
    """A linear weight as ModelOpt's unified export stores it in NVFP4, packed and decoded by ModelOpt's own
    NVFP4QTensor: `weight` uint8, `weight_scale` e4m3 per 16 inputs, `weight_scale_2` and the activations'
    `input_scale` (float32 numbers; localmoe keeps activations in floating point and reads no input_scale)."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    if not linear(name, tensor):
        return None
    packed, scale, scale_2 = NVFP4QTensor.quantize(tensor.float(), 16)
    decoded = packed.dequantize(torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: 16})
    input_scale = torch.tensor(0.5 / 2688)  # amax / (6 * 448), as ModelOpt writes it after calibration
    return {"weight": packed._quantized_data, "weight_scale": scale, "weight_scale_2": scale_2.reshape(()),
            "input_scale": input_scale, "decoded": decoded}  # fmt: skip


MODELOPT_EXCLUDE = ["lm_head", "model.layers.*.mlp.gate", "model.layers.*.block_sparse_moe.gate"]


def modelopt_hf_quant_config() -> dict:
    """hf_quant_config.json as ModelOpt's unified export writes it."""
    quantization = {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16}
    return {"producer": {"name": "modelopt", "version": "0.47.0"}, "quantization": quantization}


@FAMILIES
@pytest.mark.parametrize("config_in", ["config.json", "hf_quant_config.json only"])
def test_modelopt_nvfp4_matches_transformers(tmp_path, family, config_in):
    """ModelOpt writes hf_quant_config.json, and since 2025 the same in config.json's quantization_config
    (convert_hf_quant_config_format); its earlier releases (nvidia/DeepSeek-R1-FP4) have only the first."""
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    hf_quant_config = modelopt_hf_quant_config()
    hf_quant_config["quantization"]["exclude_modules"] = MODELOPT_EXCLUDE
    config = convert_hf_quant_config_format(hf_quant_config)
    reference, folder = quantized_checkpoint(*family, tmp_path, modelopt_nvfp4, config)
    (folder / "hf_quant_config.json").write_text(json.dumps(hf_quant_config))
    if config_in != "config.json":
        config_json = json.loads((folder / "config.json").read_text())
        del config_json["quantization_config"]
        (folder / "config.json").write_text(json.dumps(config_json))
    store = check_against_transformers(reference, folder, Nvfp4Layout)
    assert not store.layout.divides
    # the row: codes and block scales as stored, and the three global scales (no input_scale) in 2 sections
    input_scales = 3 * 4
    assert store.expert_bytes == stored_bytes(store.source) - input_scales + 32 - 3 * 4


@FAMILIES
def test_autofp8_per_tensor_matches_transformers(tmp_path, family):
    """AutoFP8's FP8 (quant_method fp8 without weight_block_size): `weight` e4m3 and one float32
    `weight_scale` per matrix, w = weight x scale as vLLM's Fp8LinearMethod reads it; with the static
    activations' `input_scale` beside, which localmoe does not use."""

    def quantize(name, tensor):
        if not linear(name, tensor):
            return None
        scale = tensor.float().abs().amax() / 448.0
        weight = (tensor.float() / scale).to(torch.float8_e4m3fn)
        return {"weight": weight, "weight_scale": scale, "input_scale": torch.tensor(0.01),
                "decoded": weight.float() * scale}  # fmt: skip

    config = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
    reference, folder = quantized_checkpoint(*family, tmp_path, quantize, config)
    store = check_against_transformers(reference, folder, Fp8Layout)
    layout = store.layout
    rows = 2 * layout.intermediate + layout.hidden  # a float32 multiplier per row, in place of one per matrix
    assert store.expert_bytes == stored_bytes(store.source) - 3 * 4 + rows * 4 - 3 * 4


def stored_bytes(source) -> int:
    """What the checkpoint stores for the first MoE layer's expert 0."""
    layer = source.layers[0]
    names, ckpt = source.layouts[layer].names, source.ckpt
    prefixes = tuple(names[role].format(layer=layer, expert=0).removesuffix("weight") for role in names)
    return sum(ckpt.info(name).nbytes for name in ckpt.tensor_names if name.startswith(prefixes))


REFUSED = {
    "GPTQ with 3 bits": {"quant_method": "gptq", "bits": 3, "group_size": 128},
    "GPTQ in the 'marlin' format": {"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"},
    "AWQ version 'gemv'": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"},
    "compressed-tensors format 'marlin-24'": {"quant_method": "compressed-tensors", "format": "marlin-24",
                                              "config_groups": {"group_0": {"targets": ["Linear"], "weights": {}}}},
    "ModelOpt quant_algo 'FP8'": {"quant_method": "modelopt", "quant_algo": "FP8"},
    "is quantized \\(bitsandbytes\\)": {"quant_method": "bitsandbytes"},
}  # fmt: skip


@pytest.mark.parametrize("words", list(REFUSED))
def test_variants_not_read_are_refused_in_one_line(tiny_mixtral, tmp_path, words):
    """By the command line: one line naming the variant, exit status 2, no weight read as it is."""
    from click.testing import CliRunner

    from localmoe.cli import main

    folder = tmp_path / "quantized"
    shutil.copytree(tiny_mixtral, folder)
    config = json.loads((tiny_mixtral / "config.json").read_text())
    config["quantization_config"] = REFUSED[words]
    (folder / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["generate", str(folder), "--prompt", "Hi", "-n", "2", "--device", "cpu"])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("localmoe: error: ")
    assert re.search(words, line), line


@pytest.fixture(scope="module")
def gptq_mixtral(tmp_path_factory):
    """A 4-bit GPTQ Mixtral in groups of 32 (the quantized folder), for configs that misdescribe it."""
    quantize, config = gptq("gptq-4bit-sym", MIXTRAL)
    return quantized_checkpoint(*MIXTRAL, tmp_path_factory.mktemp("gptq"), quantize, config)[1]


# what the config says -> the words of the one line that must name it
MISDESCRIBED = {
    "bits 8": ({"bits": 8}, "stored at 4 bits with group_size 32 while .* says bits 8, group_size 32"),
    "group_size 16": ({"group_size": 16}, "stored at 4 bits with group_size 32 while .* says bits 4, group_size 16"),
    "group_size -1": ({"group_size": -1}, "with group_size 32 while .* says bits 4, group_size -1"),
    "dynamic": ({"dynamic": {"+:.*experts.*": {"bits": 8}, "-:.*lm_head": {}}},
                "GPTQ with per-module settings in dynamic \\('\\+:\\.\\*experts\\.\\*'\\) is not supported"),
    "awq": ({"quant_method": "awq", "version": "gemm", "zero_point": True},
            "qzeros .* where the quantization_config's group_size 32 implies"),
}  # fmt: skip


@pytest.mark.parametrize("change", list(MISDESCRIBED))
def test_configs_that_misdescribe_the_weights_are_named_in_one_line(gptq_mixtral, tmp_path, change):
    from localmoe.errors import LocalMoEError

    folder = tmp_path / "misdescribed"
    shutil.copytree(gptq_mixtral, folder)
    config = json.loads((folder / "config.json").read_text())
    changes, words = MISDESCRIBED[change]
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LocalMoEError) as error:
        localmoe.load(str(folder), device="cpu", dtype=torch.float32)
    [line] = str(error.value).splitlines()
    assert re.search(words, line), line


def test_readme_lists_the_formats_read():
    """README's format table names every quant_method localmoe/quantization.py reads, and no other than
    those and the families' own (gpt-oss's mxfp4)."""
    from pathlib import Path

    from localmoe.models import FAMILIES
    from localmoe.quantization import READERS

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("<!-- formats:start -->\n")[1].split("\n<!-- formats:end -->")[0]
    methods = {row.split("|")[2].strip().strip("`") for row in table.splitlines()[2:]}
    own = {method for family in FAMILIES for method in family.quantizations}
    assert set(READERS) <= methods <= set(READERS) | own


def test_gptq_sym_over_asymmetric_zero_points_is_named(tmp_path):
    from localmoe.errors import LocalMoEError

    quantize, config = gptq("gptq-4bit-act-order", MIXTRAL)
    _, folder = quantized_checkpoint(*MIXTRAL, tmp_path, quantize, {**config, "sym": True})
    with pytest.raises(LocalMoEError, match="qzeros are not all 8 while .* says sym true") as error:
        localmoe.load(str(folder), device="cpu", dtype=torch.float32)
    assert "\n" not in str(error.value)
