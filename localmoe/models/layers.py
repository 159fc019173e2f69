"""Shared layers: norms, SwiGLU, the decoder stack (attention lives in attention.py, rotary in rotary.py).

Parameter names follow transformers' in-memory module names (`model.layers.0.self_attn.q_proj.weight`),
so most checkpoints load without renaming.

Shapes in comments use B batch, T new tokens, S tokens in the cache, H heads, D head dim, E hidden size.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from localmoe.errors import LocalMoEError
from localmoe.kernels.cpu_experts import linear, rms_norm
from localmoe.models.rotary import RotaryEmbedding
from localmoe.models.state import KVCache

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu2": lambda x: F.relu(x).square(),  # Nemotron-H's experts
    "sigmoid": torch.sigmoid,  # output gates (AFMoE)
    "softplus": F.softplus,  # output gates (Laguna)
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise LocalMoEError(f"activation {name!r} is not supported; localmoe knows {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaled(x, self.weight)

    def scaled(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x normalised in float32 and cast back before the scale `weight` (which broadcasts over x), as
        the reference implementations do; one fused op where all is float32 (the same bits), one call of
        the CPU's library for a decode token's bfloat16 (kernels/cpu_experts.py's rms_norm)."""
        if x.dtype == weight.dtype == torch.float32 and weight.shape == x.shape[-1:]:
            return F.rms_norm(x, weight.shape, weight, self.eps)
        if (out := rms_norm(x, weight, self.eps)) is not None:
            return out
        return weight * rms_normalize(x, self.eps)


