"""The Inkling families as thinkingmachines releases them, against transformers 5.24 reading the same files
(or run on the weights they decode to).

- Inkling: InklingForConditionalGeneration's layout (`model.llm.*`, `attn.wq_du`, gate and up alternating
  by rows in `w13` tensors), which transformers' save_pretrained writes by reversing its own conversion
  (conversion_mapping.py, "inkling_mm_model") and reads back through it.
"""

import pytest
import torch
from conftest import INKLING, randomize
from quantized_models import check_against_transformers
from safetensors import safe_open

from localmoe.runtime.layouts import ExpertLayout

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
