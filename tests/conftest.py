"""Tiny random checkpoints written by transformers, the correctness oracle of the tests."""

import contextlib
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter, on the CPU; set before anything imports them
    os.environ.setdefault("TRITON_INTERPRET", "1")

SMALL_SHARDS = "20KB"  # small enough that one layer's experts land in several shards


# Buffers derived from the architecture rather than learned: MiniMax's decay rates and their powers.
DERIVED_BUFFERS = ("inv_freq", "slope_rate", "_decay")


@pytest.fixture(scope="session", autouse=True)
def localmoe_cache(tmp_path_factory):
    """localmoe's cache folder (the miss policy's calibration, the demo) in a temporary place, never the user's."""
    folder = tmp_path_factory.mktemp("localmoe-cache")
    previous = os.environ.get("LOCALMOE_CACHE")
    os.environ["LOCALMOE_CACHE"] = str(folder)
    yield folder
    if previous is None:
        del os.environ["LOCALMOE_CACHE"]
    else:
        os.environ["LOCALMOE_CACHE"] = previous


DAMAGED_ON_PURPOSE = ("broken",)  # fixtures that are private copies of a checkpoint for a test to damage


def digest(folder: Path) -> dict[str, str]:
    """Every file under `folder`, by name, with the SHA-256 of its bytes."""
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def checkpoint_folders(value) -> list[Path]:
    """The checkpoint folders in a fixture's value: a folder with a config.json, given as a path or a
    string, alone or in a tuple, list or dict."""
    if isinstance(value, tuple | list):
        return [folder for item in value for folder in checkpoint_folders(item)]
    if isinstance(value, dict):
        return checkpoint_folders(list(value.values()))
    try:
        if isinstance(value, str | Path) and (Path(value) / "config.json").is_file():
            return [Path(value)]
    except (OSError, ValueError):  # a string that is no path at all
        pass
    return []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Every checkpoint a test is given hashes the same after the test: localmoe never writes to one."""
    fixtures = getattr(item, "funcargs", {})
    folders = {
        f for name, value in fixtures.items() if name not in DAMAGED_ON_PURPOSE for f in checkpoint_folders(value)
    }
    before = {folder: digest(folder) for folder in folders}
    result = yield
    for folder, files in before.items():
        assert digest(folder) == files, f"the test changed the checkpoint in {folder}"
    return result


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter and learned buffer a random value: defaults such as zero biases or unit
    norms hide bugs. Norm weights (and Gemma 4's layer scalars) stay near one so that activations keep a
    sane scale through the stack.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("tid2eid"):  # DeepSeek-V4's token -> experts table: distinct experts per token
                experts = model.config.n_routed_experts
                tensor.copy_(
                    torch.rand(tensor.shape[0], experts, generator=generator).argsort(-1)[:, : tensor.shape[1]]
                )
            if not tensor.is_floating_point() or any(derived in name for derived in DERIVED_BUFFERS):
                continue
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]  # DBRX's attention sits inside `norm_attn_norm`
            center = 1.0 if "norm" in module or "layer_scalar" in name else 0.0
            tensor.copy_(center + 0.1 * noise)


def hf_model(config_class: str, **config):
    """A randomised transformers causal LM in float32, in eval mode: the whole multimodal model for a
    family that transformers has only that way (Qwen3-VL-MoE)."""
    import transformers

    cfg = getattr(transformers, config_class)(**config)
    torch.manual_seed(0)
    try:
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    except ValueError:
        # a language model transformers defines only inside its multimodal model: that whole model; a model
        # the auto classes do not list (Mistral 4): its own causal LM or wrapper class
        try:
            model = transformers.AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32).eval()
        except ValueError:
            name = config_class.removesuffix("Config")
            model_class = getattr(transformers, name + "ForCausalLM", None) or getattr(
                transformers, name + "ForConditionalGeneration"
            )
            model = model_class._from_config(cfg, dtype=torch.float32).eval()
    randomize(model)
    return model


def save_hf(model, folder: Path, layout: str) -> Path:
    """Write `model` as transformers does: `sharded` (index + small shards), `single` (one
    model.safetensors), or `fused` (the in-memory 3-D expert tensors, as transformers 5 also loads);
    or `transposed`: single, with the fused experts transposed as Qwen3-VL-MoE's releases store them
    (transformers 5.24 transposes them when loading, and writes them untransposed)."""
    if layout == "sharded":
        model.save_pretrained(folder, max_shard_size=SMALL_SHARDS)
    elif layout == "single":
        model.save_pretrained(folder)
    elif layout == "fused":
        from safetensors.torch import save_file

        model.save_pretrained(folder)
        (folder / "model.safetensors").unlink()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif layout == "transposed":
        from safetensors.torch import load_file, save_file

        model.save_pretrained(folder)
        state = load_file(str(folder / "model.safetensors"))
        fused = (".experts.gate_up_proj", ".experts.down_proj")
        state = {k: v.transpose(1, 2).contiguous() if k.endswith(fused) else v for k, v in state.items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        raise ValueError(layout)
    assert (folder / "config.json").is_file()
    return folder


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture
def tiny_mixtral(tmp_path):
    """A sharded tiny Mixtral checkpoint with a byte-level tokenizer."""
    from localmoe.demo import byte_level_tokenizer

    model = hf_model("MixtralConfig", **MIXTRAL)
    folder = save_hf(model, tmp_path / "mixtral", "sharded")
    byte_level_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


# What every tiny config shares: a byte-level vocabulary with BOS and EOS after it, 64 wide, 4 heads.
BASE = dict(
    vocab_size=258,
    hidden_size=64,
    num_attention_heads=4,
    max_position_embeddings=256,
    bos_token_id=256,
    eos_token_id=257,
)

MIXTRAL = dict(
    BASE,
    intermediate_size=96,
    num_hidden_layers=3,
    num_key_value_heads=2,
    num_local_experts=5,
    num_experts_per_tok=2,
)

QWEN2_MOE = dict(
    BASE,
    intermediate_size=112,
    moe_intermediate_size=40,
    shared_expert_intermediate_size=72,
    num_hidden_layers=3,
    num_key_value_heads=2,
    num_experts=6,
    num_experts_per_tok=2,
)

OLMOE = dict(
    BASE,
    intermediate_size=48,
    num_hidden_layers=3,
    num_key_value_heads=2,
    num_experts=6,
    num_experts_per_tok=3,
)

DEEPSEEK_V2 = dict(
    BASE,
    intermediate_size=96,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    kv_lora_rank=32,
    q_lora_rank=24,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
)

GLM4_MOE = dict(
    BASE,
    intermediate_size=96,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    num_key_value_heads=2,
    head_dim=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
)

GPT_OSS = dict(
    BASE,
    intermediate_size=32,  # MXFP4 groups inputs by 32
    num_hidden_layers=3,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=5,
    num_experts_per_tok=2,
    sliding_window=8,
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 150000.0,
        "factor": 4.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 64,
    },
)

PHIMOE = dict(
    BASE,
    intermediate_size=48,
    num_hidden_layers=3,
    num_key_value_heads=2,
    num_local_experts=6,
    num_experts_per_tok=2,
)

MINIMAX = dict(
    BASE,
    intermediate_size=48,
    num_hidden_layers=4,
    num_key_value_heads=2,
    num_local_experts=5,
    num_experts_per_tok=2,
    block_size=8,  # prompts span several blocks
)

MINIMAX_M2 = dict(
    BASE,
    intermediate_size=32,
    num_hidden_layers=3,
    num_key_value_heads=2,
    head_dim=16,
    rotary_dim=8,  # the older spelling of partial rotary: half of each head
    num_local_experts=6,
    num_experts_per_tok=2,
)

ERNIE = dict(
    BASE,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_key_value_heads=2,
    moe_num_experts=6,
    moe_k=2,
    moe_num_shared_experts=1,
)

HUNYUAN = dict(
    BASE,
    intermediate_size=32,
    num_hidden_layers=3,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=5,
    moe_topk=2,
)

QWEN3_MOE = dict(
    BASE,
    intermediate_size=112,
    moe_intermediate_size=48,
    num_hidden_layers=4,
    num_key_value_heads=2,
    head_dim=24,
    num_experts=7,
    num_experts_per_tok=3,
)


CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world! How are you today?",
    "Mixture-of-Experts models route every token to a few experts; caching the hot ones saves copies.",
    "héllo wörld, 世界 and emoji 🙂 — unicode text for the merges, 12345 numbers too.",
]


def train_tokenizer(style: str, specials: list[str], vocab_size: int = 420):
    """A small trained BPE tokenizer, in one of the two families real checkpoints use:
    `byte_level` (GPT-2, Qwen, DeepSeek) or `metaspace` (SentencePiece-style with byte fallback:
    Llama 2, Mistral, Mixtral)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if style == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator(CORPUS * 20, trainer)
        return tok
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", *specials])
    base.train_from_iterator(CORPUS * 20, trainer)
    trained = json.loads(base.to_str())["model"]
    vocab = dict(trained["vocab"])
    for byte in range(256):  # byte fallback: characters outside the vocab become <0xNN> tokens
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = base.normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<unk>", *specials])
    return tok


