"""The Inkling families as thinkingmachines releases them, against transformers 5.24 reading the same files
(or run on the weights they decode to).

- Inkling: InklingForConditionalGeneration's layout (`model.llm.*`, `attn.wq_du`, gate and up alternating
  by rows in `w13` tensors), which transformers' save_pretrained writes by reversing its own conversion
  (conversion_mapping.py, "inkling_mm_model") and reads back through it.
- Inkling 2: the MXFP8 release (thinkingmachines/Inkling-2-Small-MXFP8): each routed expert tensor
  `w13_weight`/`w2_weight` float8 e4m3 with `_scale`, a ue8m0 exponent byte per 32 inputs, and
  quantization_config fp8 with weight_block_size [1, 32] and scale_fmt ue8m0, as transformers' FP8
  quantizer reads it (quantizer_finegrained_fp8.py). Written by transformers' own quantizer (Fp8Quantize,
  integrations/finegrained_fp8.py) and decoded for the reference by transformers' own decoding of these
  tensors (Inkling2LoopDequantizeExperts, core_model_loading.py).
- Inkling 2 Loop: NVFP4 experts (e2m1 codes, e4m3 scales per 16 inputs, and per expert `_amax` over
  `_outer_scale_denominator`), MXFP8 ones, or both in one checkpoint, with no quantization_config: read
  by transformers itself through that decoding. Written by ModelOpt's NVFP4QTensor per expert, whose
  matrix scale amax / (6 x 448) is the release's factor with a denominator of 2688.
"""

import json
import re
import types

import pytest
import torch
from conftest import INKLING, INKLING2, INKLING2_LOOP, INKLING2_VISION, randomize
from quantized_models import check_against_transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from localmoe.runtime.layouts import ExpertLayout, Fp8Layout, Nvfp4Layout

TOWERS = dict(
    vision_config=dict(hidden_size=16, n_layers=1, num_attention_heads=2, patch_size=4),
    audio_config=dict(n_mel_bins=8, mel_vocab_size=16),
)


@pytest.fixture(scope="module")
def inkling_release(tmp_path_factory):
    """(transformers reading the release, its folder)."""
    import transformers

    config = transformers.InklingConfig(text_config=INKLING, **TOWERS)
    torch.manual_seed(0)
    wrapper = transformers.InklingForConditionalGeneration(config).eval()
    randomize(wrapper)
    folder = tmp_path_factory.mktemp("inkling-release")
    wrapper.save_pretrained(folder)
    reference = transformers.InklingForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return reference, folder


def test_inkling_loads_as_released(inkling_release):
    reference, folder = inkling_release
    with safe_open(str(folder / "model.safetensors"), "pt") as stored:
        names = set(stored.keys())
    layer = "model.llm.layers.{}."
    release = {
        layer.format(0) + "mlp.w13_dn.weight",  # the dense MLP's gate and up, rows alternating
        layer.format(1) + "mlp.shared_experts.shared_w13_weight",
        layer.format(1) + "mlp.experts.w13_weight",
        layer.format(1) + "attn.wq_du.weight",
    }
    assert release <= names and not any("gate_proj" in name or "up_proj" in name for name in names)
    check_against_transformers(reference, folder, ExpertLayout)


EXPERTS = re.compile(r"model\.llm\.layers\.\d+\.mlp\.experts\.w(13|2)_weight")
MXFP8_CONFIG = {
    "quant_method": "fp8",
    "activation_scheme": "dynamic",
    "weight_block_size": [1, 32],
    "scale_fmt": "ue8m0",
}


def mxfp8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """An expert tensor [E, R, C] as MXFP8, by transformers' FP8 quantizer at 1 x 32 blocks with ue8m0
    scales: {"": e4m3 weights, "_scale": exponent bytes [E, R, C / 32]}."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    config = FineGrainedFP8Config(weight_block_size=(1, 32), scale_fmt="ue8m0")
    quantized = Fp8Quantize(types.SimpleNamespace(quantization_config=config))._quantize_one("w", weight)
    return {"": quantized["w"], "_scale": quantized["w_scale_inv"].view(torch.uint8)}


def transformers_decoding(name: str, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers 5.24's decoding of one release expert tensor ({suffix: tensor}), in float32."""
    from transformers.core_model_loading import Inkling2LoopDequantizeExperts

    suffixes = ("", "_scale", "_amax", "_outer_scale_denominator")
    inputs = {name + suffix: stored[suffix] for suffix in suffixes if suffix in stored}
    model = types.SimpleNamespace(get_parameter=lambda _: torch.empty(0))  # decode to float32
    decoded = Inkling2LoopDequantizeExperts().convert(
        inputs, [name + suffix for suffix in suffixes], ["decoded"], model=model, full_layer_name="decoded"
    )
    return decoded["decoded"]


