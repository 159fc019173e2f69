"""Random checkpoints in the Hub layout, written with localmoe's own dependencies.

`localmoe demo` writes one once into the cache folder so that a newcomer can try the whole path
(checkpoint reader, loader, generation, tokenizer) with no download. The weights are random.
"""

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from localmoe.checkpoint import INDEX_FILE
from localmoe.files import temporary_path
from localmoe.loader import DTYPES, disk_names
from localmoe.models import family_for
from localmoe.models.expert_tensors import block_shapes
from localmoe.models.moe import moe_blocks
from localmoe.paths import cache_dir

BOS, EOS = "<s>", "</s>"
DEMO_FOLDER = "demo-mixtral-tiny-v1"
DEMO_CONFIG: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": 258,  # 256 bytes + BOS + EOS
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1_000_000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "torch_dtype": "bfloat16",
}


def demo_checkpoint() -> Path:
    """The demo checkpoint's folder, written on first use.

    It is written to a temporary folder and renamed into place, so an interrupted first run never
    leaves a half-written checkpoint behind.
    """
    folder = cache_dir() / DEMO_FOLDER
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = temporary_path(folder)  # a run killed while writing it leaves a folder the next run sweeps
    scratch.mkdir()
    try:
        write_random_checkpoint(scratch, DEMO_CONFIG, shard_bytes=1 << 20)
        byte_level_tokenizer().save(str(scratch / "tokenizer.json"))
        scratch.rename(folder)
    except OSError:
        if not folder.is_dir():  # another process finishing first is fine; anything else is not
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def write_random_checkpoint(folder: Path, config: dict[str, Any], *, seed: int = 0, shard_bytes: int = 1 << 30):
    """Write config, generation config and random weights for `config`, under the Hub's tensor names,
    sharded with an index. Norm weights are ones; everything else is N(0, 0.02)."""
    family = family_for(config)
    with torch.device("meta"):
        model = family.model(family.args.from_config(config))
    dtype = DTYPES[config.get("torch_dtype") or config.get("dtype") or "float32"]
    generator = torch.Generator().manual_seed(seed)

    def random(shape, ones: bool = False) -> torch.Tensor:
        values = torch.ones(shape) if ones else torch.randn(shape, generator=generator) * 0.02
        return values.to(dtype)

    parameters = model.named_parameters()
    tensors = {disk_names(model, family, name)[0]: random(p.shape, "norm" in name) for name, p in parameters}
    hub_layout = family.experts[0]  # the Hub's own layout comes first: one tensor per expert and role
    for block in moe_blocks(model):
        shapes = block_shapes(block)
        for expert in range(block.num_experts):
            for role, shape in shapes.items():
                tensors[hub_layout.names[role].format(layer=block.layer_idx, expert=expert)] = random(shape)
    folder.mkdir(parents=True, exist_ok=True)
    _write_shards(folder, tensors, shard_bytes)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id") if key in config}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))


def _write_shards(folder: Path, tensors: dict[str, torch.Tensor], shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        if shards[-1] and size + tensor.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))


def byte_level_tokenizer() -> Tokenizer:
    """A tokenizer with one token per byte (no merges) plus BOS and EOS; it adds BOS to every input."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={char: i for i, char in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([BOS, EOS])
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer
