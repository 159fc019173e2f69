"""compressed-tensors checkpoints (quant_method compressed-tensors), written by the compressed-tensors
package itself: Kimi K2's INT4 (symmetric, groups of 32, bfloat16 scales, attention and shared experts
left in bfloat16), asymmetric INT8 by row beside INT4 attention, FP8 by tensor, row and block, NVFP4 and
MXFP4, each in two families. localmoe must give transformers' logits on the weights compressed-tensors
decodes, with the routed experts kept in their stored form from disk to slot."""

import json

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import dequantize
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
from compressed_tensors.utils.match import match_name
from conftest import TINY_FAMILIES
from quantized_models import check_against_transformers, linear, quantized_checkpoint

import localmoe
from localmoe.engine import RuntimeOptions
from localmoe.runtime.layouts import Fp8Layout, Mxfp4Layout, Nvfp4Layout, QuantizedLayout

# Kimi K2 is DeepSeek-V3 with its own model_type; both families with experts 32 wide, as the formats' groups need
KIMI = ("DeepseekV3Config", {**TINY_FAMILIES["deepseek_v3"][1], "moe_intermediate_size": 32})
QWEN3 = ("Qwen3MoeConfig", {**TINY_FAMILIES["qwen3_moe"][1], "moe_intermediate_size": 32, "head_dim": 16})
ROUTERS = "re:.*mlp\\.gate$"
# Kimi K2's own ignore list: attention, the shared experts and the dense MLP stay in bfloat16
KIMI_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj$", ROUTERS]


def groups(*schemes) -> dict:
    """config_groups from (preset, targets, changes to its weights) triples."""
    config = {}
    for i, (preset, targets, changes) in enumerate(schemes):
        scheme = preset_name_to_scheme(preset, targets)
        scheme.weights = scheme.weights.model_copy(update=changes)
        config[f"group_{i}"] = scheme
    return config


# name -> (format, config groups, ignore list, scale dtype, the layout experts are kept in)
SCHEMES = {
    "int4-kimi": ("pack-quantized", groups(("W4A16", ["Linear"], {"group_size": 32})), KIMI_IGNORE,
                  torch.bfloat16, QuantizedLayout),
    "int8-asym-row+int4-attention": (
        "pack-quantized",
        groups(
            ("W8A16", ["re:.*mlp\\.experts\\..*"], {"strategy": "channel", "group_size": None, "symmetric": False}),
            ("W4A16_ASYM", ["re:.*self_attn\\.(q|k|v|o)_proj$"], {"group_size": 16}),
        ),
        ["lm_head", ROUTERS],
        torch.float16,
        QuantizedLayout,
    ),
    "fp8-tensor": ("float-quantized", groups(("FP8", ["Linear"], {})), ["lm_head", ROUTERS], None, Fp8Layout),
    "fp8-row": ("float-quantized", groups(("FP8_DYNAMIC", ["Linear"], {})), ["lm_head", ROUTERS], None, Fp8Layout),
    "fp8-block": ("float-quantized", groups(("FP8_BLOCK", ["Linear"], {"block_structure": [16, 16]})),
                  ["lm_head", ROUTERS, "re:.*self_attn.*"], None, Fp8Layout),
    "nvfp4": ("nvfp4-pack-quantized", groups(("NVFP4A16", ["Linear"], {})), KIMI_IGNORE, None, Nvfp4Layout),
    "mxfp4": ("mxfp4-pack-quantized", groups(("MXFP4A16", ["Linear"], {})), KIMI_IGNORE, None, Mxfp4Layout),
}  # fmt: skip


def compress(weight: torch.Tensor, scheme, fmt: str, scale_dtype) -> dict:
    """One linear weight through compressed-tensors: its min-max parameters, `compress`, and the weight
    its `decompress` gives back (under "decoded")."""
    args, w = scheme.weights, weight.float()
    if args.strategy in ("group", "tensor_group"):
        grouped = w.unflatten(-1, (-1, args.group_size))
        low, high = grouped.amin(-1), grouped.amax(-1)
    elif args.strategy == "channel":
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    elif args.strategy == "tensor":
        low, high = w.min().reshape(1), w.max().reshape(1)
    else:
        tiles = w.unflatten(0, (-1, args.block_structure[0])).unflatten(2, (-1, args.block_structure[1]))
        low, high = tiles.amin((1, 3)), tiles.amax((1, 3))
    global_scale = generate_gparam(w.min(), w.max()) if args.strategy == "tensor_group" else None
    scale, zero = calculate_qparams(low, high, args, global_scale=global_scale)
    state = {"weight": weight, "weight_scale": scale.to(scale_dtype or scale.dtype), "weight_zero_point": zero}
    if global_scale is not None:
        state["weight_global_scale"] = global_scale
    compressor = BaseCompressor.get_value_from_registry(fmt)
    compressed = dict(compressor.compress(state, scheme))
    # decoded in float32 by compressed-tensors' own parts (decompress computes in the scales' dtype, which
    # is bfloat16 for Kimi's, and NVFP4's in bfloat16): the stored values, exactly
    scale = compressed["weight_scale"]
    if fmt == "nvfp4-pack-quantized":
        codes = unpack_fp4_from_uint8(compressed["weight_packed"], *weight.shape, dtype=torch.float32)
        decoded = dequantize(codes, scale.float(), args=args, global_scale=global_scale, dtype=torch.float32)
        return {**compressed, "decoded": decoded}
    exact = {**compressed, "weight_scale": scale.float() if scale.dtype in (torch.bfloat16, torch.float16) else scale}
    return {**compressed, "decoded": compressor.decompress(exact, scheme)["weight"]}