class UpcastRMSNorm(RMSNorm):
    """Scales in float32 before casting back to the input dtype (gpt-oss, Gemma 4)."""

    def scaled(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == weight.dtype == torch.float32 and weight.shape == x.shape[-1:]:
            return F.rms_norm(x, weight.shape, weight, self.eps)
        return (weight * rms_normalize(x.float(), self.eps)).to(x.dtype)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation without a weight, computed in float32 (one fused op: the same bits as
    x * rsqrt(mean(x^2) + eps) written out)."""
    return F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


class ZeroCenteredRMSNorm(RMSNorm):
    """Scales by 1 + weight (the checkpoint stores the offset from one), in float32 before casting back."""

    def scaled(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return (rms_normalize(x.float(), self.eps) * (1 + weight.float())).to(x.dtype)


# --- where a forward pass is --------------------------------------------------------------------------------


@dataclass
class Step:
    """Where one forward call sits in the sequence; shared by all its layers.

    A decode token reads keys through the first `bucket` slots of each layer's cache, masked by position,
    so that its work depends on the bucket, not on the position (a prefill chunk reads exactly the keys
    before it). An eager step knows where it starts on the host (`start`); a static step (what a CUDA
    graph captures) knows its position only on the device: `start` is None, and a layer that needs it
    cannot run static steps.
    """

    start: int | None
    length: int
    cos: torch.Tensor
    sin: torch.Tensor
    layer_inputs: torch.Tensor | None = None  # [B, T, layers, D]: Gemma 4's per-layer embeddings
    ids: torch.Tensor | None = None  # [B, T] the tokens, where routing reads them (DeepSeek-V4's hash layers)
    bucket: int | None = None  # a decode token's key slots
    # a speculative check: recurrent states keep their state after each position (RecurrentState), compressors
    # their tokens' projections (PooledTrail), so that the cache can be cut back to any of its positions
    trail: bool = False
    _positions: torch.Tensor | None = None  # [T] on the device: given to a static step, computed by an eager one
    _memo: dict = field(default_factory=dict)

    @property
    def static(self) -> bool:
        return self.start is None

    def rotary(self, rotary: RotaryEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin from a rotary embedding other than the model's (for layers of another kind),
        computed once per step."""
        if rotary not in self._memo:
            if self.static:
                self._memo[rotary] = rotary.at(self.positions(), self.cos.dtype)
            else:
                self._memo[rotary] = rotary(self.start, self.length, self.cos.dtype)
        return self._memo[rotary]

    def mask(self, window: int | None, positions: torch.Tensor | None = None) -> tuple[torch.Tensor | None, bool]:
        """(boolean mask [T, S] or None, is_causal) for scaled_dot_product_attention; keys as `visible` takes them.

        The common cases need no mask tensor: a first chunk with no window to cut, or one new token that
        sees the whole cache.
        """
        if positions is None and self.bucket is not None:
            return self.visible(window), False
        if positions is None:
            start, length = self.start, self.length
            within_window = window is None or start + length <= window
            if within_window and start == 0:
                return None, length > 1
            if within_window and length == 1:
                return None, False
        return self.visible(window, positions), False

    def visible(self, window: int | None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Which keys each new token sees, [T, S] booleans, for keys at `positions` [S] (-1: an empty
        slot), or at 0 .. S-1 when None (then computed once per step)."""
        queries = self.positions()[:, None]
        if positions is not None:
            visible = (positions >= 0) & (positions <= queries)
            return visible & (positions > queries - window) if window is not None else visible
        if window not in self._memo:
            seen = self.bucket or self.start + self.length
            keys = torch.arange(seen, device=self.cos.device)[None, :]
            visible = keys <= queries
            if window is not None:
                visible &= keys > queries - window
            self._memo[window] = visible
        return self._memo[window]

    def positions(self) -> torch.Tensor:
        """The positions of the new tokens [T], on the device."""
        if self._positions is None:
            self._positions = torch.arange(self.start, self.start + self.length, device=self.cos.device)
        return self._positions


def bucket(position: int, limit: int) -> int:
    """The key slots a decode token at `position` reads: the next power of two above it (at least 64), at
    most `limit`, the cache's length. One CUDA graph per bucket; attention does not read the whole context."""
    return min(max(64, 1 << position.bit_length()), limit)


class HostEmbedding(nn.Module):
    """An embedding table too large for the device, stored in row blocks `shard_0`, `shard_1`, ... (torch.chunk's
    split of its rows; Qwen4-Exp's n-gram tables are tens of GiB). The loader keeps its rows in host memory
    (`place`): mapped from the checkpoint's shards, or copied into RAM where the plan finds room. A call
    gathers on the host only the rows its ids name and copies those to the ids' device (from pinned memory
    on CUDA, without waiting); the ids are read on the host, so a model with such a table decodes eagerly.
    Built (on `meta`), the blocks are parameters: what the loader checks and finds in the checkpoint."""

    def __init__(self, rows: int, dim: int, parts: int):
        super().__init__()
        self.per_part, self.dim = -(-rows // parts), dim
        for i, start in enumerate(range(0, rows, self.per_part)):
            block = nn.Module()  # names the parameter as stored: shard_{i}.weight
            block.weight = nn.Parameter(torch.empty(min(self.per_part, rows - start), dim))
            self.add_module(f"shard_{i}", block)
        self.blocks: list[torch.Tensor] = []  # placed: host tensors, which no `.to(device)` moves
        self.dtype: torch.dtype | None = None

    def place(self, blocks: list[torch.Tensor], dtype: torch.dtype) -> None:
        """Serve rows from `blocks` (host tensors, in the order of the parameters they replace), in `dtype`."""
        for name in [name for name, _ in self.named_children()]:
            delattr(self, name)
        self.blocks, self.dtype = blocks, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).cpu()
        which = flat // self.per_part
        order = which.argsort()  # block by block: one gather from each block an id names
        local = (flat - which * self.per_part)[order]
        gathered = torch.empty(flat.shape[0], self.dim, dtype=self.blocks[0].dtype)
        end = 0
        for block, count in zip(self.blocks, torch.bincount(which, minlength=len(self.blocks)).tolist(), strict=True):
            if count:
                torch.index_select(block, 0, local[end : end + count], out=gathered[end : end + count])
            end += count
        # PyTorch's pinned allocator does not hand this block out again before its copy has passed
        rows = torch.empty(flat.shape[0], self.dim, dtype=self.dtype, pin_memory=ids.is_cuda)
        rows[order] = gathered.to(self.dtype)  # the rows converted, never the table
        return rows.to(ids.device, non_blocking=True).view(*ids.shape, self.dim)


def host_tables(model: nn.Module) -> dict[str, HostEmbedding]:
    """The model's host-memory tables by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, HostEmbedding)}


class Linear(nn.Linear):
    """nn.Linear through `linear` (kernels/cpu_experts.py), which takes a decode token's bfloat16 products on
    the CPU: the loader makes a CPU model's nn.Linear modules these."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# --- feed-forward and the decoder stack --------------------------------------------------------------------


class MLP(nn.Module):
    """Dense SwiGLU feed-forward: down(act(gate(x)) * up(x)). Also the shared experts of MoE layers."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class UngatedMLP(nn.Module):
    """Feed-forward without a gate: down(act(up(x))) (Nemotron-H's shared expert and dense layers)."""

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = False):
        super().__init__()
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm attention, then pre-norm feed-forward (dense or MoE), each with a residual.

    `norm` is RMSNorm, or nn.LayerNorm for families that use it (both take (dim, eps)).
    """

    def __init__(self, attention: nn.Module, mlp: nn.Module, hidden: int, eps: float, norm=RMSNorm):
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        self.input_layernorm = norm(hidden, eps)
        self.post_attention_layernorm = norm(hidden, eps)

    def forward(self, h: torch.Tensor, step: Step, kv) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), step, kv)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, layers: list[DecoderLayer], eps: float, norm=RMSNorm):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden)
        self.layers = nn.ModuleList(layers)
        self.norm = norm(hidden, eps)


class CausalLM(nn.Module):
    """Embeddings, decoder layers, final norm and LM head, run over a KV cache."""

    def __init__(
        self,
        backbone: Backbone,
        rotary: RotaryEmbedding,
        *,
        tie_word_embeddings: bool,
        max_position_embeddings: int,
        lm_head_bias: bool = False,
        embed_scale: float = 1.0,
        logit_softcap: float | None = None,
        mtp: nn.Module | None = None,
    ):
        """`mtp`: the checkpoint's multi-token-prediction layers (a MultiTokenPredictor of mtp.py), if any."""
        super().__init__()
        self.embed_scale, self.logit_softcap = embed_scale, logit_softcap  # Gemma: sqrt(hidden), tanh capping
        self.model = backbone
        self.rotary = rotary
        self.mtp = mtp
        vocab_size, hidden = backbone.embed_tokens.weight.shape
        self.lm_head = None if tie_word_embeddings else nn.Linear(hidden, vocab_size, bias=lm_head_bias)
        if tie_word_embeddings and lm_head_bias:  # ERNIE: tied weights, and still a bias of its own
            self.lm_head_bias = nn.Parameter(torch.empty(vocab_size))
        self.max_position_embeddings = max_position_embeddings

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        weight = self.model.embed_tokens.weight
        states = [layer.self_attn.new_state(batch, max_len, weight.dtype, weight.device) for layer in self.model.layers]
        return KVCache(states, max_len)

    def new_mtp_cache(self, batch: int, max_len: int, depth: int = 0) -> KVCache:
        """The state of MTP layer `depth`, for `mtp_draft`: positions of its own, as the backbone's cache has."""
        weight = self.model.embed_tokens.weight
        attention = self.mtp.layers[depth].block.self_attn
        return KVCache([attention.new_state(batch, max_len, weight.dtype, weight.device)], max_len)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """The backbone's state per token, and the MTP layers' (which drafting fills as it goes)."""
        return sum(layer.self_attn.state_bytes_per_token(dtype) for layer in self._stateful_layers())

    def fixed_state_bytes(self, dtype: torch.dtype) -> int:
        """Generation state whose size does not grow with the context (recurrent layers, windows' rings),
        the MTP layers' included."""
        return sum(
            getattr(layer.self_attn, "fixed_state_bytes", lambda _: 0)(dtype) for layer in self._stateful_layers()
        )

    def recurrent_state_bytes(self, dtype: torch.dtype) -> int:
        """Of fixed_state_bytes, the backbone's states that sum over every token (`RecurrentState`, of mixers
        marked `recurrent`): a speculative check keeps them after each of its positions."""
        mixers = [layer.self_attn for layer in self.model.layers]
        return sum(mixer.fixed_state_bytes(dtype) for mixer in mixers if getattr(mixer, "recurrent", False))

    def pending_state_bytes(self, dtype: torch.dtype) -> int:
        """The most the backbone's compressors hold of tokens not yet pooled (`PooledState`): what a
        speculative check keeps of them from before it (`PooledTrail`)."""
        return self._backbone_bytes("pending_state_bytes", dtype)

    def trail_bytes_per_token(self, dtype: torch.dtype) -> int:
        """What the backbone's compressors keep of each token of a speculative check (`PooledTrail`)."""
        return self._backbone_bytes("trail_bytes_per_token", dtype)

    def _backbone_bytes(self, name: str, dtype: torch.dtype) -> int:
        """The sum of the backbone's mixers' `name`(dtype), 0 for those without it."""
        return sum(getattr(layer.self_attn, name, lambda _: 0)(dtype) for layer in self.model.layers)

    def _stateful_layers(self) -> list[nn.Module]:
        """The decoder layers that keep a state while generating: the backbone's and the MTP layers'."""
        return [*self.model.layers, *([] if self.mtp is None else [layer.block for layer in self.mtp.layers])]

    def forward(
        self, ids: torch.Tensor, cache: KVCache, all_logits: bool = False, hidden: bool = False, trail: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, V] for ids [B, T] following what the cache holds (only the last position unless
        `all_logits`); the cache advances by T. With `hidden`, (logits, h): h [B, T, E] at the same positions,
        what the MTP layers are handed (`mtp_hidden`, what `mtp_draft` takes). With `trail` (a
        speculative check), the cache can then be cut back to any of these positions (see Step.trail)."""
        step = self._step(cache, ids.shape[1])
        step.trail = trail
        if (step.length == 1 or trail) and self.static_decode:  # as a static step would, positions on the host
            step.bucket = bucket(step.start + step.length - 1, cache.max_len)
        h = self.embed(ids, step)
        cache.writing = True
        h = self.run_layers(h, step, cache.layers)
        cache.pos += step.length
        cache.writing = False
        h = h if all_logits else h[:, -1:]
        return (self.logits(h), self.mtp_hidden(h)) if hidden else self.logits(h)

    def mtp_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """What the first MTP layer is handed of the last layer's output h: h after the final norm, what the LM
        head takes, as the published code hands it (DeepSeek's modeling_deepseek.py, vLLM's and SGLang's MTP
        drafting, transformers' via hidden_states[-1]; see docs/speculative.md)."""
        return self.final_hidden(h)

    def mtp_draft(
        self, h: torch.Tensor, next_ids: torch.Tensor, cache: KVCache, depth: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP layer `depth` over h [B, T, E] (hidden states at positions p .. p+T-1: the target's from
        `forward` with `hidden`, after its final norm, or this layer's previous output) and next_ids [B, T]
        (the tokens at p+1 .. p+T): (logits [B, T, V] of the tokens at p+2 .. p+T+1, the layer's output
        [B, T, E] as the next draft takes it, see mtp.py). `cache` (from `new_mtp_cache` for this depth) is
        at position p, and advances by T."""
        step = self._step(cache, next_ids.shape[1])
        if self.static_mtp:  # as a static step would (`mtp_step`), positions on the host
            step.bucket = bucket(step.start + step.length - 1, cache.max_len)
        cache.writing = True
        out = self._mtp_layer(h, next_ids, step, cache, depth)
        cache.pos += step.length
        cache.writing = False
        return out

    def mtp_step(
        self,
        h: torch.Tensor,
        next_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        keys: int,
        depth: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`mtp_draft` as a static step (see `decode_step`): next_ids [B, T] at `positions` ([T], on the
        device), keys read through the first `keys` slots of the layer's cache; the same results. The
        caller moves `cache.pos` on."""
        return self._mtp_layer(h, next_ids, self._static_step(positions, keys), cache, depth)

    def _mtp_layer(
        self, h: torch.Tensor, next_ids: torch.Tensor, step: Step, cache: KVCache, depth: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.mtp.layers[depth]
        step.ids = next_ids
        h = layer(h, self.embed(next_ids, step), step, cache.layers[0])
        return self.head(layer.shared_head.norm(h)), h

    def _step(self, cache: KVCache, length: int) -> Step:
        """The step of `length` new tokens after what `cache` holds, refused where they do not fit it."""
        start = cache.pos
        if start + length > cache.max_len:
            raise LocalMoEError(
                f"{start + length} tokens do not fit the {cache.max_len}-token context allocated for this run"
            )
        return Step(start, length, *self.rotary(start, length, self.model.embed_tokens.weight.dtype))

    @property
    def static_decode(self) -> bool:
        """Whether every layer can run a static decode step (see `Step`)."""
        return self.rotary.static and all(getattr(layer.self_attn, "static", False) for layer in self.model.layers)

    @property
    def static_mtp(self) -> bool:
        """Whether the MTP layers can run static steps (`mtp_step`), as `static_decode` for the backbone."""
        blocks = [] if self.mtp is None else [layer.block for layer in self.mtp.layers]
        return bool(blocks) and self.rotary.static and all(getattr(b.self_attn, "static", False) for b in blocks)

    def decode_step(
        self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, keys: int, hidden: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, V] for tokens ids [B, T] at `positions` ([T], on the device: the cache's next ones),
        reading keys through the first `keys` (> the last position, see `bucket`) slots of the cache: the
        same work whatever the positions, so that it can be captured once per bucket and T; the same as
        `forward` gives (with `all_logits`). With `hidden`, a speculative check: (logits, h) as `forward`
        gives them with `hidden` and `trail`. The caller moves `cache.pos` on."""
        step = self._static_step(positions, keys)
        step.trail = hidden
        h = self.run_layers(self.embed(ids, step), step, cache.layers)
        return (self.logits(h), self.mtp_hidden(h)) if hidden else self.logits(h)

    def _static_step(self, positions: torch.Tensor, keys: int) -> Step:
        cos, sin = self.rotary.at(positions, self.model.embed_tokens.weight.dtype)
        return Step(None, positions.shape[0], cos, sin, bucket=keys, _positions=positions)

    def run_layers(self, h: torch.Tensor, step: Step, states: list) -> torch.Tensor:
        """The decoder layers over the first layer's input h, each with its state; their last output."""
        for layer, state in zip(self.model.layers, states, strict=True):
            h = layer(h, step, state)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] from the last layer's hidden states."""
        return self.head(self.final_hidden(h))

    def final_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The last layer's output h [B, T, E] after the final norm: what the LM head takes."""
        return self.model.norm(h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] from normalised hidden states: the LM head (the MTP layers share it)."""
        if self.lm_head is None:
            logits = linear(h, self.model.embed_tokens.weight, getattr(self, "lm_head_bias", None))
        else:
            logits = self.lm_head(h)
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def embed(self, ids: torch.Tensor, step: Step) -> torch.Tensor:
        """The hidden states [B, T, E] the first layer takes, for ids [B, T]."""
        h = self.model.embed_tokens(ids)
        if self.embed_scale != 1.0:
            h = h * torch.tensor(self.embed_scale, dtype=h.dtype)  # rounded to the dtype first, as Gemma does
        return h
