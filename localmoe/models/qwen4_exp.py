"""Qwen4-Exp (Qwen4ExpForCausalLM, and the language model of Qwen4ExpForConditionalGeneration, e.g.
Qwen/Qwen4-Exp): Qwen3.5's layers (Gated DeltaNet in three layers of four, gated attention in the fourth,
renormalised top-k experts with a sigmoid-gated shared expert; norms scale by 1 + weight) with:

- QSA attention: an indexer averages its raw key over each complete block of `indexer_compress_ratio`
  tokens, normalises it and rotates it at the block's first position, scores the blocks by
  sum over heads of relu(q_h . k) / sqrt(d), and a query attends to the `budget / ratio` best complete
  blocks it has seen plus the tokens of its own incomplete block.
- hyper-connections: `hc_count` streams, each block fed by a gated mean of the normalised streams
  and adding its output to every stream with a gate of its own (no Sinkhorn, unlike DeepSeek-V4's);
  the last collapse (without a final norm) feeds the LM head.
- per-layer embeddings (PLE) on `ple_layer_ids` (one-indexed): hashed 2..n-gram ids of the tokens
  (splitmix64 multipliers, a distinct prime table per head), their embeddings gate a value into each
  stream, plus a dilated depthwise convolution over the gated values. The n-gram tables (tens of GiB
  in the release) are stored in `split_ngram_parts` shards, which stay apart and in host memory.

Its multi-token-prediction layer (`mtp.*`: pre_fc_norm_embedding, pre_fc_norm_hidden, fc_embedding,
fc_hidden, layers.0 (a QSA attention MoE layer with hyper-connections, no PLE), hyper_connection_mixer) is
loaded as `mtp`, for drafts, as `StreamMTPLayer` says.
"""

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.errors import LocalMoEError
from localmoe.models.attention import Attention
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, MtpLayout, Multimodal, causal_lm
from localmoe.models.gated_deltanet import DELTANET_ALIASES, GatedDeltaNet
from localmoe.models.layers import CausalLM, HostEmbedding, Step, ZeroCenteredRMSNorm, rms_normalize
from localmoe.models.moe import FUSED_EXPERTS, MLP_EXPERTS
from localmoe.models.mtp import SharedHead
from localmoe.models.qwen3_5_moe import Qwen3_5MoeArgs, gated_attention, sparse_moe
from localmoe.models.rotary import RotaryEmbedding, apply_rotary
from localmoe.models.state import CombinedState, ConvRing, IndexedKV, KVCache

LINEAR, INDEXED = "linear_attention", "indexed_attention"


@dataclass
class Qwen4ExpArgs(Qwen3_5MoeArgs):
    default_rope: ClassVar[dict] = {}  # unlike Qwen3.5, rotary on the whole head unless the config says

    num_experts: int = 512
    num_experts_per_tok: int = 10
    norm_topk_prob: bool = True
    hc_count: int = 4
    hc_lowrank: int = 320
    ple_layer_ids: list[int] | None = None
    ple_embed_dim: int | None = None
    ple_conv_kernel_size: int = 4
    ngram_size: int = 3
    heads_per_ngram: int = 8
    ngram_vocab_size_base: int = 20_000_000
    make_ngram_vocab_size_divisible_by: int = 128
    seed: int = 1234
    split_ngram_parts: int = 512
    indexer_n_heads: int | None = None
    indexer_kv_heads: int | None = None
    indexer_head_dim: int | None = None
    indexer_budget: int | None = None
    indexer_compress_ratio: int | None = None
    output_gate_type: str | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        """transformers' derivations and checks: the layer kinds, the PLE layers and sizes, the indexer's."""
        n = self.num_hidden_layers
        kinds = self.layer_types or [LINEAR if (i + 1) % self.full_attention_interval else INDEXED for i in range(n)]
        self.layer_types = [INDEXED if kind == "full_attention" else kind for kind in kinds]
        self.ple_layer_ids = sorted(set(self.ple_layer_ids or ()))
        self.ple_embed_dim = self.ple_embed_dim or self.hidden_size
        self.output_gate_type = self.output_gate_type or self.hidden_act
        if isinstance(self.eos_token_id, list):
            self.eos_token_id = self.eos_token_id[0] if self.eos_token_id else None
        sizes = (self.indexer_n_heads, self.indexer_head_dim, self.indexer_budget, self.indexer_compress_ratio)
        indexed = INDEXED in self.layer_types or self.mtp_num_hidden_layers  # the MTP layers' attention is QSA
        if indexed and None in sizes:
            raise LocalMoEError("config.json lacks the QSA indexer's sizes (indexer_*): the config is damaged")
        if INDEXED in self.layer_types and (self.indexer_kv_heads or 1) != 1:
            raise LocalMoEError("config.json: Qwen4-Exp's indexer has one key head (indexer_kv_heads 1)")
        if INDEXED in self.layer_types and self.indexer_budget % self.indexer_compress_ratio:
            raise LocalMoEError("config.json: indexer_budget must be a multiple of indexer_compress_ratio")
        if any(not 1 <= i <= n or self.layer_types[i - 1] != LINEAR for i in self.ple_layer_ids):
            raise LocalMoEError("config.json: ple_layer_ids must name linear attention layers (counted from 1)")
        if self.ple_layer_ids and (self.eos_token_id is None or self.ple_embed_dim % self.ngram_heads):
            raise LocalMoEError(
                "config.json: PLE needs an eos_token_id and a ple_embed_dim the n-gram heads divide evenly"
            )

    @property
    def ngram_heads(self) -> int:
        return (self.ngram_size - 1) * self.heads_per_ngram