def quantized_release(folder, config_class: str, model_class: str, text: dict, quantize, quantization_config):
    """(the release's folder, the same model with its experts decoded, in the release layout otherwise):
    a randomised multimodal model saved by transformers in the release layout, its routed experts then
    stored as `quantize` gives them ({suffix: tensor} per expert tensor)."""
    import transformers

    config = getattr(transformers, config_class)(text_config=text, vision_config=INKLING2_VISION)
    torch.manual_seed(0)
    wrapper = getattr(transformers, model_class)(config).eval()
    randomize(wrapper)
    decoded, release = folder / "decoded", folder / "release"
    wrapper.save_pretrained(decoded)
    state, stored = load_file(str(decoded / "model.safetensors")), {}
    for name, tensor in state.items():
        if not EXPERTS.fullmatch(name):
            stored[name] = tensor
            continue
        parts = quantize(name, tensor)
        stored.update({name + suffix: part.contiguous() for suffix, part in parts.items()})
        state[name] = transformers_decoding(name, parts)
    save_file(state, str(decoded / "model.safetensors"), metadata={"format": "pt"})
    release.mkdir()
    save_file(stored, str(release / "model.safetensors"), metadata={"format": "pt"})
    config_json = json.loads((decoded / "config.json").read_text())
    if quantization_config:
        config_json["quantization_config"] = quantization_config
    (release / "config.json").write_text(json.dumps(config_json))
    return release, decoded


def test_inkling2_mxfp8_experts_stay_fp8(tmp_path):
    import transformers

    release, decoded = quantized_release(
        tmp_path, "Inkling2Config", "Inkling2ForConditionalGeneration", INKLING2, lambda _, w: mxfp8(w), MXFP8_CONFIG
    )
    reference = transformers.Inkling2ForConditionalGeneration.from_pretrained(decoded, dtype=torch.float32).eval()
    store = check_against_transformers(reference, release, Fp8Layout)
    assert store.layout.exponents and store.layout.block == (1, 32)
    # a row holds the stored bytes: the e4m3 weights and an exponent byte per 32, each of its four sections
    # padded to 16 bytes
    weights = 3 * INKLING2["moe_intermediate_size"] * 64
    assert weights + weights // 32 <= store.expert_bytes <= weights + weights // 32 + 4 * 16


def test_inkling2_experts_in_another_float8_are_refused_in_one_line(tmp_path):
    """float8 e5m2 elements (another MX variant) are not read: one line naming them, exit status 2."""
    from click.testing import CliRunner

    from localmoe.cli import main

    def e5m2(name, weight):
        parts = mxfp8(weight)
        return {**parts, "": parts[""].float().to(torch.float8_e5m2)} if "w2_" in name else parts

    release, _ = quantized_release(
        tmp_path, "Inkling2Config", "Inkling2ForConditionalGeneration", INKLING2, e5m2, MXFP8_CONFIG
    )
    result = CliRunner().invoke(main, ["plan", str(release), "--device", "cpu"])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert re.search(r"w2_weight is float8_e5m2 with uint8 scales, a form .* localmoe does not read", line), line


def nvfp4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """An expert tensor [E, R, C] as NVFP4, each expert by ModelOpt's NVFP4QTensor: {"": codes [E, R, C / 2],
    "_scale": e4m3 [E, R, C / 16], "_amax": [E], "_outer_scale_denominator": 6 x 448}, whose factor
    amax / denominator is the matrix scale ModelOpt quantized each expert with."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    experts = [NVFP4QTensor.quantize(matrix.float(), 16) for matrix in weight]
    amax = weight.float().abs().amax(dim=(1, 2))
    denominator = torch.tensor(6.0 * 448.0)
    assert torch.equal(torch.stack([scale_2.reshape(()) for _, _, scale_2 in experts]), amax / denominator)
    return {
        "": torch.stack([packed._quantized_data for packed, _, _ in experts]),
        "_scale": torch.stack([scale for _, scale, _ in experts]),
        "_amax": amax,
        "_outer_scale_denominator": denominator,
    }


@pytest.mark.parametrize("mixed", [False, True], ids=["nvfp4", "nvfp4-and-mxfp8"])
def test_inkling2_loop_quantized_experts(tmp_path, mixed):
    """NVFP4 experts stay NVFP4 (the factor amax / denominator each matrix's scale); a checkpoint whose
    gate_up and down differ in form (NVFP4 and MXFP8) has its experts decoded to the compute dtype."""
    import transformers

    def quantize(name, weight):
        return mxfp8(weight) if mixed and "w2_" in name else nvfp4(weight)

    release, _ = quantized_release(
        tmp_path, "Inkling2LoopConfig", "Inkling2LoopForConditionalGeneration", INKLING2_LOOP, quantize, None
    )
    model_class = transformers.Inkling2LoopForConditionalGeneration
    reference = model_class.from_pretrained(release, dtype=torch.float32).eval()  # transformers' own decoding
    store = check_against_transformers(reference, release, ExpertLayout if mixed else Nvfp4Layout)
    if not mixed:
        # a row holds the stored bytes: half a byte per weight, an e4m3 scale per 16, and the three matrices'
        # factors (gate's and up's the expert's w13 factor), each of its six sections padded to 16 bytes
        weights = 3 * INKLING2_LOOP["moe_intermediate_size"] * 64
        stored = weights // 2 + weights // 16 + 3 * 4
        assert stored <= store.expert_bytes <= stored + 6 * 16
