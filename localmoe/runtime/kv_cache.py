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


class KVCache:
    """The state of every layer plus how many positions are filled."""

    def __init__(self, layers: list, max_len: int):
        self.layers = layers
        self.max_len = max_len
        self.pos = 0
