"""DeepSeek-V4 (DeepseekV4ForCausalLM, as transformers 5.23 defines and saves it, and as DeepSeek releases it).

- The residual is `hc_mult` parallel streams (manifold-constrained hyper-connections): before each
  attention and MoE block a learned, Sinkhorn-normalised mix collapses them into one input, and the
  block's output is spread back over them; a last collapse (`hc_head`) precedes the final norm.
- Attention is single-KV-head (keys are the values), queries through a low-rank bottleneck, rotary on
  the trailing dims of each head in adjacent pairs (undone on the output), learned sinks, a sliding
  window, and a grouped low-rank output projection. Layers of two further kinds also attend to
  compressed entries: one per `rate` tokens, a softmax-gated pool of their projections (HCA: windows
  of 128; CSA: overlapping windows of 4, of which an indexer picks the `index_topk` best per query).
- MoE on every layer: sqrt(softplus) scores with a correction bias, renormalised and scaled, or (hash
  layers) experts fixed per token by a table; SwiGLU with clamps, and a shared expert.

The compressed state of a layer is cut back to an earlier position only where nothing is dropped or into
a speculative check (which keeps its tokens' projections, `PooledTrail`), as a recurrent state is: a
conversation that changes its past is fed again.

Its multi-token-prediction layers (`mtp.N.*` in the release) are loaded as `mtp`, for drafts: DeepSeek's
inference/model.py, MTPBlock, as `V4MTPLayer` says.
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.models.attention import attend_with_sinks
from localmoe.models.expert_tensors import PerExpert
from localmoe.models.family import Family, ModelArgs, MtpLayout, ReleaseLayout
from localmoe.models.layers import Backbone, CausalLM, Step, UpcastRMSNorm
from localmoe.models.moe import FUSED_EXPERTS, GatedActivation, GatedMLP, Routing, SparseMoE
from localmoe.models.mtp import MultiTokenPredictor, SharedHead
from localmoe.models.rotary import RotaryEmbedding, rope_parameters
from localmoe.models.state import REWIND_SLACK, CompressedKV, PooledState, PooledTrail, WindowKV

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
RATIO_TO_KIND = {0: SLIDING, 4: CSA, 128: HCA}


@dataclass
class DeepseekV4Args(ModelArgs):
    config_aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        "n_routed_experts": ("num_local_experts",),
        "moe_intermediate_size": ("intermediate_size",),
    }

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    moe_intermediate_size: int = 2048
    head_dim: int = 512
    q_lora_rank: int = 1024
    num_experts_per_tok: int = 6
    n_routed_experts: int = 256
    routed_scaling_factor: float = 1.5
    scoring_func: str = "sqrtsoftplus"
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    layer_types: list[str] | None = None
    compress_ratios: list[int] | None = None  # the older spelling of layer_types
    compress_rates: dict | None = None
    compress_rate_csa: int | None = None
    compress_rate_hca: int | None = None
    mlp_layer_types: list[str] | None = None
    num_hash_layers: int | None = None
    partial_rotary_factor: float | None = None
    qk_rope_head_dim: int | None = None
    rope_theta: float = 10_000.0
    compress_rope_theta: float = 160_000.0
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 1048576
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0

    def __post_init__(self):
        """transformers' derivations, from either spelling of the config; the MTP layers' kinds from the
        release's compress_ratios, which list them after the model's (0, sliding, in V4-Flash's), else
        sliding."""
        n = self.num_hidden_layers
        rates = {CSA: 4, HCA: 128, **(self.compress_rates or {})}
        rates[CSA] = self.compress_rate_csa or rates[CSA]
        rates[HCA] = self.compress_rate_hca or rates[HCA]
        self.compress_rates = rates
        if self.layer_types is None and self.compress_ratios is not None:
            self.layer_types = [RATIO_TO_KIND[ratio] for ratio in self.compress_ratios]
        if self.layer_types is None:
            self.layer_types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
        mtp = self.layer_types[n : n + self.num_nextn_predict_layers]
        self.mtp_layer_types = mtp + [SLIDING] * (self.num_nextn_predict_layers - len(mtp))
        self.layer_types = self.layer_types[:n]
        if self.mlp_layer_types is None:
            hashed = 3 if self.num_hash_layers is None else self.num_hash_layers
            self.mlp_layer_types = ["hash_moe"] * min(n, hashed) + ["moe"] * max(0, n - hashed)
        if self.partial_rotary_factor is None:
            self.partial_rotary_factor = (self.qk_rope_head_dim or 64) / (
                self.head_dim if self.qk_rope_head_dim else 512
            )

    @property
    def rope_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def rope(self, kind: str) -> dict[str, Any]:
        """The "main" rotary (sliding layers) or the "compress" one (the others, and compressed entries)."""
        given = dict(self.rope_parameters or self.rope_scaling or {})
        if isinstance(given.get("main"), dict) and isinstance(given.get("compress"), dict):
            params = dict(given[kind])
        elif kind == "main":
            params = {"rope_type": "default", "rope_theta": self.rope_theta}
        else:
            params = {k: v for k, v in given.items() if k not in ("main", "compress")}
            params["rope_type"] = params.pop("type", params.get("rope_type", "default"))
            params["rope_theta"] = self.compress_rope_theta
            if params["rope_type"] == "yarn":
                params.setdefault("attention_factor", 1.0)  # V4 does not scale cos and sin by yarn's mscale
        params.setdefault("partial_rotary_factor", self.partial_rotary_factor)
        theta = params.get("rope_theta", self.rope_theta)
        return rope_parameters(
            {"rope_parameters": params, "max_position_embeddings": self.max_position_embeddings}, theta
        )


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last cos.shape[-1] dims of x in adjacent pairs, keeping their order, in float32 (cos and sin
    as RotaryEmbedding gives them, [..., T, d]: each pair's angle in the first half); the rest pass."""
    d = cos.shape[-1]
    cos, sin = (t[..., : d // 2].repeat_interleave(2, dim=-1).float() for t in (cos, sin))
    rope = x[..., -d:].float()
    turned = torch.stack((-rope[..., 1::2], rope[..., 0::2]), dim=-1).flatten(-2)
    return torch.cat((x[..., :-d], (rope * cos + turned * sin).to(x.dtype)), dim=-1)


def unweighted_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation whose factor is computed in float32 and applied in x's dtype."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


# --- attention -------------------------------------------------------------------------------------------


class Compressor(nn.Module):
    """One entry per `rate` tokens: kv_norm(sum over the window of softmax(gate + position_bias) * kv),
    rotated at the window's first position. With `overlap`, each token projects twice as wide, and an
    entry pools the previous window's first halves with its own second halves."""

    def __init__(self, hidden: int, dim: int, rate: int, overlap: bool, eps: float):
        super().__init__()
        width = 2 * dim if overlap else dim
        self.dim, self.rate, self.overlap = dim, rate, overlap
        self.kv_proj = nn.Linear(hidden, width, bias=False)
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.position_bias = nn.Parameter(torch.empty(rate, width))
        self.kv_norm = UpcastRMSNorm(dim, eps)

    def new_state(self, batch: int, max_len: int, dtype, device) -> PooledState:
        width = self.kv_proj.out_features
        return PooledState(batch, width, self.dim, self.rate, max_len, dtype, device, self.overlap)

    def pending_bytes(self, dtype: torch.dtype) -> int:
        """The most its state holds of tokens not yet pooled: rate - 1 projections and gates, and with
        `overlap` the last window's first halves (the gates' with the position bias added, in the dtype
        that sum takes)."""
        gate_dtype = torch.promote_types(dtype, self.position_bias.dtype)
        overlap = self.rate * self.dim * (dtype.itemsize + gate_dtype.itemsize) if self.overlap else 0
        return 2 * (self.rate - 1) * self.kv_proj.out_features * dtype.itemsize + overlap

    def trail_bytes_per_token(self, dtype: torch.dtype) -> int:
        """What a speculative check keeps of each of its tokens: its projection and gate (`PooledTrail`)."""
        return 2 * self.kv_proj.out_features * dtype.itemsize

    def forward(self, x: torch.Tensor, state: PooledState, rotary: RotaryEmbedding, trail: bool) -> torch.Tensor:
        """All entries so far [B, n, dim], after adding those the new tokens complete. `trail`: a check,
        which the state may be cut back into (see Step.trail)."""
        first = state.count * self.rate
        kv = torch.cat((state.pending_kv, self.kv_proj(x)), dim=1)
        gate = torch.cat((state.pending_gate, self.gate_proj(x)), dim=1)
        state.trail = PooledTrail(state.count, kv, gate, state.overlap, self.position_bias) if trail else None
        usable = kv.shape[1] // self.rate * self.rate
        state.pending_kv, state.pending_gate = kv[:, usable:], gate[:, usable:]
        if usable:
            # copies: views of their tail would keep the whole pass's projections alive
            state.pending_kv, state.pending_gate = state.pending_kv.clone(), state.pending_gate.clone()
            windows = usable // self.rate
            kv = kv[:, :usable].unflatten(1, (windows, self.rate))
            gate = gate[:, :usable].unflatten(1, (windows, self.rate)) + self.position_bias
            if self.overlap:
                kv, gate = self._overlapping(kv, gate, state)
            pooled = (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2)
            positions = torch.arange(windows, device=x.device) * self.rate + first
            cos, sin = rotary.at(positions, x.dtype)
            state.entries[:, state.count : state.count + windows] = rotate_pairs(self.kv_norm(pooled), cos, sin)
            state.count += windows
        return state.entries[:, : state.count]

    def _overlapping(self, kv, gate, state: PooledState):
        """[B, W, 2 rate, dim]: window w's slots are window w-1's first halves, then its own second halves."""
        B, windows, rate, _ = kv.shape
        d = self.dim
        pooled_kv = kv.new_zeros(B, windows, 2 * rate, d)
        pooled_gate = gate.new_full((B, windows, 2 * rate, d), float("-inf"))  # no previous window: no weight
        pooled_kv[:, :, rate:], pooled_gate[:, :, rate:] = kv[..., d:], gate[..., d:]
        pooled_kv[:, 1:, :rate], pooled_gate[:, 1:, :rate] = kv[:, :-1, :, :d], gate[:, :-1, :, :d]
        if state.overlap is not None:
            pooled_kv[:, 0, :rate], pooled_gate[:, 0, :rate] = state.overlap
        state.overlap = (kv[:, -1, :, :d].clone(), gate[:, -1, :, :d].clone())
        return pooled_kv, pooled_gate


class Indexer(nn.Module):
    """Picks, for each query, the `top_k` compressed entries that score best: sum over heads h of
    w_h(x) * relu(q_h . k) / sqrt(d), against keys from a compressor of its own."""

    def __init__(self, args: DeepseekV4Args):
        super().__init__()
        self.heads, self.dim, self.top_k = args.index_n_heads, args.index_head_dim, args.index_topk
        rate = args.compress_rates[CSA]
        self.compressor = Compressor(args.hidden_size, self.dim, rate, overlap=True, eps=args.rms_norm_eps)
        self.q_b_proj = nn.Linear(args.q_lora_rank, self.heads * self.dim, bias=False)
        self.weights_proj = nn.Linear(args.hidden_size, self.heads, bias=False)

    def visible(self, x, q_low, step: Step, state: PooledState, rotary: RotaryEmbedding) -> torch.Tensor:
        """[B, T, n] booleans: the entries each new token attends to."""
        B, T, _ = x.shape
        keys = self.compressor(x, state, rotary, step.trail)  # [B, n, d]
        cos, sin = step.rotary(rotary)
        q = rotate_pairs(self.q_b_proj(q_low).view(B, T, self.heads, self.dim).transpose(1, 2), cos, sin)
        scores = F.relu(q.float() @ keys.float()[:, None].transpose(-1, -2)) * self.dim**-0.5  # [B, H, T, n]
        weights = self.weights_proj(x).float() * self.heads**-0.5  # [B, T, H]
        index = (scores * weights.transpose(1, 2)[..., None]).sum(dim=1)  # [B, T, n]
        complete = _complete_windows(step, keys.shape[1], self.compressor.rate)  # [T, n]
        chosen = index.masked_fill(~complete, float("-inf")).topk(min(self.top_k, keys.shape[1]), dim=-1).indices
        picked = torch.zeros_like(index, dtype=torch.bool).scatter_(-1, chosen, True)
        return picked & complete  # a pick beyond the complete windows (too few of them) is no pick


def _complete_windows(step: Step, entries: int, rate: int) -> torch.Tensor:
    """[T, n]: entry w closes a window that ends at or before each new token."""
    return torch.arange(entries, device=step.cos.device)[None] < ((step.positions() + 1) // rate)[:, None]


class CompressedAttention(nn.Module):
    def __init__(self, args: DeepseekV4Args, kind: str, compress_rotary: RotaryEmbedding):
        super().__init__()
        hidden, heads, dim = args.hidden_size, args.num_attention_heads, args.head_dim
        self.kind, self.heads, self.dim, self.window, self.eps = (
            kind,
            heads,
            dim,
            args.sliding_window,
            args.rms_norm_eps,
        )
        self.groups, self.group_rank = args.o_groups, args.o_lora_rank
        self.q_a_proj = nn.Linear(hidden, args.q_lora_rank, bias=False)
        self.q_a_norm = UpcastRMSNorm(args.q_lora_rank, args.rms_norm_eps)
        self.q_b_proj = nn.Linear(args.q_lora_rank, heads * dim, bias=False)
        self.kv_proj = nn.Linear(hidden, dim, bias=False)
        self.kv_norm = UpcastRMSNorm(dim, args.rms_norm_eps)
        self.o_a_proj = nn.Linear(heads * dim // self.groups, self.groups * self.group_rank, bias=False)
        self.o_b_proj = nn.Linear(self.groups * self.group_rank, hidden, bias=False)
        self.sinks = nn.Parameter(torch.empty(heads))
        if kind != SLIDING:
            # the compressed entries, queries and keys of these layers all use the "compress" rotary
            self.compress_rotary = compress_rotary
            rate = args.compress_rates[kind]
            self.compressor = Compressor(hidden, dim, rate, overlap=kind == CSA, eps=args.rms_norm_eps)
            if kind == CSA:
                self.compressor.indexer = Indexer(args)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> CompressedKV:
        window = WindowKV(batch, 1, self.dim, self.window, dtype, device)
        if self.kind == SLIDING:
            return CompressedKV(window, None, None)
        compressor = self.compressor.new_state(batch, max_len, dtype, device)
        indexer = (
            self.compressor.indexer.compressor.new_state(batch, max_len, dtype, device) if self.kind == CSA else None
        )
        return CompressedKV(window, compressor, indexer)

    def state_bytes_per_token(self, dtype: torch.dtype) -> int:
        if self.kind == SLIDING:
            return 0
        index = self.compressor.indexer.dim if self.kind == CSA else 0
        return (self.dim + index) * dtype.itemsize // self.compressor.rate + 1

    def fixed_state_bytes(self, dtype: torch.dtype) -> int:
        return 2 * (self.window + REWIND_SLACK) * self.dim * dtype.itemsize

    def pending_state_bytes(self, dtype: torch.dtype) -> int:
        return sum(compressor.pending_bytes(dtype) for compressor in self._compressors())

    def trail_bytes_per_token(self, dtype: torch.dtype) -> int:
        return sum(compressor.trail_bytes_per_token(dtype) for compressor in self._compressors())

    def _compressors(self) -> list[Compressor]:
        """The compressor, and the indexer's where entries are selected."""
        if self.kind == SLIDING:
            return []
        return [self.compressor, *([self.compressor.indexer.compressor] if self.kind == CSA else [])]

    def forward(self, x: torch.Tensor, step: Step, state: CompressedKV) -> torch.Tensor:
        B, T, _ = x.shape
        cos, sin = (step.cos, step.sin) if self.kind == SLIDING else step.rotary(self.compress_rotary)
        q_low = self.q_a_norm(self.q_a_proj(x))
        q = unweighted_rms(self.q_b_proj(q_low).view(B, T, self.heads, self.dim).transpose(1, 2), self.eps)
        q = rotate_pairs(q, cos, sin)
        kv = rotate_pairs(self.kv_norm(self.kv_proj(x))[:, None], cos, sin)  # [B, 1, T, D]: keys are values
        keys, _, positions = state.window.update(kv, kv, step)
        visible = step.visible(self.window, positions).expand(B, 1, T, -1)
        if self.kind != SLIDING:
            entries = self.compressor(x, state.compressor, self.compress_rotary, step.trail)
            if self.kind == CSA:
                seen = self.compressor.indexer.visible(x, q_low, step, state.indexer, self.compress_rotary)
            else:
                seen = _complete_windows(step, entries.shape[1], self.compressor.rate).expand(B, T, -1)
            keys = torch.cat((keys, entries[:, None]), dim=2)
            visible = torch.cat((visible, seen[:, None]), dim=-1)
        out = attend_with_sinks(q, keys, keys, visible, self.sinks, self.dim**-0.5)  # [B, H, T, D]
        out = rotate_pairs(out, cos, -sin).transpose(1, 2).reshape(B, T, self.groups, -1)
        weight = self.o_a_proj.weight.view(self.groups, self.group_rank, -1)
        grouped = torch.einsum("btgi,gri->btgr", out, weight)  # each group of heads to its own rank
        return self.o_b_proj(grouped.flatten(2))


# --- hyper-connections ----------------------------------------------------------------------------------


class HyperConnection(nn.Module):
    """From the streams [B, T, N, E]: the block input (their mix by `pre`), and the weights that spread the
    block's output (`post`) and mix the streams (`comb`, made near doubly stochastic by Sinkhorn)."""

    def __init__(self, args: DeepseekV4Args):
        super().__init__()
        n = args.hc_mult
        self.streams, self.iterations, self.eps, self.norm_eps = (
            n,
            args.hc_sinkhorn_iters,
            args.hc_eps,
            args.rms_norm_eps,
        )
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * args.hidden_size))
        self.base = nn.Parameter(torch.empty((2 + n) * n))
        self.scale = nn.Parameter(torch.empty(3))

    def forward(self, streams: torch.Tensor):
        n = self.streams
        mixes = F.linear(unweighted_rms(streams.flatten(2).float(), self.norm_eps), self.fn.float())
        pre, post, comb = mixes.split((n, n, n * n), dim=-1)
        pre_b, post_b, comb_b = self.base.split((n, n, n * n))
        pre_s, post_s, comb_s = self.scale.unbind(0)
        pre = torch.sigmoid(pre * pre_s + pre_b) + self.eps
        post = 2 * torch.sigmoid(post * post_s + post_b)
        comb = torch.softmax(comb.unflatten(-1, (n, n)) * comb_s + comb_b.view(n, n), dim=-1) + self.eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.eps)
        for _ in range(self.iterations - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.eps)
        return post, comb, (pre[..., None] * streams).sum(dim=2).to(streams.dtype)


class HyperHead(nn.Module):
    """The last collapse of the streams into one hidden state."""

    def __init__(self, args: DeepseekV4Args):
        super().__init__()
        n = args.hc_mult
        self.eps, self.norm_eps = args.hc_eps, args.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.empty(n, n * args.hidden_size))
        self.hc_base = nn.Parameter(torch.empty(n))
        self.hc_scale = nn.Parameter(torch.empty(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        mixes = F.linear(unweighted_rms(streams.flatten(2).float(), self.norm_eps), self.hc_fn.float())
        pre = torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.eps
        return (pre[..., None] * streams).sum(dim=2).to(streams.dtype)


# --- MoE ------------------------------------------------------------------------------------------------


def sqrt_softplus(logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(logits).sqrt()


class V4Router(nn.Module):
    """sqrt(softplus) scores (in the compute dtype); the top k of scores + correction bias; their scores,
    renormalised and scaled."""

    def __init__(self, args: DeepseekV4Args):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.empty(args.n_routed_experts))
        self.top_k, self.scaling = args.num_experts_per_tok, args.routed_scaling_factor

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return sqrt_softplus(F.linear(x, self.weight)) + self.e_score_correction_bias

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> Routing:
        scores = sqrt_softplus(F.linear(x, self.weight))
        choice = scores + self.e_score_correction_bias
        ids = choice.topk(self.top_k, dim=-1).indices
        return Routing(_weights(scores, ids, self.scaling), ids, choice.float())


class HashRouter(nn.Module):
    """Experts fixed per token id by `tid2eid` [vocab, k]; weighted by their sqrt(softplus) scores."""

    def __init__(self, args: DeepseekV4Args):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))
        # a parameter, not a buffer, so that the loader reads it from the checkpoint (it is never trained)
        self.tid2eid = nn.Parameter(torch.empty(args.vocab_size, args.num_experts_per_tok, dtype=torch.long), False)
        self.scaling = args.routed_scaling_factor
        self.tokens: torch.Tensor | None = None  # this step's tokens, for `scores`

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Exact for the prefetcher: one for the experts this step's tokens are hashed to."""
        return _one_hot(self.tid2eid[self.tokens.reshape(-1)], self.weight.shape[0])

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> Routing:
        ids = self.tid2eid[tokens.reshape(-1)]
        weights = _weights(sqrt_softplus(F.linear(x, self.weight)), ids, self.scaling)
        return Routing(weights, ids, _one_hot(ids, self.weight.shape[0]))


def _one_hot(ids: torch.Tensor, experts: int) -> torch.Tensor:
    return torch.zeros(ids.shape[0], experts, device=ids.device).scatter_(1, ids, 1.0)


def _weights(scores: torch.Tensor, ids: torch.Tensor, scaling: float) -> torch.Tensor:
    weights = scores.gather(1, ids)
    return (weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * scaling).float()


class V4MoE(SparseMoE):
    """Routes with the tokens' ids as well as their hidden states; adds the shared expert ungated."""

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        routing = self.gate(flat, tokens)
        shared = self.shared_expert(flat)  # queued first: it does not depend on the routing
        return (self.experts(self.layer_idx, flat, routing) + shared).view(x.shape)


# --- the stack ------------------------------------------------------------------------------------------


class V4DecoderLayer(nn.Module):
    def __init__(self, args: DeepseekV4Args, i: int, compress_rotary: RotaryEmbedding, kinds: tuple[str, str] = ()):
        """`kinds`: the attention's and the MoE's (default: layer i's in the config)."""
        super().__init__()
        attention, routing = kinds or (args.layer_types[i], args.mlp_layer_types[i])
        hidden, inter, experts, top_k = (
            args.hidden_size,
            args.moe_intermediate_size,
            args.n_routed_experts,
            args.num_experts_per_tok,
        )
        self.self_attn = CompressedAttention(args, attention, compress_rotary)
        router = HashRouter(args) if routing == "hash_moe" else V4Router(args)
        act = GatedActivation(kind="clamped_glu", act=args.hidden_act, limit=args.swiglu_limit)
        shared = GatedMLP(hidden, inter, GatedActivation(kind="clamped_glu", limit=args.swiglu_limit))
        self.mlp = V4MoE(i, hidden, inter, experts, top_k, router, act=act, shared_expert=shared)
        self.input_layernorm = UpcastRMSNorm(hidden, args.rms_norm_eps)
        self.post_attention_layernorm = UpcastRMSNorm(hidden, args.rms_norm_eps)
        self.attn_hc, self.ffn_hc = HyperConnection(args), HyperConnection(args)

    def forward(self, streams: torch.Tensor, step: Step, state: CompressedKV) -> torch.Tensor:
        post, comb, collapsed = self.attn_hc(streams)
        streams = spread_streams(self.self_attn(self.input_layernorm(collapsed), step, state), post, comb, streams)
        post, comb, collapsed = self.ffn_hc(streams)
        return spread_streams(self.mlp(self.post_attention_layernorm(collapsed), step.ids), post, comb, streams)


def spread_streams(out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    dtype = streams.dtype
    return post.to(dtype)[..., None] * out[..., None, :] + comb.to(dtype).transpose(-1, -2) @ streams


class DeepseekV4LM(CausalLM):
    """The stack over `hc_mult` copies of the embedding, collapsed by `hc_head` before the final norm."""

    def __init__(
        self, args: DeepseekV4Args, layers: list[nn.Module], rotary: RotaryEmbedding, norm=UpcastRMSNorm, mtp=None
    ):
        """`norm` the final norm's class (Hy4's casts before it scales); `mtp` the MTP layers, if any."""
        super().__init__(
            Backbone(args.vocab_size, args.hidden_size, layers, args.rms_norm_eps, norm=norm),
            rotary,
            tie_word_embeddings=args.tie_word_embeddings,
            max_position_embeddings=args.max_position_embeddings,
            mtp=mtp,
        )
        self.streams = args.hc_mult
        self.model.hc_head = HyperHead(args)
        self.hash_routers = [m for m in self.modules() if isinstance(m, HashRouter)]

    def embed(self, ids: torch.Tensor, step: Step) -> torch.Tensor:
        step.ids = ids
        for router in self.hash_routers:
            router.tokens = ids
        h = super().embed(ids, step)
        return h[:, :, None].expand(-1, -1, self.streams, -1).contiguous()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return super().logits(self.model.hc_head(h))

    def mtp_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The streams [B, T, N, E] as they are: DeepSeek's inference/model.py hands MTPBlock the last block's
        output (its collapse and final norm come after, in ParallelHead)."""
        return h


class CollapsedLM(DeepseekV4LM):
    """The stack of streams spread from the embedding and collapsed by `hc_head` within the layers' run, so that
    the hidden state it gives (what MTP layers of one stream take: Hy4's, GLM-5.3-Flash's) is [B, T, E]."""

    def embed(self, ids: torch.Tensor, step: Step) -> torch.Tensor:
        step.ids = ids
        return CausalLM.embed(self, ids, step)

    def run_layers(self, h: torch.Tensor, step: Step, states: list) -> torch.Tensor:
        streams = h[:, :, None].expand(-1, -1, self.streams, -1).contiguous()
        return self.model.hc_head(super().run_layers(streams, step, states))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.norm(h))

    def mtp_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The collapsed state after the final norm, as the model's forward returns it to the drafting in
        SGLang's hunyuan_v4_nextn.py (HYV4Model: norm(hc_head(streams))) and in GLM-5.3-Flash's ports."""
        return CausalLM.mtp_hidden(self, h)


class CollapsedNorm(nn.Module):
    """An MTP layer's last collapse of the streams (hc_head) and its final norm, as the model's logits take
    its own."""

    def __init__(self, args: DeepseekV4Args):
        super().__init__()
        self.hc_head = HyperHead(args)
        self.norm = UpcastRMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        return self.norm(self.hc_head(streams))


class V4MTPLayer(nn.Module):
    """DeepSeek-V4's MTP layer (DeepSeek's inference/model.py, MTPBlock.forward): the token's embedding and
    the hidden streams, each normed and projected on its own (e_proj, h_proj; the embedding's projection
    added to every stream), through a decoder layer of the model's kind, then (for logits) a collapse of
    its own and its final norm before the shared LM head. What the next draft takes is the streams."""

    def __init__(self, args: DeepseekV4Args, block: V4DecoderLayer):
        super().__init__()
        hidden, eps = args.hidden_size, args.rms_norm_eps
        self.enorm, self.hnorm = UpcastRMSNorm(hidden, eps), UpcastRMSNorm(hidden, eps)
        self.e_proj = nn.Linear(hidden, hidden, bias=False)
        self.h_proj = nn.Linear(hidden, hidden, bias=False)
        self.block = block
        self.shared_head = SharedHead(CollapsedNorm(args))

    def forward(self, h: torch.Tensor, embedded: torch.Tensor, step: Step, kv) -> torch.Tensor:
        """h: streams [B, T, N, E]; `embedded` as the model embeds (N copies of the token's embedding)."""
        return self.block(self.e_proj(self.enorm(embedded)) + self.h_proj(self.hnorm(h)), step, kv)


def build(args: DeepseekV4Args) -> CausalLM:
    main = RotaryEmbedding(args.rope("main"), args.head_dim, args.max_position_embeddings)
    compress = RotaryEmbedding(args.rope("compress"), args.head_dim, args.max_position_embeddings)
    n = args.num_hidden_layers
    layers = [V4DecoderLayer(args, i, compress) for i in range(n)]
    # score-routed: the release's hash layers are the first num_hash_layers only
    mtp = [
        V4MTPLayer(args, V4DecoderLayer(args, n + k, compress, (kind, "moe")))
        for k, kind in enumerate(args.mtp_layer_types)
    ]
    return DeepseekV4LM(args, layers, main, mtp=MultiTokenPredictor(mtp, n) if mtp else None)


# (ours, as stored by transformers 5.23): one fragment each
HUB_NAMES = (
    (".self_attn.q_a_proj.", ".attn.wq_a."),
    (".self_attn.q_a_norm.", ".attn.q_norm."),
    (".self_attn.q_b_proj.", ".attn.wq_b."),
    (".self_attn.kv_proj.", ".attn.wkv."),
    (".self_attn.kv_norm.", ".attn.norm."),
    (".self_attn.o_a_proj.", ".attn.wo_a."),
    (".self_attn.o_b_proj.", ".attn.wo_b."),
    (".self_attn.sinks", ".attn.attn_sink"),
    (".self_attn.compressor.kv_proj.", ".attn.compressor.wkv."),
    (".self_attn.compressor.gate_proj.", ".attn.compressor.wgate."),
    (".self_attn.compressor.kv_norm.", ".attn.compressor.norm."),
    (".self_attn.compressor.position_bias", ".attn.compressor.ape"),
    (".self_attn.compressor.indexer.compressor.kv_proj.", ".attn.indexer.compressor.wkv."),
    (".self_attn.compressor.indexer.compressor.gate_proj.", ".attn.indexer.compressor.wgate."),
    (".self_attn.compressor.indexer.compressor.kv_norm.", ".attn.indexer.compressor.norm."),
    (".self_attn.compressor.indexer.compressor.position_bias", ".attn.indexer.compressor.ape"),
    (".self_attn.compressor.indexer.q_b_proj.", ".attn.indexer.wq_b."),
    (".self_attn.compressor.indexer.weights_proj.", ".attn.indexer.weights_proj."),
    (".mlp.gate.weight", ".ffn.gate.weight"),
    (".mlp.gate.e_score_correction_bias", ".ffn.gate.bias"),
    (".mlp.gate.tid2eid", ".ffn.gate.tid2eid"),
    (".mlp.shared_expert.gate_proj.", ".ffn.shared_experts.w1."),
    (".mlp.shared_expert.up_proj.", ".ffn.shared_experts.w3."),
    (".mlp.shared_expert.down_proj.", ".ffn.shared_experts.w2."),
    (".input_layernorm.", ".attn_norm."),
    (".post_attention_layernorm.", ".ffn_norm."),
    (".attn_hc.fn", ".hc_attn_fn"),
    (".attn_hc.base", ".hc_attn_base"),
    (".attn_hc.scale", ".hc_attn_scale"),
    (".ffn_hc.fn", ".hc_ffn_fn"),
    (".ffn_hc.base", ".hc_ffn_base"),
    (".ffn_hc.scale", ".hc_ffn_scale"),
    ("lm_head.", "head."),
)

# DeepSeek's own release (deepseek-ai/DeepSeek-V4-Flash, -Pro; inference/ in the repo): transformers' names
# without `model.`, the embedding `embed`, the last collapse `hc_head_{fn,base,scale}`; `mtp.N.*` the
# multi-token prediction layers. Quantized as localmoe/quantization.py says.
RELEASE = ReleaseLayout(
    marker="embed.weight",
    prefixes=(
        ("model.layers.", "layers."),
        ("model.embed_tokens.", "embed."),
        ("model.norm.", "norm."),
        ("model.hc_head.hc_", "hc_head_"),
        ("head.", "head."),
        ("mtp.", "mtp."),
    ),
)

# the release's MTP layers, `mtp.{k}.*` (the decoder layer's tensors directly under it, in the names
# HUB_NAMES gives; beside them e_proj, h_proj, enorm, hnorm, norm, hc_head_{fn,base,scale}, and copies of
# the embedding and the LM head, which are not read: the model's own are shared), seen under DeepSeek-V3's
# names
V4_MTP = MtpLayout(
    "num_nextn_predict_layers",
    (
        ("model.layers.{layer}.shared_head.norm.hc_head.hc_", "mtp.{depth}.hc_head_"),
        ("model.layers.{layer}.shared_head.norm.norm.", "mtp.{depth}.norm."),
        ("model.layers.{layer}.", "mtp.{depth}."),
    ),
)

FAMILY = Family(
    architectures=("DeepseekV4ForCausalLM",),
    model_type="deepseek_v4",
    args=DeepseekV4Args,
    model=build,
    experts=(
        PerExpert(
            {
                role: f"model.layers.{{layer}}.ffn.experts.{{expert}}.{name}.weight"
                for role, name in (("gate", "w1"), ("up", "w3"), ("down", "w2"))
            }
        ),
        FUSED_EXPERTS,
    ),
    hub_aliases=HUB_NAMES,
    keep_float32=("_hc.", "hc_head", "sinks", "position_bias", "e_score_correction_bias", "norm"),
    release=RELEASE,
    mtp=V4_MTP,
    example="deepseek-ai/DeepSeek-V4-Flash",
)
