"""Per-layer generation state, allocated once for the whole context of a run: keys and values (whole or
in a ring), latents, compressed entries, recurrent matrices, rings of a convolution's inputs.

Every state follows `LayerState`: it takes what its layer writes (`update`, whose arguments are each
kind's own), can `truncate` itself to its first positions (or say it cannot, and the whole cache
restarts) and `reset`. A state that sums over every token (`RecurrentState`) or pools tokens
(DeepSeek-V4's `PooledState`) is cut back only where nothing is dropped or into a forward pass that kept
its trail (speculative decoding's check: the state after each position, or the projections it pools
from), so that a rejected draft feeds nothing again.
"""

from dataclasses import dataclass
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
    batch: int,
    kv_heads: int,
    head_dim: int,
    max_len: int,
    span: int | None,
    dtype: torch.dtype,
    device,
    v_dim: int | None = None,
):
    """Keys and values (`v_dim` wide if not head_dim) for an attention layer that sees at most the last
    `span` positions (None: all): a ring when that takes less memory than one slot per position."""
    if span is not None and span + REWIND_SLACK < max_len:
        return WindowKV(batch, kv_heads, head_dim, span, dtype, device, v_dim)
    return AttentionKV(batch, kv_heads, head_dim, max_len, dtype, device, v_dim)


class AttentionKV(LayerState):
    """Keys and values of one attention layer: [B, H_kv, max_len, D] each (values `v_dim` wide if given)."""

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device,
        v_dim: int | None = None,
    ):
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, kv_heads, max_len, v_dim or head_dim, dtype=dtype, device=device)

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


class WindowKV(LayerState):
    """Keys and values of a layer that sees at most the last `span` positions (a sliding window, Llama 4's
    chunks), in a ring of span + REWIND_SLACK slots: position p lives in slot p % size, so memory does
    not grow with the context. `positions` [size] says which position each slot holds (-1: none)."""

    def __init__(
        self, batch: int, kv_heads: int, head_dim: int, span: int, dtype: torch.dtype, device, v_dim: int | None = None
    ):
        self.span, self.size = span, span + REWIND_SLACK
        self.k = torch.zeros(batch, kv_heads, self.size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, kv_heads, self.size, v_dim or head_dim, dtype=dtype, device=device)
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


class LatentKV(LayerState):
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


class IndexedKV(AttentionKV):
    """AttentionKV plus an indexer's key [B, max_len, dim] of every token (MiniMax-M3's block-sparse attention)."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, index_dim: int, max_len: int, dtype, device):
        super().__init__(batch, kv_heads, head_dim, max_len, dtype, device)
        self.index_k = torch.zeros(batch, max_len, index_dim, dtype=dtype, device=device)

    def update_index(self, k: torch.Tensor, start: int) -> torch.Tensor:
        end = start + k.shape[1]
        self.index_k[:, start:end] = k
        return self.index_k[:, :end]


class PooledState:
    """A compressor's state: one entry per `rate` tokens pooled from their projections (DeepSeek-V4).
    It keeps the projections of tokens not yet making a full window (a copy: at most rate - 1 tokens),
    the last window's first halves for overlapping windows, and the entries emitted so far; after a
    forward pass that kept its trail (a speculative check), what cuts it back to any of its positions."""

    def __init__(self, batch: int, width: int, dim: int, rate: int, max_len: int, dtype, device, overlapping: bool):
        self.rate, self.overlapping = rate, overlapping
        self.empty = torch.zeros(batch, 0, width, dtype=dtype, device=device)
        self.entries = torch.zeros(batch, max_len // rate + 1, dim, dtype=dtype, device=device)
        self.reset()

    def reset(self) -> None:
        self.pending_kv = self.pending_gate = self.empty
        self.overlap: tuple[torch.Tensor, torch.Tensor] | None = None
        self.count = 0
        self.trail: PooledTrail | None = None

    def truncate(self, pos: int, current: int) -> bool:
        """Back to the first `pos` of the `current` positions: where nothing is dropped, or into the last
        forward pass where it kept its trail (from its first pending token on). The entries count is
        then pos // rate (those past it are written again), the pending tokens those after the last full
        window, and the overlap that window's first halves."""
        trail, self.trail = self.trail, None
        if pos == current:
            return True
        first = trail.count * self.rate if trail is not None else current  # the trail's first position
        if trail is None or current != first + trail.kv.shape[1] or pos < first:
            return False
        self.count = pos // self.rate
        done = self.count * self.rate - first  # the trail's index of the first token left pending
        self.pending_kv, self.pending_gate = (t[:, done : pos - first].clone() for t in (trail.kv, trail.gate))
        self.overlap = trail.overlap
        if self.overlapping and self.count > trail.count:  # the last full window is in the trail
            last, d = slice(done - self.rate, done), trail.kv.shape[-1] // 2
            self.overlap = (trail.kv[:, last, :d].clone(), trail.gate[:, last, :d] + trail.bias[:, :d])
        return True


@dataclass
class PooledTrail:
    """What a compressor's state keeps through a speculative check (`Step.trail`) to be cut back to any of
    its positions: the entries count before it, the projections and gates [B, n, width] of the tokens
    then pending followed by the check's own (the tensors the forward pass pools from, not copies), the
    overlap before it, and the gates' position bias [rate, width] (an overlap's gates carry it)."""

    count: int
    kv: torch.Tensor
    gate: torch.Tensor
    overlap: tuple[torch.Tensor, torch.Tensor] | None
    bias: torch.Tensor