class StreamNorm(ZeroCenteredRMSNorm):
    """Zero-centred RMSNorm over `streams` streams side by side, each stream's `hidden` values normalised apart."""

    def __init__(self, streams: int, hidden: int, eps: float):
        super().__init__(streams * hidden, eps)
        self.hidden = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = rms_normalize(x.float().unflatten(-1, (-1, self.hidden)), self.eps).flatten(-2)
        return (normed * (1 + self.weight.float())).to(x.dtype)


class GatedResidual(nn.Module):
    """The streams [B, T, hc x E] around one block: its input the mean over streams of the normalised
    streams gated by sigmoid(up(silu(down(normed) / hc))); its output added to stream s with weight
    2 sigmoid(inject_s(normed) / hc). Without `inject`, only the collapse (the model's last)."""

    def __init__(self, args: Qwen4ExpArgs, inject: bool = True):
        super().__init__()
        self.streams, self.hidden = args.hc_count, args.hidden_size
        width = self.streams * self.hidden
        self.hc_norm = StreamNorm(self.streams, self.hidden, args.rms_norm_eps)
        self.input_mix_weight_down = nn.Linear(width, args.hc_lowrank, bias=False)
        self.input_mix_weight_up = nn.Linear(args.hc_lowrank, width, bias=False)
        if inject:
            self.block_inject_weight = nn.Linear(width, self.streams, bias=False)

    def collapse(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the block's input [B, T, E], the normalised streams)."""
        normed = self.hc_norm(streams)
        gates = torch.sigmoid(self.input_mix_weight_up(F.silu(self.input_mix_weight_down(normed) / self.streams)))
        return (gates * normed).unflatten(-1, (self.streams, self.hidden)).mean(dim=-2), normed

    def forward(self, streams: torch.Tensor, block=None) -> torch.Tensor:
        collapsed, normed = self.collapse(streams)
        if block is None:
            return collapsed
        inject = 2 * torch.sigmoid(self.block_inject_weight(normed) / self.streams)  # [B, T, hc]
        return streams + (block(collapsed)[..., None, :] * inject[..., None]).flatten(-2)


class QsaIndexer(nn.Module):
    """Which keys each query sees: the best complete blocks by pooled key, and its own block's tokens."""

    def __init__(self, args: Qwen4ExpArgs, rotary: RotaryEmbedding):
        super().__init__()
        self.heads, self.dim = args.indexer_n_heads, args.indexer_head_dim
        self.ratio, self.blocks = args.indexer_compress_ratio, args.indexer_budget // args.indexer_compress_ratio
        self.rotary = rotary  # the model's: blocks are rotated at their first position
        self.index_qk_proj = nn.Linear(args.hidden_size, (self.heads + 1) * self.dim, bias=False)
        self.q_layernorm = ZeroCenteredRMSNorm(self.dim, args.rms_norm_eps)
        self.k_layernorm = ZeroCenteredRMSNorm(self.dim, args.rms_norm_eps)

    def visible(self, x: torch.Tensor, step: Step, kv: IndexedKV) -> torch.Tensor:
        """[B, 1, T, S] booleans; the state keeps each token's raw (unnormalised, unrotated) key."""
        B, T, _ = x.shape
        q, k = self.index_qk_proj(x).split((self.heads * self.dim, self.dim), dim=-1)
        keys = kv.update_index(k, step.start)  # [B, S, dim]
        causal = step.visible(None)  # [T, S]
        S = keys.shape[1]
        blocks = S // self.ratio  # complete blocks among the keys so far
        if blocks == 0:
            return causal.expand(B, 1, T, S)
        q = apply_rotary(self.q_layernorm(q.view(B, T, self.heads, self.dim)).transpose(1, 2), step.cos, step.sin)
        pooled = keys[:, : blocks * self.ratio].unflatten(1, (blocks, self.ratio)).float().mean(dim=2).to(keys.dtype)
        cos, sin = self.rotary.at(torch.arange(blocks, device=x.device) * self.ratio, step.cos.dtype)
        pooled = apply_rotary(self.k_layernorm(pooled)[:, None], cos, sin)[:, 0]  # [B, blocks, dim]
        scores = F.relu(q.float() @ pooled.float()[:, None].transpose(-1, -2)).sum(dim=1) / math.sqrt(self.dim)
        seen = (step.positions() + 1) // self.ratio  # blocks complete up to each new token [T]
        complete = torch.arange(blocks, device=x.device) < seen[:, None]  # [T, blocks]
        chosen = scores.masked_fill(~complete, float("-inf")).topk(min(self.blocks, blocks), dim=-1).indices
        picked = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True) & complete
        selected = torch.zeros(B, T, S, dtype=torch.bool, device=x.device)
        selected[..., : blocks * self.ratio] = picked.repeat_interleave(self.ratio, dim=-1)
        own_block = torch.arange(S, device=x.device) >= seen[:, None] * self.ratio
        return ((selected | own_block) & causal)[:, None]


