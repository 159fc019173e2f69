"""Per-layer generation state, allocated once for the whole context of a run."""

import torch


class AttentionKV:
    """Keys and values of one attention layer: [B, H_kv, max_len, D] each."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype, device):
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new [B, H_kv, T, D] keys and values at `start`; return all of them so far."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class LatentKV:
    """Multi-head latent attention's state: the latent [B, max_len, rank] and the shared rotary key
    [B, 1, max_len, rope dim] of every token; keys and values are expanded from them when attending."""

    def __init__(self, batch: int, rank: int, rope_dim: int, max_len: int, dtype: torch.dtype, device):
        self.latent = torch.zeros(batch, max_len, rank, dtype=dtype, device=device)
        self.k_rot = torch.zeros(batch, 1, max_len, rope_dim, dtype=dtype, device=device)

    def update(self, latent: torch.Tensor, k_rot: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + latent.shape[1]
        self.latent[:, start:end] = latent
        self.k_rot[:, :, start:end] = k_rot
        return self.latent[:, :end], self.k_rot[:, :, :end]


class LinearAttentionState:
    """A linear-attention layer's state: one [B, H, D, D] matrix that sums (decayed) key-value products
    over every token so far. It cannot be rewound to an earlier position."""

    recurrent = True

    def __init__(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device):
        self.kv = torch.zeros(batch, heads, head_dim, head_dim, dtype=dtype, device=device)

    def reset(self) -> None:
        self.kv.zero_()


class DeltaNetState:
    """A Gated DeltaNet layer's state: the last `kernel - 1` inputs of its causal convolution [B, C, K-1],
    and the delta rule's [B, H, Dk, Dv] matrix, kept in float32 as it sums over every token so far.
    It cannot be rewound to an earlier position."""

    recurrent = True

    def __init__(self, batch: int, channels: int, kernel: int, heads: int, k_dim: int, v_dim: int, dtype, device):
        self.conv = torch.zeros(batch, channels, kernel - 1, dtype=dtype, device=device)
        self.matrix = torch.zeros(batch, heads, k_dim, v_dim, dtype=torch.float32, device=device)

    def reset(self) -> None:
        self.conv.zero_()
        self.matrix.zero_()


class KVCache:
    """The state of every layer plus how many positions are filled."""

    def __init__(self, layers: list, max_len: int):
        self.layers = layers
        self.max_len = max_len
        self.pos = 0
        self.writing = False  # a forward pass started and did not finish (interrupted)

    def rewind(self, pos: int) -> int:
        """Keep the first `pos` positions, for a prompt that shares them; returns the positions kept.

        Keys and values are per position, so any prefix can be kept. A recurrent state holds a sum over
        every position, so it is kept only when nothing is dropped and no forward pass was cut short;
        otherwise everything restarts.
        """
        recurrent = [state for state in self.layers if getattr(state, "recurrent", False)]
        if recurrent and (pos < self.pos or self.writing):
            for state in recurrent:
                state.reset()
            pos = 0
        self.pos, self.writing = pos, False
        return pos
