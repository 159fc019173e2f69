"""Attention's cheaper forms against the plain ones they replace: latent attention computed in the latent
space (decode), and attention with sinks over grouped heads without copying keys and values."""

import pytest
import torch
from conftest import DEEPSEEK_V2, hf_model, save_hf

import localmoe
from localmoe.models.attention import LatentAttention, attend_with_sinks

torch.manual_seed(0)


def sinks_per_head(q, k, v, visible, sinks, scale):
    """The definition, every head with its own copy of its group's keys and values."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = ((q @ k.transpose(2, 3)) * scale).masked_fill(~visible, float("-inf"))
    sink = sinks.view(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1)
    logits = torch.cat((scores, sink), dim=-1)
    return logits.softmax(dim=-1)[..., :-1] @ v


@pytest.mark.parametrize("queries", [1, 5])  # decode, a prefill chunk after cached tokens
def test_sinks_over_grouped_heads_equal_the_per_head_definition(queries):
    batch, heads, kv_heads, keys, dim, v_dim = 2, 8, 2, 11, 16, 12  # values narrower, as MiMo-V2-Flash's
    q = torch.randn(batch, heads, queries, dim)
    k, v = torch.randn(batch, kv_heads, keys, dim), torch.randn(batch, kv_heads, keys, v_dim)
    positions = torch.arange(keys - queries, keys)[:, None]
    visible = (torch.arange(keys)[None, :] <= positions) & (torch.arange(keys)[None, :] > positions - 4)  # a window
    sinks = torch.randn(heads)
    # one mask for all, one per sequence ([B, 1, T, S], as DeepSeek-V4 gives), one per sequence and head
    per_sequence = visible & torch.tensor([True, False]).repeat(keys)[None, None, :keys].roll(1, -1)
    per_head = visible & (torch.rand(batch, heads, queries, keys) < 0.7)
    for mask in (visible, torch.stack((visible, per_sequence[0]))[:, None], per_head):
        got = attend_with_sinks(q, k, v, mask, sinks, dim**-0.5)
        torch.testing.assert_close(got, sinks_per_head(q, k, v, mask, sinks, dim**-0.5), rtol=1e-6, atol=1e-6)


def latent_attention(rank=32, nope=16, rope=8, v=12, heads=4) -> LatentAttention:
    attention = LatentAttention(
        64,
        heads,
        q_lora_rank=24,
        kv_lora_rank=rank,
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=v,
        bias=False,
        interleaved_rope=False,
        scale=(nope + rope) ** -0.5,
    )
    for parameter in attention.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    return attention


@pytest.mark.parametrize(
    "queries, keys, mask",
    [
        (1, 9, None),  # decode: one token sees the whole cache
        (6, 6, "causal"),  # a first prefill chunk
        (3, 9, "boolean"),  # a chunk after cached tokens
        (2, 9, "selection"),  # GLM-5's indexer: a per-batch selection [B, 1, T, S]
    ],
)
def test_latent_attention_in_the_latent_space_equals_the_expanded_heads(queries, keys, mask):
    attention = latent_attention()
    batch, heads = 2, attention.heads
    q_nope, q_rot = torch.randn(batch, heads, queries, 16), torch.randn(batch, heads, queries, 8)
    latent, k_rot = torch.randn(batch, keys, 32), torch.randn(batch, 1, keys, 8)
    attn_mask = None
    if mask == "boolean":
        attn_mask = torch.arange(keys)[None, :] <= torch.arange(keys - queries, keys)[:, None]
    elif mask == "selection":
        attn_mask = torch.rand(batch, 1, queries, keys) < 0.6
        attn_mask[..., 0] = True  # every query sees something
    arguments = (q_nope, q_rot, latent, k_rot, attn_mask, mask == "causal")
    with torch.no_grad():
        absorbed, expanded = attention._absorbed(*arguments), attention._expanded(*arguments)
    torch.testing.assert_close(absorbed, expanded, rtol=1e-5, atol=1e-5)


def test_decode_tokens_do_not_expand_the_latent_cache(tmp_path):
    """A tiny DeepSeek-V2: a prompt long enough to expand the latents (where that costs fewer multiplies),
    then decode tokens that never apply kv_b_proj to the cache; DeepSeek-V3's widths switch at 170 queries."""
    deepseek_v3 = latent_attention(rank=512, nope=128, rope=64, v=128, heads=2)
    assert deepseek_v3.absorbs(1) and deepseek_v3.absorbs(170) and not deepseek_v3.absorbs(171)
    path = save_hf(hf_model("DeepseekV2Config", **DEEPSEEK_V2), tmp_path, "single")
    engine = localmoe.load(str(path), device="cpu", dtype=torch.float32)
    expansions = []
    for module in engine.parts.model.modules():
        if isinstance(module, LatentAttention):
            module.kv_b_proj.register_forward_hook(lambda module, inputs, output: expansions.append(inputs[0].shape))
    prompt = list(range(3, 43))  # 40 tokens: more than the tiny widths' 24 queries worth absorbing
    tokens = engine.generate_ids(prompt, 4)
    next(tokens)
    assert [shape[1] for shape in expansions] == [40] * len(expansions) and expansions
    list(tokens)
    assert [shape[1] for shape in expansions] == [40] * len(expansions)  # the decode tokens added none
