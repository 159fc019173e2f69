"""Generation states of layers other than attention (whose keys and values runtime/kv_cache.py holds):
recurrent layers, and layers with nothing to remember. Each follows the same protocol: `truncate(pos,
current, interrupted)` says whether the state can be cut back to its first `pos` positions (else the
whole cache restarts), `reset` empties it."""

import torch

from localmoe.runtime import kv_cache


class RecurrentState:
    """A recurrent layer's state (Mamba-2, Kimi Delta Attention, a short convolution): named tensors that
    sum over every token so far, such as a convolution's last inputs [B, C, K - 1] or a scan's matrices
    (kept in float32). It cannot be rewound to an earlier position, only kept when nothing is dropped."""

    def __init__(self, **tensors: torch.Tensor):
        self.tensors = tensors
        self.__dict__.update(tensors)

    def truncate(self, pos: int, current: int, interrupted: bool) -> bool:
        return pos == current and not interrupted

    def reset(self) -> None:
        for tensor in self.tensors.values():
            tensor.zero_()


class ConvRing:
    """A short convolution's inputs [B, C, size] for the last `size` = K - 1 + REWIND_SLACK positions,
    position p in slot p % size: enough to convolve the next tokens (which see the K - 1 before them)
    after a rewind of up to REWIND_SLACK positions, in memory that does not grow with the context."""

    def __init__(self, batch: int, channels: int, kernel: int, dtype: torch.dtype, device):
        self.past = kernel - 1
        self.size = self.past + kv_cache.REWIND_SLACK
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


class NoState:
    """The state of a layer that mixes nothing across positions (Nemotron-H's MLP and MoE layers)."""

    def truncate(self, pos: int, current: int, interrupted: bool) -> bool:
        return True

    def reset(self) -> None:
        pass


class Stateless:
    """What a layer that mixes nothing across positions answers where its token mixer is asked about
    generation state."""

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> NoState:
        return NoState()

    def state_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 0

    def fixed_state_bytes(self, dtype: torch.dtype) -> int:
        return 0
