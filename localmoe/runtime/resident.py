"""All-resident experts: every routed expert on the device, packed per layer in the same row layout as
the expert cache's slots.

This is the reference the offloading runtime must reproduce token for token, and the runtime itself
when the memory plan finds room for every expert.
"""

import torch

from localmoe.kernels.reference import expert_mlp, expert_pair_outputs
from localmoe.loader import ExpertSource
from localmoe.runtime.expert_store import layout_of, packed_layer
from localmoe.runtime.trace import RoutingTrace


class ResidentExperts:
    """Per MoE layer, rows [E, numel] indexed by expert id."""

    def __init__(
        self,
        source: ExpertSource,
        device: torch.device | str,
        dtype: torch.dtype,
        trace: RoutingTrace | None = None,
        pair_outputs=expert_pair_outputs,
    ):
        self.layout = layout_of(source)
        self.blocks = source.blocks
        self.trace = trace
        self.pair_outputs = pair_outputs  # the kernel (see localmoe.kernels.pair_kernel)
        # Packed in host memory, then moved in one copy: the mapped shards are read sequentially.
        self.rows = {
            layer: packed_layer(
                source, layer, self.layout, torch.empty(block.num_experts, self.layout.numel, dtype=dtype)
            ).to(device)
            for layer, block in source.blocks.items()
        }

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        block, rows = self.blocks[layer], self.rows[layer]
        if self.trace:
            self.trace.record(layer, ids.reshape(-1).tolist(), weights.reshape(-1).tolist(), block.top_k)
        gate_up, down, biases = self.layout.gate_up(rows), self.layout.down(rows), self.layout.biases(rows)
        return expert_mlp(x, gate_up, down, weights, ids, block.act, *biases, block.weights_on_input, self.pair_outputs)
