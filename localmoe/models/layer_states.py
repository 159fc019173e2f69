"""Generation states of layers other than attention (whose keys and values runtime/kv_cache.py holds):
recurrent layers, and layers with nothing to remember. Each follows the same protocol: `truncate(pos,
current, interrupted)` says whether the state can be cut back to its first `pos` positions (else the
whole cache restarts), `reset` empties it."""

import torch


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