class CompressedKV(LayerState):
    """Keys of a sliding window (a ring) beside compressed entries of the whole past (DeepSeek-V4): the
    compressor's and, where entries are selected, the indexer's. Pooled entries are cut back only where
    nothing is dropped or into a forward pass that kept its trail (a speculative check), as a recurrent
    state is."""

    def __init__(self, window: WindowKV, compressor: PooledState | None, indexer: PooledState | None):
        self.window, self.compressor, self.indexer = window, compressor, indexer

    def truncate(self, pos: int, current: int, interrupted: bool) -> bool:
        if interrupted:
            return False  # `reset` follows, which drops the trails
        pooled = [state.truncate(pos, current) for state in self._pooled()]  # each drops its trail
        return all(pooled) and self.window.truncate(pos, current, interrupted)

    def reset(self) -> None:
        self.window.reset()
        for state in self._pooled():
            state.reset()

    def _pooled(self) -> list[PooledState]:
        return [state for state in (self.compressor, self.indexer) if state is not None]


class RecurrentState(LayerState):
    """A recurrent layer's state (linear attention, Gated DeltaNet, Mamba-1 and -2, Kimi Delta Attention):
    named tensors [B, X, ...] that sum over every token so far, such as a convolution's last inputs
    [B, C, K - 1] or a scan's matrices (kept in float32). It cannot be rewound to an earlier position,
    except into a forward pass that kept its trail (a speculative check, `Step.trail`): its layer then
    appends the state after each of the pass's positions to `pieces` (what the kernels' `trail` takes),
    [B, X, n, ...] for n positions at a time, and any of them can be taken back without feeding a token
    again (vLLM and SGLang keep the state of every checked position likewise)."""

    def __init__(self, **tensors: torch.Tensor):
        self.tensors = tensors
        self.__dict__.update(tensors)
        self.start = 0  # the first position of the last forward pass
        self.pieces: dict[str, list[torch.Tensor] | None] = dict.fromkeys(tensors)

    def begin(self, step) -> None:
        """A forward pass over `step` starts: lists for its trail where it keeps one, else none (and any
        earlier trail is dropped)."""
        self.start = step.start
        self.pieces = {name: [] if step.trail else None for name in self.tensors}

    def truncate(self, pos: int, current: int, interrupted: bool) -> bool:
        pieces, self.pieces = self.pieces, dict.fromkeys(self.tensors)
        if interrupted or pos == current:
            return not interrupted
        index = pos - self.start - 1  # the state after position pos - 1
        for name, tensor in self.tensors.items():
            if pieces[name] is None or current != self.start + _positions(pieces[name]) or index < 0:
                return False
            tensor.copy_(_position(pieces[name], index))
        return True

    def reset(self) -> None:
        for tensor in self.tensors.values():
            tensor.zero_()
        self.pieces = dict.fromkeys(self.tensors)


def _positions(pieces: list[torch.Tensor]) -> int:
    return sum(piece.shape[2] for piece in pieces)


def _position(pieces: list[torch.Tensor], index: int) -> torch.Tensor:
    """The state after position `index` of pieces [B, X, n, ...] laid end to end."""
    for piece in pieces:
        if index < piece.shape[2]:
            return piece[:, :, index]
        index -= piece.shape[2]
    raise IndexError("past the trail")


class ConvRing(LayerState):
    """A short convolution's inputs [B, C, size] for the last `size` = K - 1 + REWIND_SLACK positions,
    position p in slot p % size: enough to convolve the next tokens (which see the K - 1 before them)
    after a rewind of up to REWIND_SLACK positions, in memory that does not grow with the context."""

    def __init__(self, batch: int, channels: int, kernel: int, dtype: torch.dtype, device):
        self.past = kernel - 1
        self.size = self.past + REWIND_SLACK
        self.inputs = torch.zeros(batch, channels, self.size, dtype=dtype, device=device)

    def window(self, start: int) -> torch.Tensor:
        """The inputs of the K - 1 positions before `start` [B, C, K - 1], zeros before the first."""
        positions = torch.arange(start - self.past, start, device=self.inputs.device)
        return self.inputs[..., positions % self.size] * (positions >= 0).to(self.inputs.dtype)

    def write(self, x: torch.Tensor, start: int) -> None:
        """Keep the inputs x [B, C, T] of positions start .. start + T - 1 (the last `size` of them)."""
        kept = x[..., -self.size :]
        positions = torch.arange(start + x.shape[-1] - kept.shape[-1], start + x.shape[-1], device=x.device)
        self.inputs[..., positions % self.size] = kept

    def truncate(self, pos: int, current: int, interrupted: bool) -> bool:
        """Possible while the ring still holds the K - 1 inputs before `pos`, after a forward pass that
        finished."""
        return not interrupted and current - pos <= self.size - self.past

    def reset(self) -> None:
        self.inputs.zero_()


class CombinedState(LayerState):
    """A layer's states side by side, by name (ZAYA's keys and values beside its two rings of past
    inputs): it can be cut back only where every one of them can."""

    def __init__(self, **states):
        self.states = states
        self.__dict__.update(states)

    def truncate(self, pos: int, current: int, interrupted: bool) -> bool:
        return all([state.truncate(pos, current, interrupted) for state in self.states.values()])

    def reset(self) -> None:
        for state in self.states.values():
            state.reset()


class NoState(LayerState):
    """The state of a layer that mixes nothing across positions (Nemotron-H's MLP and MoE layers)."""

    def truncate(self, pos: int, current: int, interrupted: bool) -> bool:
        return True

    def reset(self) -> None:
        pass


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
