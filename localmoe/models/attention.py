"""Attention variants: grouped-query attention (with the options families add to it) and DeepSeek's
multi-head latent attention, whose KV cache holds one compressed latent per token.

Shapes: B batch, T new tokens, S tokens in the cache, H heads, D head dim.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.kernels.cpu_experts import decode_attention
from localmoe.models.layers import RMSNorm, Step, activation, linear, rms_normalize
from localmoe.models.rotary import RotaryEmbedding, apply_rotary, apply_rotary_interleaved
from localmoe.models.state import REWIND_SLACK, AttentionKV, LatentKV, WindowKV, attention_state


class Attention(nn.Module):
    """Grouped-query attention with rotary embeddings.

    Options: biases on q/k/v and on the output projection; RMSNorm of queries and keys per head
    (`qk_norm="head"`, Qwen3; `"head_after_rope"`, Hunyuan) or over the whole projection (`"full"`,
    OLMoE, MiniMax-M2); clipping of q/k/v; rotary on adjacent pairs of dims (`interleaved_rope`,
    ERNIE); a sliding window; attention sinks (gpt-oss), a learned logit per head that takes
    part in the softmax without a value; and an output gate (Qwen3.5), for which q_proj also gives
    each head a gate, sigmoid(gate) scaling the head's output. `norm` is the q/k norm's class; `rotary`
    a rotary embedding for this kind of layer where the model has several (Gemma 4, Mellum);
    `rope=False` for layers without position embeddings (NoPE: Nemotron-H, Granite 4.0-H, K-EXAONE's and
    Command A+'s global layers); `scale` the factor on query-key products where it is not
    1/sqrt(head_dim) (Granite's attention_multiplier, Step-3.7's query_pre_attn_scalar); `gate` an
    output gate of its own projection, act(gate_proj(x)) scaling each output channel or, with
    `gate_per_head`, each head (AFMoE: sigmoid per channel; Laguna: softplus per head; Step-3.7:
    sigmoid per head), plus a learned bias per head with `gate_bias` (Beam); `v_head_dim` values
    narrower or wider than queries and keys (MiMo-V2-Flash); `query_scale` a factor on each query by its
    position, a function of positions [T] giving float32 [T] (Beam's global layers without rotary);
    `output_norm_eps` RMS-normalises each head's output, without a scale, before any gate (Muse Spark).
    """

    static = True  # runs static decode steps (see layers.Step)

    def __init__(
        self,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool = False,
        out_bias: bool = False,
        qk_norm: str | None = None,
        norm_eps: float = 1e-6,
        clip_qkv: float | None = None,
        sliding_window: int | None = None,
        sinks: bool = False,
        interleaved_rope: bool = False,
        output_gate: bool = False,
        norm=RMSNorm,
        rotary: RotaryEmbedding | None = None,
        rope: bool = True,
        v_head_dim: int | None = None,
        scale: float | None = None,
        gate: str | None = None,
        gate_per_head: bool = False,
        gate_bias: bool = False,
        query_scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
        output_norm_eps: float | None = None,
    ):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.rope, self.scale = rope, head_dim**-0.5 if scale is None else scale
        self.qk_norm, self.clip_qkv, self.sliding_window = qk_norm, clip_qkv, sliding_window
        self.rotate = apply_rotary_interleaved if interleaved_rope else apply_rotary
        self.output_gate, self.query_scale, self.output_norm_eps = output_gate, query_scale, output_norm_eps
        self.rotary = rotary  # a rotary of this layer's kind, shared by such layers; None: the model's
        self.q_proj = nn.Linear(hidden, heads * head_dim * (2 if output_gate else 1), bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_heads * self.v_head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * self.v_head_dim, hidden, bias=out_bias)
        if qk_norm in ("head", "head_after_rope"):
            self.q_norm, self.k_norm = norm(head_dim, norm_eps), norm(head_dim, norm_eps)
        elif qk_norm == "full":
            self.q_norm, self.k_norm = norm(heads * head_dim, norm_eps), norm(kv_heads * head_dim, norm_eps)
        if sinks:
            self.sinks = nn.Parameter(torch.empty(heads))
        if gate is not None:
            self.gate_proj = nn.Linear(hidden, heads if gate_per_head else heads * head_dim, bias=False)
            self.gate_act = activation(gate)
        if gate_bias:
            self.gate_bias = nn.Parameter(torch.empty(heads))

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> AttentionKV | WindowKV:
        return attention_state(
            batch, self.kv_heads, self.head_dim, max_len, self.span, dtype, device, v_dim=self.v_head_dim
        )

    @property
    def span(self) -> int | None:
        """The most recent positions a query can see, if fewer than all."""
        return self.sliding_window

    def state_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 0 if self.span is not None else self._bytes_per_position(dtype)

    def prefill_attention_shape(self) -> tuple[int, int]:
        """(query heads, key plus value width per head) of what a prefill chunk's attention materialises
        (the memory plan's workspace)."""
        return self.heads, self.head_dim + self.v_head_dim

    def fixed_state_bytes(self, dtype: torch.dtype) -> int:
        """A windowed layer's ring (at most: a shorter context gets one slot per position instead)."""
        return 0 if self.span is None else self._bytes_per_position(dtype) * (self.span + REWIND_SLACK)

    def _bytes_per_position(self, dtype: torch.dtype) -> int:
        return self.kv_heads * (self.head_dim + self.v_head_dim) * dtype.itemsize

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values [B, T, heads x dim] of hidden states x [B, T, E]."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def prepare_decode(self) -> None:
        """Once the weights are loaded: q, k and v's weights become views of one matrix, so that a decode
        token projects them in one matmul (one token: the same bits as three on every shape measured;
        many tokens keep three, where BLAS may block a wider matrix differently); and q_norm and k_norm's
        weights are laid side by side, for one norm over queries and keys. Not fused: an output gate or a
        norm over all heads between the projections, or projections of a family's own."""
        if self.qk_norm in ("head", "head_after_rope"):
            q_weight, k_weight = self.q_norm.weight, self.k_norm.weight
            self.qk_norm_weight = torch.cat((q_weight.expand(self.heads, -1), k_weight.expand(self.kv_heads, -1)))
        if self.output_gate or self.qk_norm == "full" or type(self).project is not Attention.project:
            return
        projections = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([p.weight for p in projections])
        biases = [p.bias for p in projections]
        self.qkv_bias = None if biases[0] is None else torch.cat(biases)
        for projection, part in zip(projections, weight.split([p.out_features for p in projections]), strict=True):
            projection.weight = nn.Parameter(part, requires_grad=False)
        self.qkv_weight = weight

    def forward(self, x: torch.Tensor, step: Step, kv: AttentionKV) -> torch.Tensor:
        B, T, _ = x.shape
        qk, v, gate = self._projections(x)  # queries and keys side by side: one norm, one rotation for both
        if self.qk_norm == "head":
            qk = self._head_norm(qk)
        qk = qk.transpose(1, 2)  # [B, H + H_kv, T, D]
        if self.rope:
            cos, sin = (step.cos, step.sin) if self.rotary is None else step.rotary(self.rotary)
            qk = self.rotate(qk, cos, sin)
        if self.qk_norm == "head_after_rope":
            qk = self._head_norm(qk.transpose(1, 2)).transpose(1, 2)
        q, k = qk.split((self.heads, self.kv_heads), dim=1)
        if self.query_scale is not None:
            q = (q.float() * self.query_scale(step.positions())[:, None]).to(q.dtype)
        k, v, positions = kv.update(k, v.transpose(1, 2), step)  # [B, H_kv, S, D]
        if hasattr(self, "sinks"):
            visible = step.visible(self.sliding_window, positions)
            out = attend_with_sinks(q, k, v, visible, self.sinks, self.scale)
        else:
            mask, is_causal = self.mask(x, step, kv, positions)
            out = decode_attention(q, k, v, mask, is_causal, self.scale)  # a decode token on the CPU, else None
            if out is None:
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale, enable_gqa=True
                )
        out = out.transpose(1, 2).reshape(B, T, -1)
        if self.output_norm_eps is not None:
            out = rms_normalize(out.view(B, T, self.heads, -1), self.output_norm_eps).view(B, T, -1)
        if self.output_gate:
            out = out * torch.sigmoid(gate.reshape(B, T, -1))
        if hasattr(self, "gate_proj"):
            gate = self.gate_proj(x).view(B, T, self.heads, -1)
            if hasattr(self, "gate_bias"):
                gate = gate + self.gate_bias[:, None]
            scale = self.gate_act(gate.float()).to(out.dtype)
            out = (out.view(B, T, self.heads, -1) * scale).reshape(B, T, -1)
        return self.o_proj(out)

    def mask(self, x: torch.Tensor, step: Step, kv, positions: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for scaled_dot_product_attention over the keys `kv.update` gave; a layer that
        selects keys from x (Qwen4-Exp's indexer) narrows it."""
        return step.mask(self.sliding_window, positions)

    def _projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Queries and keys as heads side by side [B, T, H + H_kv, D], values [B, T, H_kv, D] and the
        output gate where the layer has one: a decode token's from one matmul where the weights are fused."""
        B, T, _ = x.shape
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if T == 1 and hasattr(self, "qkv_weight"):
            qkv = linear(x, self.qkv_weight, self.qkv_bias)
            if self.clip_qkv is not None:
                qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
            qk, v = qkv.split((q_width + kv_width, self.kv_heads * self.v_head_dim), dim=-1)
            return qk.view(B, T, -1, self.head_dim), v.view(B, T, self.kv_heads, self.v_head_dim), None
        q, k, v = self.project(x)
        gate = None
        if self.output_gate:  # per head: [query | gate]
            q, gate = q.view(B, T, self.heads, 2 * self.head_dim).chunk(2, dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q, k = q.reshape(B, T, self.heads, self.head_dim), k.reshape(B, T, self.kv_heads, self.head_dim)
        return torch.cat((q, k), dim=2), v.reshape(B, T, self.kv_heads, self.v_head_dim), gate

    def _head_norm(self, qk: torch.Tensor) -> torch.Tensor:
        """q_norm on the query heads and k_norm on the key heads of qk [B, T, H + H_kv, D], at once."""
        return self.q_norm.scaled(qk, self.qk_norm_weight)


def attend_with_sinks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, sinks: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax over [scores, sink] with the sink's column dropped before weighting the values. [B, H, T, Dv]
    (Dv: the values' width, which may differ from the queries' and keys')

    Query heads are grouped by the key head they share ([B, H_kv, G, T, D]) and broadcast against it,
    so keys and values are never copied for every head."""
    B, H, T, D = q.shape
    groups = H // k.shape[1]
    q = q.view(B, k.shape[1], groups, T, D)
    k, v = k.unsqueeze(2), v.unsqueeze(2)  # [B, H_kv, 1, S, D]
    if visible.dim() == 4:  # [B, 1 or H, T, S]: grouped as the query heads are
        visible = visible.unflatten(1, (k.shape[1], groups) if visible.shape[1] == H else (1, 1))
    scores = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~visible, float("-inf"))  # [B, H_kv, G, T, S]
    sink = sinks.view(1, k.shape[1], groups, 1, 1).expand(B, -1, -1, T, 1).to(scores.dtype)
    logits = torch.cat((scores, sink), dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    return (logits.softmax(dim=-1)[..., :-1].to(v.dtype) @ v).view(B, H, T, v.shape[-1])


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2).

    Each token's keys and values come from one low-rank latent (kv_lora_rank wide, RMS-normalised)
    plus one rotary key shared by all heads: the cache keeps those two, which for DeepSeek-V3 is
    about a fifteenth of full keys and values, and expands them for every head when attending.
    Queries come from the hidden state directly or through their own low-rank bottleneck. With
    `rope=False` (Kimi-Linear) the "rotary" parts are not rotated: a shared key part like any other.
    `sinks`: a learned logit per head that takes part in the softmax without a value (Hy4).
    """

    static = True

    def __init__(
        self,
        hidden: int,
        heads: int,
        *,
        q_lora_rank: int | None,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        bias: bool,
        interleaved_rope: bool,
        scale: float,
        latent_eps: float = 1e-6,
        position_scaling: tuple[float, int] | None = None,
        rope: bool = True,
        rotary: RotaryEmbedding | None = None,
        sinks: bool = False,
    ):
        super().__init__()
        self.heads, self.kv_lora_rank = heads, kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.interleaved_rope, self.scale, self.rope = interleaved_rope, scale, rope
        self.rotary = rotary  # as Attention's: a rotary of this layer's kind, where the model has several
        # Mistral 4: queries times 1 + beta * log(1 + floor(position / original context)), as (beta, context)
        self.position_scaling = position_scaling
        qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, heads * qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, latent_eps)
            self.q_b_proj = nn.Linear(q_lora_rank, heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, latent_eps)
        self.kv_b_proj = nn.Linear(kv_lora_rank, heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * v_head_dim, hidden, bias=bias)
        if sinks:
            self.sinks = nn.Parameter(torch.empty(heads))

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> LatentKV:
        return LatentKV(batch, self.kv_lora_rank, self.rope_dim, max_len, dtype, device)

    def state_bytes_per_token(self, dtype: torch.dtype) -> int:
        return (self.kv_lora_rank + self.rope_dim) * dtype.itemsize

    def prefill_attention_shape(self) -> tuple[int, int]:
        """As `Attention.prefill_attention_shape`: a long chunk expands the latents to every head."""
        return self.heads, self.nope_dim + self.rope_dim + self.v_dim

    def queries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Queries [B, T, heads x (nope + rope)], the query's bottleneck [B, T, rank] (None without one), and
        an output gate [B, T, heads x v] where the query projection gives one (A.X-K2; None here)."""
        if hasattr(self, "q_proj"):
            return self.q_proj(x), None, None
        q_low = self.q_a_layernorm(self.q_a_proj(x))
        return self.q_b_proj(q_low), q_low, None

    def forward(self, x: torch.Tensor, step: Step, kv: LatentKV) -> torch.Tensor:
        B, T, _ = x.shape
        q, q_low, gate = self.queries(x)
        q = q.view(B, T, self.heads, -1).transpose(1, 2)  # [B, H, T, nope + rope]
        q_nope, q_rot = q.split((self.nope_dim, self.rope_dim), dim=-1)
        latent, k_rot = self.latent(x)  # [B, T, rank], [B, T, rope]
        k_rot = k_rot.view(B, 1, T, self.rope_dim)
        if self.rope:
            rotate = apply_rotary_interleaved if self.interleaved_rope else apply_rotary
            cos, sin = (step.cos, step.sin) if self.rotary is None else step.rotary(self.rotary)
            q_rot, k_rot = rotate(q_rot, cos, sin), rotate(k_rot, cos, sin)
        q_nope, q_rot = self.scale_queries(q_nope, q_rot, step)
        latent, k_rot = kv.update(latent, k_rot, step)  # [B, S, rank], [B, 1, S, rope]
        mask, is_causal = self.mask(x, q_low, step, kv)
        if hasattr(self, "sinks") and mask is None:  # the sinks' softmax takes no shortcut: an explicit mask
            mask = step.visible(None)
        attend = self._absorbed if self.absorbs(T) else self._expanded
        out = attend(q_nope, q_rot, latent, k_rot, mask, is_causal).transpose(1, 2).reshape(B, T, -1)  # [B, T, H x v]
        if gate is not None:
            out = (out * torch.sigmoid(gate.float())).to(out.dtype)
        return self.output(x, out)

    def latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's normalised latent [B, T, rank] and its rotary key before rotation [B, T, rope]."""
        latent, k_rot = self.kv_a_proj_with_mqa(x).split((self.kv_lora_rank, self.rope_dim), dim=-1)
        return self.kv_a_layernorm(latent), k_rot

    def scale_queries(self, q_nope: torch.Tensor, q_rot: torch.Tensor, step: Step):
        """The queries [B, H, T, *] scaled by position where the layer does (Mistral 4: `position_scaling`)."""
        if self.position_scaling is None:
            return q_nope, q_rot
        beta, context = self.position_scaling
        scale = (1 + beta * torch.log1p(torch.floor(step.positions().float() / context))).to(q_rot.dtype)
        return q_nope * scale[:, None], q_rot * scale[:, None]

    def absorbs(self, queries: int) -> bool:
        """Whether attending in the latent space costs fewer multiplies for this many queries: per query
        and key it costs 2 rank + rope per head against nope + rope + v, but it skips expanding every
        cached latent to each head's keys and values (rank x (nope + v) per key and head)."""
        rank, expand = self.kv_lora_rank, self.nope_dim + self.v_dim
        return queries * (2 * rank - expand) < rank * expand

    def _expanded(self, q_nope, q_rot, latent, k_rot, mask, is_causal) -> torch.Tensor:
        """Attention over every head's keys and values, expanded from the cached latents."""
        B, S = latent.shape[:2]
        k_nope, v = (
            self.kv_b_proj(latent).view(B, S, self.heads, -1).transpose(1, 2).split((self.nope_dim, self.v_dim), -1)
        )
        k = torch.cat((k_nope, k_rot.expand(-1, self.heads, -1, -1)), dim=-1)
        return self._attend(torch.cat((q_nope, q_rot), dim=-1), k, v, mask, is_causal)

    def _absorbed(self, q_nope, q_rot, latent, k_rot, mask, is_causal) -> torch.Tensor:
        """The same attention in the latent space, as DeepSeek's own inference code runs it
        (deepseek-ai/DeepSeek-V3, inference/model.py, `MLA.forward` without attn_impl "naive"): each head's
        key up-projection folded into its query, q_nope W_k . latent = q_nope . (W_k latent), and its value
        up-projection applied once to the attended latent, so a decode token reads the latent cache
        instead of expanding it for every head."""
        w_key, w_value = self.kv_b_proj.weight.view(self.heads, -1, self.kv_lora_rank).split(
            (self.nope_dim, self.v_dim), dim=1
        )  # [H, nope, rank], [H, v, rank]
        q = torch.cat((q_nope @ w_key, q_rot), dim=-1)  # [B, H, T, rank + rope]
        latent = latent.unsqueeze(1)  # one key and value head, shared by all: [B, 1, S, rank]
        k = torch.cat((latent, k_rot), dim=-1)
        out = self._attend(q, k, latent, mask, is_causal)  # [B, H, T, rank]
        return out @ w_value.transpose(1, 2)

    def _attend(self, q, k, v, mask, is_causal) -> torch.Tensor:
        """Attention of queries [B, H, T, D] over keys and values of H or one head(s), with the sinks where
        the layer has them (then `mask` is the visible keys)."""
        if hasattr(self, "sinks"):
            return attend_with_sinks(q, k, v, mask, self.sinks, self.scale)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale, enable_gqa=k.shape[1] != q.shape[1]
        )

    def output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The layer's output [B, T, E] from the heads' outputs [B, T, heads x v dim] (x: its input)."""
        return self.o_proj(out)

    def mask(self, x: torch.Tensor, q_low: torch.Tensor | None, step: Step, kv: LatentKV):
        """Which cached tokens each query attends to (as `Step.mask`): all before it, unless a subclass
        selects among them (GLM-5's indexer)."""
        return step.mask(None)