def scheme_of(name: str, config_groups: dict, ignore: list[str]):
    module = name.removesuffix(".weight")
    if any(match_name(module, target) for target in ignore):
        return None
    return next(
        (s for s in config_groups.values() if any(match_name(module, t) or t == "Linear" for t in s.targets)), None
    )


def write(tmp_path, family, scheme_name: str):
    fmt, config_groups, ignore, scale_dtype, _ = SCHEMES[scheme_name]
    config_class, config = family

    def quantize(name, tensor):
        scheme = scheme_of(name, config_groups, ignore) if linear(name, tensor) else None
        return None if scheme is None else compress(tensor, scheme, fmt, scale_dtype)

    quantization = QuantizationConfig(
        config_groups=config_groups, format=fmt, ignore=ignore, quantization_status="compressed"
    ).to_dict()
    changes = {"model_type": "kimi_k2"} if scheme_name == "int4-kimi" and family is KIMI else {}
    return quantized_checkpoint(config_class, config, tmp_path, quantize, quantization, **changes)


@pytest.mark.parametrize("family", [KIMI, QWEN3], ids=["kimi-deepseek-v3", "qwen3-moe"])
@pytest.mark.parametrize("scheme_name", list(SCHEMES))
def test_matches_transformers_resident_and_offloaded(tmp_path, family, scheme_name):
    reference, folder = write(tmp_path, family, scheme_name)
    store = check_against_transformers(reference, folder, SCHEMES[scheme_name][-1])
    assert store.expert_bytes == stored_expert_bytes(store.source) + ROW_EXTRA.get(scheme_name, 0)


# What a row holds beyond the checkpoint's bytes for one expert (gate and up 32 x 64, down 64 x 32): zero
# points as float16 rather than packed bytes; a tensor's FP8 scale repeated down its 128 rows; NVFP4's
# three global scales padded to 16 bytes in two sections
ROW_EXTRA = {"int8-asym-row+int4-attention": 128 * (2 - 1), "fp8-tensor": 128 * 4 - 3 * 4, "nvfp4": 32 - 3 * 4}


def stored_expert_bytes(source) -> int:
    """The bytes the checkpoint stores for the first MoE layer's expert 0, less `weight_shape` (metadata)."""
    layer = source.layers[0]
    names, ckpt = source.layouts[layer].names, source.ckpt
    prefixes = tuple(names[role].format(layer=layer, expert=0).removesuffix("weight") for role in names)
    return sum(
        ckpt.info(name).nbytes
        for name in ckpt.tensor_names
        if name.startswith(prefixes) and not name.endswith("weight_shape")
    )


@pytest.mark.slow  # whole models through Triton's interpreter
@pytest.mark.parametrize(
    "family, scheme_name",
    [(KIMI, "int4-kimi"), (QWEN3, "int8-asym-row+int4-attention"), (QWEN3, "fp8-row"), (QWEN3, "nvfp4")],
    ids=["kimi-int4", "qwen3-int8-row", "qwen3-fp8-row", "qwen3-nvfp4"],
)
def test_the_triton_kernels_read_the_stored_experts_in_place(tmp_path, family, scheme_name):
    """The Triton kernels (in the interpreter) on the pool's rows as the checkpoint stores them, all
    resident and with misses read in place from the host rows, give the reference kernel's greedy tokens."""
    _, folder = write(tmp_path, family, scheme_name)
    prompt = list(range(3, 13))

    def tokens(**options):
        engine = localmoe.load(str(folder), device="cpu", dtype=torch.float32, options=RuntimeOptions(**options))
        return list(engine.generate_ids(prompt, 5)), engine

    expected, _ = tokens(kernels="reference")
    resident, engine = tokens(kernels="triton")
    assert resident == expected and "kernels: triton" in engine.summary()
    slots = engine.plan.footprint.top_k + 1
    assert tokens(kernels="triton", expert_slots=slots, miss_policy="direct")[0] == expected


def test_kimi_keeps_its_experts_in_int4_and_attention_in_bfloat16(tmp_path):
    _, folder = write(tmp_path, KIMI, "int4-kimi")
    engine = localmoe.load(str(folder), device="cpu", dtype=torch.float32)
    spec = engine.experts.layout.spec
    assert (spec.bits, spec.group, spec.symmetric, spec.scale_dtype) == (4, 32, True, torch.bfloat16)
    ckpt = engine.checkpoint
    assert ckpt.stored_form("model.layers.1.self_attn.q_a_proj.weight") is None  # ignored: kept in bfloat16
    assert ckpt.stored_form("model.layers.1.mlp.shared_experts.up_proj.weight") is None


def test_a_module_stored_against_its_config_is_refused(tmp_path):
    _, folder = write(tmp_path, QWEN3, "int8-asym-row+int4-attention")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["ignore"].append("re:.*self_attn.*")  # but the attention is quantized
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(localmoe.LocalMoEError, match="self_attn.q_proj is stored as pack-quantized integers, and"):
        localmoe.load(str(folder), device="cpu")