class QsaAttention(Attention):
    """Qwen3.5's gated attention over the keys its indexer selects."""

    static = False  # the selection depends on how many keys there are

    def __init__(self, *shape, indexer: QsaIndexer, **options):
        super().__init__(*shape, **options)
        self.indexer = indexer

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> IndexedKV:
        return IndexedKV(batch, self.kv_heads, self.head_dim, self.indexer.dim, max_len, dtype, device)

    def state_bytes_per_token(self, dtype: torch.dtype) -> int:
        return super().state_bytes_per_token(dtype) + self.indexer.dim * dtype.itemsize

    def mask(self, x: torch.Tensor, step: Step, kv: IndexedKV, positions) -> tuple[torch.Tensor, bool]:
        return self.indexer.visible(x, step, kv), False


# --- hashed n-gram embeddings -------------------------------------------------------------------------------

MASK64 = (1 << 64) - 1
GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment
LAYER_PRIME = 10007  # spreads the seeds of successive PLE layers


def splitmix64(value: int) -> int:
    value = (value + GOLDEN_GAMMA) & MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


def hash_multipliers(vocab_size: int, count: int, ple_index: int, seed: int) -> list[int]:
    """Odd multipliers, one per n-gram position, small enough that token x multiplier fits in int64."""
    half = max(1, ((1 << 63) - 1) // max(vocab_size, 1) // 2)
    base = seed + LAYER_PRIME * ple_index
    return [2 * (splitmix64((base + GOLDEN_GAMMA * (k + 1)) & MASK64) % half) + 1 for k in range(count)]


@functools.cache
def primes_from(start: int, count: int) -> tuple[int, ...]:
    """The first `count` primes at least `start` (computed once: every PLE layer takes its slice)."""
    primes, candidate = [], max(start, 2)
    while len(primes) < count:
        if candidate == 2 or candidate % 2 and all(candidate % d for d in range(3, math.isqrt(candidate) + 1, 2)):
            primes.append(candidate)
        candidate += 1
    return tuple(primes)


def shift_in_document(ids: torch.Tensor, shift: int, eos: int) -> torch.Tensor:
    """ids [B, L] moved `shift` places right within documents (each ends with eos): eos where the token
    `shift` places back lies before the start or an eos lies between (transformers' reading)."""
    if shift == 0:
        return ids
    positions = torch.arange(ids.shape[1], device=ids.device)
    eos_at = torch.where(ids == eos, positions, -1)
    last_eos = F.pad(torch.cummax(eos_at, dim=1).values[:, :-1], (1, 0), value=-1)  # before each position
    shifted = F.pad(ids, (shift, 0), value=eos)[:, : ids.shape[1]]
    return torch.where(positions - last_eos - 1 >= shift, shifted, eos)


class NGramEmbedding(nn.Module):
    """Each token's embeddings [B, T, ple_embed_dim]: for n = 2 .. ngram_size, `heads_per_ngram` heads each
    look up (xor of token_k x multiplier_k over the last n tokens of the document) mod its own prime,
    in the head's part of the shared table."""

    def __init__(self, args: Qwen4ExpArgs, ple_index: int):
        super().__init__()
        self.n, self.per_n, self.eos = args.ngram_size, args.heads_per_ngram, args.eos_token_id
        heads = args.ngram_heads
        every = primes_from(args.ngram_vocab_size_base, len(args.ple_layer_ids) * heads)
        primes = list(every[ple_index * heads : (ple_index + 1) * heads])  # each head's table size
        multipliers = hash_multipliers(args.vocab_size, self.n, ple_index, args.seed)
        with torch.device("cpu"):  # real values even when the model is being built on `meta`
            self.register_buffer("multipliers", torch.tensor(multipliers), persistent=False)
            self.register_buffer("primes", torch.tensor(primes), persistent=False)
            self.register_buffer("offsets", torch.tensor([0, *primes[:-1]]).cumsum(0), persistent=False)
        divisor = args.make_ngram_vocab_size_divisible_by
        rows = -(-sum(primes) // divisor) * divisor
        self.ngram_embedding = HostEmbedding(rows, args.ple_embed_dim // heads, args.split_ngram_parts)

    def forward(self, ids: torch.Tensor, step: Step, ring: ConvRing) -> torch.Tensor:
        before = self.n - 1
        context = ring.window(step.start)[:, 0]  # the tokens before this step's
        context = torch.where(torch.arange(step.start - before, step.start, device=ids.device) >= 0, context, self.eos)
        ring.write(ids[:, None], step.start)
        history = torch.cat((context, ids), dim=1)
        shifted = [shift_in_document(history, k, self.eos) * self.multipliers[k] for k in range(self.n)]
        table_ids = []
        for n in range(2, self.n + 1):
            mixed = shifted[0]
            for k in range(1, n):
                mixed = mixed ^ shifted[k]
            heads = slice((n - 2) * self.per_n, (n - 1) * self.per_n)
            table_ids.append(torch.remainder(mixed[..., None], self.primes[heads]) + self.offsets[heads])
        return self.ngram_embedding(torch.cat(table_ids, dim=-1)[:, before:]).flatten(-2)


class PerLayerEmbedding(nn.Module):
    """What a PLE layer adds to the streams [B, T, hc x E]: the n-gram embeddings' value, gated per
    stream by sigmoid(signed sqrt(key_s . query_s / sqrt(E))), plus silu of a depthwise convolution
    (dilation ngram_size) over the normalised gated values."""

    def __init__(self, args: Qwen4ExpArgs, ple_index: int):
        super().__init__()
        self.streams, self.hidden, self.dilation = args.hc_count, args.hidden_size, args.ngram_size
        width, dim, eps = args.hc_count * args.hidden_size, args.ple_embed_dim, args.rms_norm_eps
        self.ple_embedding = NGramEmbedding(args, ple_index)
        self.key_proj = nn.Linear(dim, width, bias=False)
        self.value_proj = nn.Linear(dim, self.hidden, bias=False)
        self.norm_key = StreamNorm(self.streams, self.hidden, eps)
        self.norm_query = StreamNorm(self.streams, self.hidden, eps)
        self.norm_conv = StreamNorm(self.streams, self.hidden, eps)
        kernel = args.ple_conv_kernel_size
        self.conv1d = nn.Conv1d(width, width, kernel, groups=width, dilation=self.dilation, bias=False)
        self.reach = (kernel - 1) * self.dilation + 1  # the positions one output sees

    def new_state(self, batch: int, dtype: torch.dtype, device) -> dict[str, ConvRing]:
        return {
            "tokens": ConvRing(batch, 1, self.ple_embedding.n, torch.long, device),
            "conv": ConvRing(batch, self.streams * self.hidden, self.reach, dtype, device),
        }

    def forward(self, streams: torch.Tensor, step: Step, state: CombinedState) -> torch.Tensor:
        embeddings = self.ple_embedding(step.ids, step, state.tokens)
        key = self.norm_key(self.key_proj(embeddings)).unflatten(-1, (self.streams, self.hidden))
        query = self.norm_query(streams).unflatten(-1, (self.streams, self.hidden))
        gate = (key * query).sum(dim=-1, keepdim=True) / math.sqrt(self.hidden)
        gate = gate.abs().clamp_min(1e-6).sqrt() * gate.sign()
        gated = (torch.sigmoid(gate) * self.value_proj(embeddings)[..., None, :]).flatten(-2)
        inputs = self.norm_conv(gated).transpose(1, 2)  # [B, hc x E, T]
        past = state.conv.window(step.start)
        state.conv.write(inputs, step.start)
        conv = F.conv1d(
            torch.cat((past, inputs), dim=-1), self.conv1d.weight, dilation=self.dilation, groups=inputs.shape[1]
        )
        return gated + F.silu(conv).transpose(1, 2)


class Qwen4ExpDecoderLayer(nn.Module):
    def __init__(self, args: Qwen4ExpArgs, i: int, rotary: RotaryEmbedding, kind: str | None = None):
        """Layer `i`, of the kind `layer_types` says unless `kind` says (an MTP layer's)."""
        super().__init__()
        if (kind or args.layer_types[i]) == LINEAR:
            self.self_attn = GatedDeltaNet(args, gate=args.output_gate_type)
        else:
            self.self_attn = gated_attention(args, QsaAttention, indexer=QsaIndexer(args, rotary))
        self.mlp = sparse_moe(args, i, normalize=args.norm_topk_prob)
        if i + 1 in args.ple_layer_ids:
            self.ple = PerLayerEmbedding(args, args.ple_layer_ids.index(i + 1))
        self.attn_hyper_connection, self.mlp_hyper_connection = GatedResidual(args), GatedResidual(args)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device):
        mixer = self.self_attn.new_state(batch, max_len, dtype, device)
        if not hasattr(self, "ple"):
            return mixer
        return CombinedState(mixer=mixer, **self.ple.new_state(batch, dtype, device))

    def forward(self, streams: torch.Tensor, step: Step, state) -> torch.Tensor:
        if hasattr(self, "ple"):
            streams = streams + self.ple(streams, step, state)
            state = state.mixer
        streams = self.attn_hyper_connection(streams, lambda x: self.self_attn(x, step, state))
        return self.mlp_hyper_connection(streams, self.mlp)


class Qwen4ExpLM(CausalLM):
    """The stack over `hc_count` copies of the embedding, collapsed by the last mixer straight into the LM
    head; PLE layers keep the tokens and their convolution's inputs beside their token mixer's state."""

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        weight = self.model.embed_tokens.weight
        return KVCache(
            [layer.new_state(batch, max_len, weight.dtype, weight.device) for layer in self.model.layers], max_len
        )

    def fixed_state_bytes(self, dtype: torch.dtype) -> int:
        rings = sum(
            layer.ple.streams * layer.ple.hidden * (layer.ple.reach - 1) * dtype.itemsize
            for layer in self.model.layers
            if hasattr(layer, "ple")
        )
        return super().fixed_state_bytes(dtype) + rings

    def embed(self, ids: torch.Tensor, step: Step) -> torch.Tensor:
        step.ids = ids
        return super().embed(ids, step).repeat(1, 1, self.model.hyper_connection_mixer.streams)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.hyper_connection_mixer(h))

    def mtp_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The last layer's streams [B, T, hc x E], uncollapsed: SGLang's Qwen4ExpModel hands its MTP layer
        these (hc_hidden_states), not what the LM head takes."""
        return h


class StreamMTPLayer(nn.Module):
    """Qwen4-Exp's MTP layer (SGLang's qwen4_exp_mtp.py, Qwen4ExpForCausalLMMTP._fuse_residual_linear_shared):
    the hidden streams normalised over their whole hc x E width and projected stream by stream (fc_hidden),
    the token's normalised embedding projected (fc_embedding) and added to every stream, through a decoder
    layer of the model's kind; for logits a collapse of its own (hyper_connection_mixer, no final norm, as
    the model's). What the next draft takes is the streams."""

    def __init__(self, args: Qwen4ExpArgs, block: Qwen4ExpDecoderLayer):
        super().__init__()
        hidden, eps = args.hidden_size, args.rms_norm_eps
        self.pre_fc_norm_embedding = ZeroCenteredRMSNorm(hidden, eps)
        self.pre_fc_norm_hidden = ZeroCenteredRMSNorm(args.hc_count * hidden, eps)
        self.fc_embedding = nn.Linear(hidden, hidden, bias=False)
        self.fc_hidden = nn.Linear(hidden, hidden, bias=False)
        self.block = block
        self.shared_head = SharedHead(GatedResidual(args, inject=False))

    def forward(self, h: torch.Tensor, embedded: torch.Tensor, step: Step, kv) -> torch.Tensor:
        """h: streams [B, T, hc x E]; `embedded` as the model embeds (hc copies of the token's embedding)."""
        streams = self.pre_fc_norm_hidden(h).unflatten(-1, (-1, self.fc_hidden.in_features))
        token = self.fc_embedding(self.pre_fc_norm_embedding(embedded[..., : self.fc_embedding.in_features]))
        return self.block((self.fc_hidden(streams) + token[..., None, :]).flatten(-2), step, kv)


