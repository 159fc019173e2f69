"""A checkpoint's routed experts, read one expert at a time: what the runtime's host tier and slots are
filled from, in the layout the family declares."""

import torch

from localmoe.checkpoint import Checkpoint
from localmoe.models.expert_tensors import ExpertTensors, Mxfp4, PerExpert
from localmoe.models.moe import SparseMoE


class ExpertSource:
    """The routed experts of a checkpoint, read one expert at a time.

    Each MoE layer is read in the first of the family's layouts the checkpoint has for it; an expert
    comes back as roles gate and up [I, E], down [E, I] (and biases where the experts have them).
    """

    def __init__(self, ckpt: Checkpoint, layouts: tuple[ExpertTensors, ...], blocks: list[SparseMoE]):
        self.ckpt = ckpt
        self.blocks = {block.layer_idx: block for block in blocks}
        self.layouts = {layer: self._layout(layouts, block) for layer, block in self.blocks.items()}

    @property
    def layers(self) -> list[int]:
        return list(self.blocks)

    @property
    def all_mxfp4(self) -> bool:
        return all(isinstance(layout, Mxfp4) for layout in self.layouts.values())

    @property
    def fp8_block(self) -> int | None:
        """The block size where every expert is stored one tensor per role in block-scaled FP8 with square
        blocks that tile its matrices, so the runtime can keep it so; else None."""
        block = self.ckpt.fp8_block
        per_expert = all(isinstance(layout, PerExpert) for layout in self.layouts.values())
        if block is None or block[0] != block[1] or not per_expert:
            return None
        first = next(iter(self.blocks.values()))
        if first.hidden_size % block[0] or first.intermediate_size % block[0] or first.expert_bias or not first.gated:
            return None
        gate = next(iter(self.layouts.values())).names["gate"].format(layer=first.layer_idx, expert=0)
        return block[0] if self.ckpt.info(gate).dtype == torch.float8_e4m3fn else None

    def read(self, layer: int, expert: int, packed: bool = False) -> dict[str, torch.Tensor]:
        """The expert's roles, decoded; or, `packed`, as stored (MXFP4 checkpoints only)."""
        layout = self.layouts[layer]
        if packed:
            return layout.read_packed(self.ckpt, self.blocks[layer], expert)
        return layout.read(self.ckpt, self.blocks[layer], expert)

    def _layout(self, layouts: tuple[ExpertTensors, ...], block: SparseMoE) -> ExpertTensors:
        """The first layout present for this layer, with every expert tensor it needs checked."""
        layout = next((layout for layout in layouts if layout.present(self.ckpt, block)), layouts[0])
        layout.check(self.ckpt, block)
        return layout
