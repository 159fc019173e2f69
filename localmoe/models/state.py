"""Per-layer generation state, allocated once for the whole context of a run: keys and values (whole or
in a ring), latents, compressed entries, recurrent matrices.

Every state follows `LayerState`: it takes what its layer writes (`update`, whose arguments are each
kind's own), can `truncate` itself to its first positions (or say it cannot, and the whole cache
restarts) and `reset`.
"""

from typing import Protocol

import torch

# Positions a windowed layer keeps beyond its window, so that a conversation can be rewound that far
# (a chat template that re-renders the last reply) without feeding everything again.
REWIND_SLACK = 1024


class LayerState(Protocol):
    """What the generation loop asks of every layer's state (mlx-lm's cache base class, reduced to ours)."""

    def truncate(self, pos: int, current: int, interrupted: bool) -> bool:
        """Keep the first `pos` of the `current` positions; False where that is impossible (then `reset`
        follows). `interrupted`: the last forward pass did not finish."""
        ...

    def reset(self) -> None: ...


def attention_state(
    batch: int, kv_heads: int, head_dim: int, max_len: int, span: int | None, dtype: torch.dtype, device
):
    """Keys and values for an attention layer that sees at most the last `span` positions (None: all):
    a ring when that takes less memory than one slot per position."""
    if span is not None and span + REWIND_SLACK < max_len:
        return WindowKV(batch, kv_heads, head_dim, span, dtype, device)
    return AttentionKV(batch, kv_heads, head_dim, max_len, dtype, device)


class AttentionKV:
    """Keys and values of one attention layer: [B, H_kv, max_len, D] each."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype, device):
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, k: torch.Tensor, v: torch.Tensor, step) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Write the new [B, H_kv, T, D] keys and values at the step's positions; return all of them so far
        (a decode token: its bucket's, masked by the step), and None for their positions: 0, 1, ... in order."""
        if step.bucket is not None:
            self.k.index_copy_(2, step.positions(), k)
            self.v.index_copy_(2, step.positions(), v)
            return self.k[:, :, : step.bucket], self.v[:, :, : step.bucket], None
        end = step.start + k.shape[2]
        self.k[:, :, step.start : end] = k
        self.v[:, :, step.start : end] = v
        return self.k[:, :, :end], self.v[:, :, :end], None

    def truncate(self, pos: int, current: int, interrupted: bool) -> bool:
        return True  # positions past `pos` are overwritten before they are read again

    def reset(self) -> None:
        pass


class WindowKV:
    """Keys and values of a layer that sees at most the last `span` positions (a sliding window, Llama 4's
    chunks), in a ring of span + REWIND_SLACK slots: position p lives in slot p % size, so memory does
    not grow with the context. `positions` [size] says which position each slot holds (-1: none)."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, span: int, dtype: torch.dtype, device):
        self.span, self.size = span, span + REWIND_SLACK
        self.k = torch.zeros(batch, kv_heads, self.size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.positions = torch.full((self.size,), -1, dtype=torch.long, device=device)

    def update(self, k: torch.Tensor, v: torch.Tensor, step):
        """Take the new [B, H_kv, T, D] keys and values at the step's positions; return keys and values that
        include every one the new queries may see, with their positions [S], in no particular order."""
        new = step.positions()
        if k.shape[2] == 1:  # its slot held a position too old for any query from now on
            self._write(k, v, new)
            return self.k, self.v, self.positions
        seen = (torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2), torch.cat((self.positions, new)))
        self._write(k[:, :, -self.size :], v[:, :, -self.size :], new[-self.size :])
        return seen

    def _write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        slots = positions % self.size
        self.k[:, :, slots] = k
        self.v[:, :, slots] = v
        self.positions[slots] = positions

    def truncate(self, pos: int, current: int, interrupted: bool) -> bool:
        """Possible while the ring still holds the window before `pos`: a rewind of at most REWIND_SLACK
        positions, after a forward pass that finished (a cut-short one may have overwritten it)."""
        if interrupted or current - pos > REWIND_SLACK:
            return False
        self.positions.masked_fill_(self.positions >= pos, -1)
        return True

    def reset(self) -> None:
        self.positions.fill_(-1)


class LatentKV:
    """Multi-head latent attention's state: the latent [B, max_len, rank] and the shared rotary key
    [B, 1, max_len, rope dim] of every token; keys and values are expanded from them when attending."""

    def __init__(self, batch: int, rank: int, rope_dim: int, max_len: int, dtype: torch.dtype, device):
        self.latent = torch.zeros(batch, max_len, rank, dtype=dtype, device=device)
        self.k_rot = torch.zeros(batch, 1, max_len, rope_dim, dtype=dtype, device=device)

    def update(self, latent: torch.Tensor, k_rot: torch.Tensor, step) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new latents [B, T, rank] and rotary keys [B, 1, T, rope] at the step's positions;
        return those so far (a decode token: its bucket's)."""
        if step.bucket is not None:
            self.latent.index_copy_(1, step.positions(), latent)
            self.k_rot.index_copy_(2, step.positions(), k_rot)
            return self.latent[:, : step.bucket], self.k_rot[:, :, : step.bucket]
        end = step.start + latent.shape[1]
        self.latent[:, step.start : end] = latent
        self.k_rot[:, :, step.start : end] = k_rot
        return self.latent[:, :end], self.k_rot[:, :, :end]

    def truncate(self, pos: int, current: int, interrupted: bool) -> bool:
        return True

    def reset(self) -> None:
        pass


