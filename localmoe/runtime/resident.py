"""All-resident experts: every routed expert on the device, stacked per layer.

This is the reference the offloading runtime must reproduce token for token, and the runtime itself
when the memory plan finds room for every expert.
"""

import torch

from localmoe.kernels.reference import expert_mlp
from localmoe.loader import ExpertSource
from localmoe.runtime.trace import RoutingTrace


class ResidentExperts:
    """Per MoE layer, gate_up [E, 2I, H] (gate rows first) and down [E, H, I], indexed by expert id."""

    def __init__(
        self, source: ExpertSource, device: torch.device | str, dtype: torch.dtype, trace: RoutingTrace | None = None
    ):
        self.gate_up: dict[int, torch.Tensor] = {}
        self.down: dict[int, torch.Tensor] = {}
        self.blocks = source.blocks
        self.trace = trace
        for layer, block in source.blocks.items():
            # Stacked in host memory, then moved in one copy: the mapped shards are read sequentially.
            inter, hidden = block.intermediate_size, block.hidden_size
            gate_up = torch.empty(block.num_experts, 2 * inter, hidden, dtype=dtype)
            down = torch.empty(block.num_experts, hidden, inter, dtype=dtype)
            for expert in range(block.num_experts):
                roles = source.read(layer, expert)
                gate_up[expert, :inter].copy_(roles["gate"])
                gate_up[expert, inter:].copy_(roles["up"])
                down[expert].copy_(roles["down"])
            self.gate_up[layer], self.down[layer] = gate_up.to(device), down.to(device)

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        block = self.blocks[layer]
        if self.trace:
            self.trace.record(layer, ids.reshape(-1).tolist(), weights.reshape(-1).tolist(), block.top_k)
        return expert_mlp(x, self.gate_up[layer], self.down[layer], weights, ids, block.act)