def build(args: Qwen4ExpArgs) -> Qwen4ExpLM:
    rotary = RotaryEmbedding(args.rope, args.attention_head_dim, args.max_position_embeddings)
    n = args.num_hidden_layers
    layers = [Qwen4ExpDecoderLayer(args, i, rotary) for i in range(n)]
    # SGLang builds its MTP layer as "full_attention", which a config with the indexer's sizes makes QSA
    mtp = [Qwen4ExpDecoderLayer(args, n + k, rotary, INDEXED) for k in range(args.mtp_num_hidden_layers)]
    model = causal_lm(
        args,
        layers,
        args.attention_head_dim,
        model=Qwen4ExpLM,
        rotary=lambda *_: rotary,
        mtp=mtp,
        mtp_layer=lambda block, *_: StreamMTPLayer(args, block),
    )
    del model.model.norm  # none: the last collapse feeds the head
    model.model.hyper_connection_mixer = GatedResidual(args, inject=False)
    return model


# the release's MTP layer (SGLang's Qwen3_5ForCausalLMMTP.load_weights reads `mtp.*` for Qwen4-Exp's too):
# its own tensors and its collapse under `mtp.`, its decoder layer's under `mtp.layers.{depth}.`; its
# embedding and LM head are the model's
QWEN4_MTP = MtpLayout(
    "mtp_num_hidden_layers",
    (
        *(
            (f"model.layers.{{layer}}.{name}.", f"mtp.{name}.")
            for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "fc_embedding", "fc_hidden")
        ),
        ("model.layers.{layer}.shared_head.norm.", "mtp.hyper_connection_mixer."),
        ("model.layers.{layer}.", "mtp.layers.{depth}."),
    ),
)


FAMILY = Family(
    architectures=("Qwen4ExpForCausalLM",),
    model_type="qwen4_exp_text",
    args=Qwen4ExpArgs,
    model=build,
    experts=(FUSED_EXPERTS, PerExpert(MLP_EXPERTS)),
    hub_aliases=DELTANET_ALIASES,
    # the vision tower is left on disk
    multimodal=(
        Multimodal(
            "Qwen4ExpForConditionalGeneration",
            (("model.", "model.language_model."), ("lm_head.", "lm_head."), ("mtp.", "mtp.")),
        ),
    ),
    mtp=QWEN4_MTP,
    example="Qwen/Qwen4-Exp",
)