class IndexedLatentKV(LatentKV):
    """LatentKV plus an indexer's key [B, max_len, dim] of every token (GLM-5's sparse attention)."""

    def __init__(self, batch: int, rank: int, rope_dim: int, index_dim: int, max_len: int, dtype, device):
        super().__init__(batch, rank, rope_dim, max_len, dtype, device)
        self.index_k = torch.zeros(batch, max_len, index_dim, dtype=dtype, device=device)

    def update_index(self, k: torch.Tensor, start: int) -> torch.Tensor:
        end = start + k.shape[1]
        self.index_k[:, start:end] = k
        return self.index_k[:, :end]


class PooledState:
    """A compressor's state: one entry per `rate` tokens pooled from their projections (DeepSeek-V4).
    It keeps the projections of tokens not yet making a full window, the previous window's first half
    for overlapping windows, and the entries emitted so far."""

    def __init__(self, batch: int, width: int, dim: int, rate: int, max_len: int, dtype, device):
        self.empty = torch.zeros(batch, 0, width, dtype=dtype, device=device)
        self.entries = torch.zeros(batch, max_len // rate + 1, dim, dtype=dtype, device=device)
        self.reset()

    def reset(self) -> None:
        self.pending_kv = self.pending_gate = self.empty
        self.overlap: tuple[torch.Tensor, torch.Tensor] | None = None
        self.count = 0


class CompressedKV:
    """Keys of a sliding window (a ring) beside compressed entries of the whole past (DeepSeek-V4): the
    compressor's and, where entries are selected, the indexer's. Pooled entries cannot be cut back to
    an earlier position: like a recurrent state, it is fed again."""

    def __init__(self, window: WindowKV, compressor: PooledState | None, indexer: PooledState | None):
        self.window, self.compressor, self.indexer = window, compressor, indexer

    def truncate(self, pos: int, current: int, interrupted: bool) -> bool:
        return pos == current and not interrupted

    def reset(self) -> None:
        self.window.reset()
        for state in (self.compressor, self.indexer):
            if state is not None:
                state.reset()


class LinearAttentionState:
    """A linear-attention layer's state: one [B, H, D, D] matrix that sums (decayed) key-value products
    over every token so far. It cannot be rewound to an earlier position."""

    def __init__(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device):
        self.kv = torch.zeros(batch, heads, head_dim, head_dim, dtype=dtype, device=device)

    def truncate(self, pos: int, current: int, interrupted: bool) -> bool:
        return pos == current and not interrupted

    def reset(self) -> None:
        self.kv.zero_()


class DeltaNetState:
    """A Gated DeltaNet layer's state: the last `kernel - 1` inputs of its causal convolution [B, C, K-1],
    and the delta rule's [B, H, Dk, Dv] matrix, kept in float32 as it sums over every token so far.
    It cannot be rewound to an earlier position."""

    def __init__(self, batch: int, channels: int, kernel: int, heads: int, k_dim: int, v_dim: int, dtype, device):
        self.conv = torch.zeros(batch, channels, kernel - 1, dtype=dtype, device=device)
        self.matrix = torch.zeros(batch, heads, k_dim, v_dim, dtype=torch.float32, device=device)

    def truncate(self, pos: int, current: int, interrupted: bool) -> bool:
        return pos == current and not interrupted

    def reset(self) -> None:
        self.conv.zero_()
        self.matrix.zero_()


class KVCache:
    """The state of every layer plus how many positions are filled."""

    def __init__(self, layers: list[LayerState], max_len: int):
        self.layers = layers
        self.max_len = max_len
        self.pos = 0
        self.writing = False  # a forward pass started and did not finish (interrupted)

    def rewind(self, pos: int) -> int:
        """Keep the first `pos` positions, for a prompt that shares them; returns the positions kept:
        `pos`, or 0 when a layer's state cannot be cut there (see each state's `truncate`) and
        everything restarts."""
        if not all(state.truncate(pos, self.pos, self.writing) for state in self.layers):
            for state in self.layers:
                state.reset()
            pos = 0
        self.pos, self.writing = pos, False
        return pos