def save_tokenizer(tok, folder: Path, chat_template=None, **special) -> Path:
    """Write a tokenizer the way transformers 5 does (tokenizer.json, tokenizer_config.json, chat_template.jinja)."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=chat_template, **special).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory):
    """A tiny Mixtral with a trained byte-level tokenizer and a ChatML template. It has no EOS id, so
    answers run to their token limit, which gives Ctrl-C something to interrupt."""
    from test_chat_template import CHATML_WITH_TOOLS

    tok = train_tokenizer("byte_level", ["<|im_start|>", "<|im_end|>"])
    config = {**MIXTRAL, "vocab_size": tok.get_vocab_size(), "max_position_embeddings": 4096}
    config.update(bos_token_id=None, eos_token_id=None)
    folder = save_hf(hf_model("MixtralConfig", **config), tmp_path_factory.mktemp("chat"), "sharded")
    return save_tokenizer(tok, folder, CHATML_WITH_TOOLS, eos_token="<|im_end|>")


LLAMA4 = dict(
    BASE,
    intermediate_size=32,
    intermediate_size_mlp=48,
    num_hidden_layers=4,  # the fourth has no rotary and attends to everything
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=5,
    num_experts_per_tok=1,
    attention_chunk_size=8,  # prompts span several chunks
    floor_scale=8,  # and the query temperature changes within them
)

QWEN3_5_MOE = dict(
    BASE,
    num_hidden_layers=4,  # three Gated DeltaNet layers, then full attention
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,  # two value heads per key head
    linear_key_head_dim=16,
    linear_value_head_dim=8,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    num_experts=6,
    num_experts_per_tok=2,
)

GEMMA4 = dict(
    BASE,
    intermediate_size=48,
    num_hidden_layers=4,  # three sliding-window layers, then a global one
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=1,
    attention_k_eq_v=True,
    sliding_window=8,  # shorter than the prompts
    enable_moe_block=True,
    num_experts=6,
    top_k_experts=2,
    moe_intermediate_size=24,
    hidden_size_per_layer_input=8,
    vocab_size_per_layer_input=258,
    final_logit_softcapping=30.0,
    pad_token_id=0,
)

MELLUM = dict(
    BASE,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    sliding_window=8,  # shorter than the prompts
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
    rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 500000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    },
)

MISTRAL4 = dict(
    BASE,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=3,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    routed_scaling_factor=1.5,
    max_position_embeddings=512,
    # yarn as the release has it, with an original context of 4 so that the query scaling grows in the prompt
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 4,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "llama_4_scaling_beta": 0.1,
    },
    pad_token_id=0,
)

GLM_MOE_DSA = dict(
    BASE,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=2.5,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=12,
    index_topk=8,  # fewer than the prompt's tokens: the selection cuts
    index_head_dim=16,
    index_n_heads=16,  # enough heads that relu leaves no exact ties for top-k to break either way
    index_topk_freq=2,
    index_skip_topk_offset=2,  # full, full, shared, full
    first_k_dense_replace=1,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)

DEEPSEEK_V4 = dict(
    BASE,
    moe_intermediate_size=32,
    num_hidden_layers=4,
    num_key_value_heads=1,
    head_dim=32,
    q_lora_rank=32,
    partial_rotary_factor=0.25,
    num_experts_per_tok=2,
    n_routed_experts=8,
    n_shared_experts=1,
    layer_types=[
        "sliding_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
        "compressed_sparse_attention",
    ],
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    sliding_window=8,  # shorter than the prompts
    o_groups=2,
    o_lora_rank=16,
    index_n_heads=2,
    index_head_dim=16,
    index_topk=64,  # at least the entries of the tests: no top-k ties (relu zeros) to break either way
    hc_mult=3,  # with 2 streams, a doubly stochastic mix is symmetric and hides a transposition
    hc_sinkhorn_iters=5,
)

# Every family at tiny size, keyed by model_type: (transformers config class, config).
QWEN3_NEXT = dict(
    BASE,
    intermediate_size=40,
    num_hidden_layers=4,  # three Gated DeltaNet layers, then full attention
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,  # two value heads per key head: the grouped projections interleave them
    linear_key_head_dim=16,
    linear_value_head_dim=8,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    num_experts=6,
    num_experts_per_tok=2,
    mlp_only_layers=[1],  # a dense layer between sparse ones
)

QWEN3_VL_MOE_TEXT = dict(
    BASE,
    intermediate_size=112,
    moe_intermediate_size=48,
    num_hidden_layers=4,
    num_key_value_heads=2,
    head_dim=24,
    num_experts=7,
    num_experts_per_tok=3,
    mlp_only_layers=[1],  # a dense layer between sparse ones
    # sections of rotary frequencies for time, height and width: the same positions for text tokens
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 4, 4]},
)
QWEN3_VL_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=4)
# Qwen3-VL-MoE exists in transformers only with its vision tower: its tests run the whole model
QWEN3_VL_MOE = dict(text_config=QWEN3_VL_MOE_TEXT, vision_config=QWEN3_VL_VISION)

GLM4_MOE_LITE = dict(
    BASE,
    intermediate_size=96,
    moe_intermediate_size=24,
    num_hidden_layers=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    mlp_layer_types=["dense", "sparse", "dense", "sparse"],  # a dense layer between sparse ones
    kv_lora_rank=32,
    q_lora_rank=24,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
)

NEMOTRON_H = dict(
    BASE,
    # every kind of block, attention (without position embeddings) after recurrent state has built up
    layers_block_type=["linear_attention", "moe", "full_attention", "mlp", "linear_attention", "moe"],
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=48,
    ssm_state_size=8,
    mamba_num_heads=8,
    mamba_head_dim=8,
    n_groups=2,
    conv_kernel=4,
    n_routed_experts=6,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=40,
    routed_scaling_factor=1.5,
    pad_token_id=0,
)

GRANITE_MOE_HYBRID = dict(
    BASE,
    intermediate_size=32,
    shared_intermediate_size=48,
    num_hidden_layers=4,
    layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
    num_key_value_heads=2,
    num_local_experts=6,
    num_experts_per_tok=2,
    mamba_n_heads=8,
    mamba_d_head=16,
    mamba_d_state=8,
    mamba_n_groups=2,
    # muP multipliers
    embedding_multiplier=12.0,
    residual_multiplier=0.22,
    attention_multiplier=0.015625,
    logits_scaling=2.0,
    pad_token_id=0,
)

LFM2_MOE = dict(
    BASE,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=4,
    layer_types=["conv", "conv", "full_attention", "conv"],
    num_key_value_heads=2,
    num_dense_layers=1,
    num_experts=6,
    num_experts_per_tok=2,
    routed_scaling_factor=1.5,
)

KIMI_LINEAR = dict(
    BASE,
    intermediate_size=96,
    moe_intermediate_size=24,
    num_hidden_layers=4,
    layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
    mlp_layer_types=["dense", "sparse", "sparse", "dense"],  # a dense layer after sparse ones too
    num_local_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    routed_scaling_factor=1.5,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    linear_head_dim=16,
    linear_num_heads=4,
    pad_token_id=0,
)

AFMOE = dict(
    BASE,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=4,  # three sliding-window layers, then a global one without rotary
    num_key_value_heads=2,
    head_dim=16,
    num_dense_layers=1,
    num_experts=6,
    num_experts_per_tok=2,
    num_shared_experts=1,
    route_scale=1.5,
    sliding_window=8,  # shorter than the prompts
    mup_enabled=True,
)

LAGUNA = dict(
    BASE,
    intermediate_size=96,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=40,
    num_hidden_layers=4,
    num_attention_heads_per_layer=[4, 8, 4, 8],  # more heads on the full layers
    num_key_value_heads=2,
    head_dim=16,
    num_experts=6,
    num_experts_per_tok=2,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    sliding_window=8,  # shorter than the prompts
    moe_routed_scaling_factor=1.5,
    moe_router_logit_softcapping=2.0,
)

DOTS1 = dict(
    BASE,
    intermediate_size=96,
    moe_intermediate_size=24,
    num_hidden_layers=4,
    num_key_value_heads=2,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.0,
    sliding_window=8,  # shorter than the prompts, on the layers from max_window_layers on
    max_window_layers=2,
)

SOLAR_OPEN = dict(
    BASE,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    num_key_value_heads=2,
    head_dim=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    routed_scaling_factor=1.5,
)

EXAONE_MOE = dict(
    BASE,
    intermediate_size=96,
    moe_intermediate_size=24,
    num_hidden_layers=4,  # three sliding-window layers with rotary, then a global one without
    num_key_value_heads=2,
    num_experts=8,
    num_experts_per_tok=2,
    num_shared_experts=1,
    sliding_window=8,  # shorter than the prompts
    pad_token_id=0,
)

HY_V3 = dict(
    BASE,
    intermediate_size=96,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
)

SARVAM_MOE = dict(
    BASE,
    intermediate_size=96,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,  # the original config's names
    num_shared_experts=1,
    num_experts_per_tok=2,
)

DEEPSEEK_V32 = dict(
    BASE,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=2.5,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=12,
    index_topk=8,  # fewer than the prompt's tokens: the selection cuts
    index_head_dim=16,
    index_n_heads=16,  # enough heads that relu leaves no exact ties for top-k to break either way
    first_k_dense_replace=1,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)

COHERE2_MOE = dict(
    BASE,
    intermediate_size=24,  # routed and shared experts
    prefix_dense_intermediate_size=48,
    num_hidden_layers=5,  # a dense prefix layer, then three sliding-window layers and a global one
    num_key_value_heads=2,
    head_dim=16,
    num_experts=6,
    num_experts_per_tok=2,
    num_shared_experts=1,
    first_k_dense_replace=1,
    sliding_window=8,  # shorter than the prompts
    pad_token_id=0,
)

# GLM-4.5V's language model, only ever built inside its multimodal model
GLM4V_MOE = dict(
    text_config={
        **GLM4_MOE,
        "n_group": 2,
        "topk_group": 1,
        # sections of the 4 rotated frequencies (half of a 16-wide head) for time, height and width
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    },
    vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=4),
)

MIMO_V2_FLASH = dict(
    BASE,
    intermediate_size=96,
    moe_intermediate_size=24,
    num_hidden_layers=4,
    num_key_value_heads=1,  # two on the sliding-window layers
    head_dim=24,  # rotary on int(24 x 0.334) = 8 dims by default
    v_head_dim=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    sliding_window=8,  # shorter than the prompts
    layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
)

# Step-3.7-Flash's language model, only ever built inside its multimodal model
STEP3P7 = dict(
    text_config=dict(
        BASE,
        intermediate_size=96,
        moe_intermediate_size=24,
        share_expert_dim=32,
        num_hidden_layers=4,
        num_sliding_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_router_scaling_factor=1.5,
        sliding_window=8,  # shorter than the prompts
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
        # small enough to clamp the random activations: the dense layer, a MoE layer's experts and shared expert
        swiglu_limits=[0.0, 0.0, 0.3, 0.0],
        swiglu_limits_shared=[0.3, 0.0, 0.3, 0.0],
    ),
    vision_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=4),
)

# MiniMax-M3's language model, inside its multimodal model (the release's layout)
MINIMAX_M3 = dict(
    text_config=dict(
        BASE,
        intermediate_size=24,
        dense_intermediate_size=48,
        shared_intermediate_size=32,
        num_hidden_layers=4,
        num_key_value_heads=2,
        head_dim=16,
        rotary_dim=8,
        # transformers reads the rotated width from here only (see test_parity)
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        num_local_experts=8,
        num_experts_per_tok=2,
        swiglu_limit=0.5,  # small enough to clamp
        index_n_heads=2,  # one per KV head
        index_head_dim=16,
        index_block_size=4,  # prompts span several blocks, more than the selection keeps
        index_topk_blocks=3,
        index_local_blocks=2,
        layer_types=["full_attention", "minimax_m3_sparse", "minimax_m3_sparse", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
    ),
    vision_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=4),
    projector_hidden_size=32,
)

ZAYA = dict(
    BASE,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    num_key_value_heads=2,
    head_dim=16,
    cca_time0=2,
    cca_time1=3,  # the convolutions read the three tokens before each
    num_experts=4,
    router_hidden_size=16,
    sliding_window=8,  # shorter than the prompts
    layer_types=["hybrid", "hybrid_sliding", "hybrid"],
    rope_parameters={
        "hybrid": {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5},
        "hybrid_sliding": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    },
    pad_token_id=0,
)

BAILING_HYBRID = dict(
    BASE,
    intermediate_size=96,
    moe_intermediate_size=24,
    num_hidden_layers=4,  # two delta attention layers, latent attention, delta attention
    layer_group_size=3,
    num_key_value_heads=4,
    head_dim=16,  # the delta attention's
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=12,
    num_local_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    pad_token_id=0,
)

GRANITE_MOE = dict(
    BASE,
    intermediate_size=32,
    shared_intermediate_size=48,  # GraniteMoe ignores it; GraniteMoeShared adds the shared MLP
    num_hidden_layers=3,
    num_key_value_heads=2,
    num_local_experts=6,
    num_experts_per_tok=2,
    # muP multipliers
    embedding_multiplier=12.0,
    residual_multiplier=0.22,
    attention_multiplier=0.015625,
    logits_scaling=2.0,
    pad_token_id=0,
)

GRANITE_MOE_SWA = dict(
    GRANITE_MOE,
    num_hidden_layers=4,
    sliding_window=8,  # shorter than the prompts
    layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
    layer_rope_theta=[10000.0, 0, 500000.0, 0],  # two bases, and layers without position embeddings
)

FLEX_OLMO = dict(
    BASE,
    intermediate_size=48,
    num_hidden_layers=3,
    num_key_value_heads=2,
    num_experts=6,
    num_experts_per_tok=2,
    pad_token_id=0,
)

DBRX = dict(
    BASE,
    d_model=64,
    n_heads=4,
    n_layers=3,
    max_seq_len=256,
    # transformers 5.24 needs attn_config's rope_theta and rotates by the top-level one: both given
    attn_config={"kv_n_heads": 2, "clip_qkv": 0.3, "rope_theta": 500000.0},
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 6, "moe_top_k": 2},
    pad_token_id=0,
)

QWEN3_OMNI_MOE_TEXT = dict(
    BASE,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=6,
    num_experts_per_tok=2,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3], "interleaved": True},
)
QWEN3_OMNI_MOE = dict(  # the thinker: the language model beside tiny audio and vision towers
    text_config=QWEN3_OMNI_MOE_TEXT,
    audio_config=dict(
        num_mel_bins=16,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=32,
        d_model=16,
        output_dim=64,
        n_window=4,
        downsample_hidden_size=8,
    ),
    vision_config=dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=64,
        patch_size=4,
        deepstack_visual_indexes=[0],
    ),
)

JAMBA = dict(
    BASE,
    intermediate_size=48,
    num_hidden_layers=4,  # Mamba, attention, Mamba, Mamba; experts on the odd layers
    num_key_value_heads=2,
    attn_layer_period=2,
    attn_layer_offset=1,
    expert_layer_period=2,
    expert_layer_offset=1,
    num_experts=6,
    num_experts_per_tok=2,
    mamba_d_state=8,
    mamba_dt_rank=8,
    pad_token_id=0,
)

ARIA_TEXT = dict(
    BASE,
    intermediate_size=32,
    num_hidden_layers=3,
    num_key_value_heads=2,
    moe_num_experts=6,
    moe_topk=2,
    moe_num_shared_experts=2,
    hidden_act="gelu",  # the shared experts' activation; the routed ones are SiLU-gated regardless
    pad_token_id=0,
)

JETMOE = dict(
    BASE,
    num_hidden_layers=3,
    num_key_value_heads=2,
    kv_channels=16,
    intermediate_size=32,
    num_local_experts=5,
    num_experts_per_tok=2,
    rms_norm_eps=1e-5,  # the final norm's; the layers' keep 1e-6
    pad_token_id=0,
)

ERNIE4_5_VL_MOE = dict(  # the language model beside a tiny vision tower
    text_config=dict(
        BASE,
        intermediate_size=96,
        moe_intermediate_size=[32, 24],  # text experts, vision experts
        num_hidden_layers=3,
        num_key_value_heads=2,
        moe_num_experts=6,
        moe_k=2,
        moe_num_shared_experts=1,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [2, 2, 4]},
    ),
    vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4),
)

AXK1 = dict(
    DEEPSEEK_V2,
    num_key_value_heads=4,  # unused by latent attention; transformers' default (64) does not divide 4 heads
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    q_lora_rank=24,
    mlp_layer_types=["dense", "sparse", "sparse"],
    bos_token_id=256,
    eos_token_id=257,
)

FLINT = dict(
    BASE,
    intermediate_size=96,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=40,
    num_hidden_layers=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=6,
    num_experts_per_tok=2,
    sliding_window=8,  # shorter than the prompts
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    mlp_only_layers=[1],
)

HY_V4 = dict(
    BASE,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=5,  # transformers' default indexers: full, full, shared, shared, shared; a dense first layer
    n_routed_experts=8,
    num_experts_per_tok=2,
    routed_scaling_factor=2.5,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=12,
    index_topk=8,  # fewer than the prompt's tokens: the selection cuts
    index_head_dim=16,
    index_n_heads=16,  # enough heads that relu leaves no exact ties for top-k to break either way
    hc_mult=3,
    pad_token_id=0,
)

HY_V4_VL = dict(  # the language model beside a tiny vision tower
    text_config=dict(
        HY_V4,
        rms_norm_eps=1e-5,  # the latent norms' too, in this model
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    ),
    vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, out_hidden_size=64
    ),
)

LARA_MINI = dict(
    BASE,
    num_hidden_layers=5,  # transformers' default period: linear, sliding, linear, full (no rotary), sliding
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=8,  # shorter than the prompts
    linear_num_key_heads=2,
    linear_num_value_heads=4,  # two value heads per key head
    linear_key_head_dim=16,
    linear_value_head_dim=8,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    num_experts=6,
    num_experts_per_tok=2,
    pad_token_id=0,
)

MISTRAL_LARGE4 = dict(  # the language model beside a tiny vision tower
    text_config=dict(
        BASE,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=4,  # transformers' default: the fourth without rotary
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=1.5,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=12,
        index_topk=8,  # fewer than the prompt's tokens: the selection cuts
        index_head_dim=16,
        index_n_heads=16,  # enough heads that relu leaves no exact ties for top-k to break either way
        indexer_types=["full", "full", "shared", "full"],
        first_k_dense_replace=1,
        final_logit_softcapping=3.0,  # below the logits: the cap bites
    ),
    vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    ),
)

LONGCAT_FLASH = dict(
    BASE,
    num_layers=2,  # two attention sublayers each
    ffn_hidden_size=48,
    expert_ffn_hidden_size=32,
    n_routed_experts=6,
    zero_expert_num=4,  # identity experts past the routed ones: chosen 67% and 42% of the time here
    moe_topk=4,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=12,
    qk_rope_head_dim=8,
    head_dim=8,
    v_head_dim=12,
)

KOLIBRI1 = dict(
    BASE,
    num_hidden_layers=3,
    num_key_value_heads=2,
    head_dim=16,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=40,
    num_experts=6,
    num_experts_per_tok=2,
    sliding_window=8,  # shorter than the prompts
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
)

BEAM = dict(
    BASE,
    intermediate_size=96,
    num_hidden_layers=4,
    num_key_value_heads=2,
    head_dim=16,
    moe_intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    sliding_window=8,  # shorter than the prompts
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
)

AXK2 = dict(
    BASE,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=2,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=12,
    index_topk=8,  # fewer than the prompt's tokens: the selection cuts
    index_head_dim=16,
    index_n_heads=16,
    gated_norm_rank=4,
    mlp_layer_types=["dense", "sparse", "sparse"],
)

MUSE_SPARK = dict(
    text_config=dict(
        BASE,
        intermediate_size=96,
        num_hidden_layers=5,  # the first and the last global without rotary, by default
        num_key_value_heads=2,
        head_dim=16,
        moe_intermediate_size=32,
        moe_hidden_size=48,
        num_local_experts=6,
        num_experts_per_tok=2,
        sliding_window=8,  # shorter than the prompts
        mlp_layer_types=["dense", "sparse", "sparse", "sparse", "sparse"],
    ),
    vision_config=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        pos_emb_height=4,
        pos_emb_width=4,
    ),
    audio_config=dict(patch_sizes=[2, 2], hidden_sizes=[8, 16], depths=[1, 1], num_hidden_layers=2, out_hidden_size=64),
    out_hidden_size=32,
    projector_hidden_size=32,
)

GLM5_NEXT = dict(  # the language model beside a tiny vision tower
    text_config=dict(
        BASE,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=5,
        # delta attention, attention computing its selection then one sharing it, delta attention, attention
        # (under the older name transformers maps to indexed_attention)
        layer_types=["linear_attention", "indexed_attention", "indexed_attention", "linear_attention"]
        + ["full_attention"],
        indexer_types=["full", "full", "shared", "full", "full"],
        mlp_layer_types=["dense", "sparse", "sparse", "dense", "sparse"],  # a dense layer after sparse ones too
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=1.5,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_nope_head_dim=16,
        v_head_dim=12,
        index_topk=8,  # two blocks of four: fewer than the prompt's, so the selection cuts
        index_kpool=4,
        index_head_dim=16,
        index_n_heads=16,  # enough heads that relu leaves no exact ties for top-k to break either way
        linear_head_dim=16,
        linear_num_heads=4,
        hc_mult=3,
        swiglu_limit=0.5,  # within the projections' range: the clamps bite
        pad_token_id=0,
    ),
    vision_config=dict(hidden_size=32, intermediate_size=64, depth=1, num_heads=2, out_hidden_size=64),
)

QWEN4_EXP = dict(
    BASE,
    num_hidden_layers=4,
    # Gated DeltaNet with PLE, QSA attention (under the release's older name), DeltaNet with PLE, QSA attention
    layer_types=["linear_attention", "full_attention", "linear_attention", "indexed_attention"],
    num_key_value_heads=2,
    head_dim=16,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=8,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    num_experts=6,
    num_experts_per_tok=2,
    hc_count=3,
    hc_lowrank=8,
    ple_layer_ids=[3, 1],
    ple_embed_dim=32,
    heads_per_ngram=2,  # bigrams and trigrams, two heads each: tables of 53, 59, 61, 67 rows (then 71 .. 83)
    ngram_vocab_size_base=50,
    make_ngram_vocab_size_divisible_by=8,
    split_ngram_parts=2,  # stored in two shards, as the release stores them in 512
    indexer_n_heads=8,
    indexer_kv_heads=1,
    indexer_head_dim=16,
    indexer_budget=8,  # two blocks of four: fewer than the prompt's, so the selection cuts
    indexer_compress_ratio=4,
)

INKLING = dict(
    BASE,
    num_hidden_layers=3,
    num_key_value_heads=2,
    head_dim=16,
    swa_num_attention_heads=2,  # sliding layers: their own head counts and head size
    swa_num_key_value_heads=1,
    swa_head_dim=24,
    sliding_window_size=8,  # shorter than the prompts, as is the full layers' relative bias
    rel_extent=12,
    d_rel=4,
    local_layer_ids=[0, 2],
    log_scaling_n_floor=6,  # queries and biases scaled from position 6 on
    dense_mlp_idx=1,
    intermediate_size=48,
    moe_intermediate_size=32,
    n_routed_experts=5,
    num_experts_per_tok=2,
    n_shared_experts=2,
    unpadded_vocab_size=257,
    logits_mup_width_multiplier=0.25,  # logits of a useful size for the tolerance
)

INKLING2 = dict(
    BASE,
    unpadded_vocab_size=257,  # the head's last row is padding
    num_hidden_layers=4,
    num_key_value_heads=2,
    head_dim=16,
    swa_num_attention_heads=2,  # sliding layers: their own head counts and head size
    swa_num_key_value_heads=1,
    swa_head_dim=24,
    sliding_window_size=8,  # shorter than the prompts, as is the full layers' relative bias
    rel_extent=12,
    d_rel=4,
    log_scaling_n_floor=6,  # queries and relative states scaled from position 6 on
    layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"],
    n_layers_per_attn_res_block=2,  # two blocks
    qk_l2_clip_threshold=0.2,  # clips some query heads, not all
    rel_l2_clip_threshold=0.1,
    mlp_gate_softcap=0.3,  # bites on the gates of this scale
    mlp_up_softcap=0.3,
    final_logit_softcapping=3.0,
    moe_intermediate_size=32,
    n_routed_experts=5,
    num_experts_per_tok=2,
    eos_token_id=257,
)

INKLING2_VISION = dict(  # the vision tower beside Inkling 2's language model, in its multimodal wrappers
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    patch_size=4,
    projection_hidden_dim=16,
    text_hidden_size=64,
)

INKLING2_LOOP = dict(
    INKLING2,
    num_hidden_layers=6,
    layer_types=["hybrid_sliding", "hybrid"] * 3,
    loop_layer_index_start=2,  # the middle block (a sliding and a full layer) three times
    loop_layer_index_end=4,
    loop_num_passes=3,
    loop_gate_rank=8,
)

DOTS3_NOTE = dict(
    BASE,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=6,
    num_key_value_heads=4,
    n_shared_experts=2,
    shared_experts_intermediate_size=20,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=1.5,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    head_dim=24,
    v_head_dim=16,
    index_topk=8,  # fewer than the prompts' tokens: the indexer selects
    index_head_dim=16,
    index_n_heads=16,  # enough heads that relu leaves no exact ties for top-k to break either way
    sliding_window=8,
    # indexed layers 0, 1 and 5, sliding ones between: their own heads, ranks and head sizes
    swa_num_attention_heads=2,
    swa_num_key_value_heads=2,
    swa_q_lora_rank=16,
    swa_kv_lora_rank=12,
    swa_head_dim=20,
    swa_qk_nope_head_dim=12,
    swa_v_head_dim=8,
    rope_theta=10000.0,  # the sliding layers keep 50000
    pad_token_id=0,
)

TINY_FAMILIES = {
    "mixtral": ("MixtralConfig", MIXTRAL),  # 3 MoE layers x 5 experts, top-2
    "qwen2_moe": ("Qwen2MoeConfig", QWEN2_MOE),
    "qwen3_moe": ("Qwen3MoeConfig", QWEN3_MOE),
    "olmoe": ("OlmoeConfig", OLMOE),
    "deepseek_v2": (
        "DeepseekV2Config",
        {**DEEPSEEK_V2, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2},
    ),
    # latent attention, a dense first layer, a shared expert and grouped sigmoid routing: 2 x 8, top-2
    "deepseek_v3": ("DeepseekV3Config", {**DEEPSEEK_V2, "n_group": 4, "topk_group": 2}),
    "glm4_moe": ("Glm4MoeConfig", GLM4_MOE),
    "gpt_oss": ("GptOssConfig", GPT_OSS),
    "phimoe": ("PhimoeConfig", PHIMOE),
    "minimax": ("MiniMaxConfig", MINIMAX),
    "minimax_m2": ("MiniMaxM2Config", MINIMAX_M2),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", {**ERNIE, "use_bias": True}),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", {**HUNYUAN, "moe_topk": [1, 3, 2]}),
    "llama4_text": ("Llama4TextConfig", {**LLAMA4, "num_experts_per_tok": 2}),
    "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", QWEN3_5_MOE),
    "gemma4_text": ("Gemma4TextConfig", GEMMA4),
    "mellum": ("MellumConfig", MELLUM),
    "mistral4": ("Mistral4Config", MISTRAL4),
    "glm_moe_dsa": ("GlmMoeDsaConfig", GLM_MOE_DSA),
    "deepseek_v4": ("DeepseekV4Config", DEEPSEEK_V4),
    "qwen3_next": ("Qwen3NextConfig", QWEN3_NEXT),
    "qwen3_vl_moe_text": ("Qwen3VLMoeConfig", QWEN3_VL_MOE),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", GLM4_MOE_LITE),
    # experts in a latent space: coming layers are predicted from the hidden states, not the latent ones
    "nemotron_h": ("NemotronHConfig", {**NEMOTRON_H, "moe_latent_size": 24}),
    "granitemoehybrid": ("GraniteMoeHybridConfig", GRANITE_MOE_HYBRID),
    "lfm2_moe": ("Lfm2MoeConfig", LFM2_MOE),
    "kimi_linear": ("KimiLinearConfig", KIMI_LINEAR),
    "laguna": ("LagunaConfig", LAGUNA),
    "afmoe": ("AfmoeConfig", AFMOE),
    "dots1": ("Dots1Config", DOTS1),
    "solar_open": ("SolarOpenConfig", SOLAR_OPEN),
    "exaone_moe": ("ExaoneMoeConfig", EXAONE_MOE),
    "hy_v3": ("HYV3Config", HY_V3),
    "sarvam_moe": ("SarvamMoEConfig", SARVAM_MOE),
    "deepseek_v32": ("DeepseekV32Config", DEEPSEEK_V32),
    "cohere2_moe": ("Cohere2MoeConfig", COHERE2_MOE),
    "glm4v_moe_text": ("Glm4vMoeConfig", GLM4V_MOE),
    "mimo_v2_flash": ("MiMoV2FlashConfig", MIMO_V2_FLASH),
    "step3p5": ("Step3p7Config", STEP3P7),
    "minimax_m3_vl_text": ("MiniMaxM3VLConfig", MINIMAX_M3),
    "zaya": ("ZayaConfig", ZAYA),
    "bailing_hybrid": ("BailingHybridConfig", BAILING_HYBRID),
    "granitemoe": ("GraniteMoeConfig", GRANITE_MOE),
    "granitemoeshared": ("GraniteMoeSharedConfig", GRANITE_MOE),
    "granitemoe_swa": ("GraniteMoeSWAConfig", GRANITE_MOE_SWA),
    "flex_olmo": ("FlexOlmoConfig", FLEX_OLMO),
    "dbrx": ("DbrxConfig", DBRX),
    "qwen3_omni_moe_text": ("Qwen3OmniMoeThinkerConfig", QWEN3_OMNI_MOE),
    "jamba": ("JambaConfig", JAMBA),
    "aria_text": ("AriaTextConfig", ARIA_TEXT),
    "jetmoe": ("JetMoeConfig", JETMOE),
    "ernie4_5_vl_moe_text": ("Ernie4_5_VLMoeConfig", ERNIE4_5_VL_MOE),
    "axk1": ("AXK1Config", AXK1),
    "flint": ("FlintConfig", FLINT),
    "hy_v4": ("HYV4Config", HY_V4),
    "hy_v4_vl_text": ("HYV4VLConfig", HY_V4_VL),
    "lara_mini": ("LaraMiniConfig", LARA_MINI),
    "mistral_large4_text": ("MistralLarge4Config", MISTRAL_LARGE4),
    "inkling_text": ("InklingTextConfig", INKLING),
    "inkling2_text": ("Inkling2TextConfig", INKLING2),
    "inkling2_loop_text": ("Inkling2LoopTextConfig", INKLING2_LOOP),
    "dots3_note_text": ("Dots3NoteTextConfig", DOTS3_NOTE),
    "longcat_flash": ("LongcatFlashConfig", LONGCAT_FLASH),
    "kolibri1": ("Kolibri1Config", KOLIBRI1),
    "beam": ("BeamConfig", BEAM),
    "axk2": ("AXK2Config", AXK2),
    "muse_spark_text": ("MuseSparkConfig", MUSE_SPARK),
    "glm5_next_text": ("Glm5NextConfig", GLM5_NEXT),
    "qwen4_exp_text": ("Qwen4ExpTextConfig", QWEN4_EXP),
}


@contextlib.contextmanager
def serve_app(app, **config):
    """A real uvicorn server for `app` on a free loopback port, in a thread; yields the port."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
