"""Tiny quantized checkpoints against transformers run on their decoded weights: how the format tests
write them and what they check (the same for every format)."""

import json
from collections.abc import Callable
from pathlib import Path

import torch
from conftest import hf_model
from safetensors.torch import load_file, save_file

import localmoe
from localmoe.engine import RuntimeOptions

TOLERANCE = 1e-4  # float32 logits: the same decoded weights, multiplied and summed in other orders


def linear(name: str, tensor: torch.Tensor) -> bool:
    """A linear layer's weight (not an embedding, a norm or a router), as quantizers see them."""
    skip = ("embed_tokens", "norm", ".gate.weight", "lm_head")  # .gate: the routers
    return tensor.dim() == 2 and name.endswith(".weight") and not any(part in name for part in skip)


def quantized_checkpoint(
    config_class: str,
    config: dict,
    folder: Path,
    quantize: Callable[[str, torch.Tensor], dict | None],
    quantization_config: dict,
    **config_changes,
):
    """(transformers on the decoded weights, a checkpoint in `folder` storing them quantized). `quantize`
    maps a weight's name and tensor to the tensors its module stores instead ({suffix: tensor}, and the
    weight they decode to under "decoded"), or None to keep it."""
    plain = folder / "decoded"
    hf_model(config_class, **config).save_pretrained(plain)  # the Hub's per-expert names
    state, stored = load_file(str(plain / "model.safetensors")), {}
    for name, tensor in state.items():
        parts = quantize(name, tensor)
        if parts is None:
            stored[name] = tensor
            continue
        state[name] = parts.pop("decoded").float().contiguous()
        stored.update({f"{name.removesuffix('.weight')}.{suffix}": part for suffix, part in parts.items()})
    save_file(state, str(plain / "model.safetensors"), metadata={"format": "pt"})
    quantized = folder / "quantized"
    quantized.mkdir()
    save_file({k: v.contiguous() for k, v in stored.items()}, str(quantized / "model.safetensors"))
    config_json = json.loads((plain / "config.json").read_text())
    config_json.update(quantization_config=quantization_config, **config_changes)
    (quantized / "config.json").write_text(json.dumps(config_json))
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval(), quantized


def check_against_transformers(reference, folder: Path, layout: type, slot_counts=(3, 5, 9)) -> dict:
    """localmoe on the quantized checkpoint, all experts resident and offloaded at each slot count, gives
    transformers' logits (within TOLERANCE) and greedy tokens, with the experts in rows of `layout` and
    each miss copying one such row. Returns the offloaded engine's store, for more checks."""
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(4))
    resident = localmoe.load(str(folder), device="cpu", dtype=torch.float32)
    assert isinstance(resident.experts.layout, layout)
    with torch.no_grad():
        expected = reference(ids).logits
        greedy = reference.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = resident.model(ids, resident.model.new_cache(1, 20), all_logits=True)
    assert (got - expected).abs().max().item() < TOLERANCE
    tokens = greedy[0, 20:].tolist()
    assert list(resident.generate_ids(ids[0].tolist(), 10)) == tokens
    options = RuntimeOptions(expert_slots=max(slot_counts), miss_policy="copy", prefetch=0)
    offloaded = localmoe.load(str(folder), device="cpu", dtype=torch.float32, options=options)
    store = offloaded.experts.cache.store
    assert isinstance(store.layout, layout) and offloaded.plan.footprint.expert_bytes == store.expert_bytes
    for slots in slot_counts:
        offloaded.reconfigure(slots=slots, cold=True)
        assert list(offloaded.generate_ids(ids[0].tolist(), 10)) == tokens, f"{slots} slots"
        total = offloaded.experts.cache.totals()
        assert total.misses > 0 and total.bytes_copied == total.misses * store.expert_bytes
    return store
