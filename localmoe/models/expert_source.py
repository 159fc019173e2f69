"""A checkpoint's routed experts, read one expert at a time: what the runtime's host tier and slots are
filled from, in the layout the family declares."""

from collections.abc import Iterable
from functools import cached_property

from localmoe.checkpoint import Checkpoint
from localmoe.models.expert_tensors import ExpertTensors
from localmoe.models.moe import SparseMoE


class ExpertSource:
    """The routed experts of a checkpoint, read one expert at a time.

    Each MoE layer is read in the first of the family's layouts the checkpoint has for it; an expert
    comes back as roles gate and up [I, E], down [E, I] (and biases where the experts have them).
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        layouts: tuple[ExpertTensors, ...],
        blocks: list[SparseMoE],
        drafting: Iterable[int] = (),
    ):
        """`drafting`: the layers of `blocks` that are MTP layers'."""
        self.ckpt = ckpt
        self.blocks = {block.layer_idx: block for block in blocks}
        self.layouts = {layer: self._layout(layouts, block) for layer, block in self.blocks.items()}
        self.drafting = frozenset(drafting)

    @property
    def layers(self) -> list[int]:
        return list(self.blocks)

    @cached_property
    def forms(self) -> dict:
        """Each layer's stored form (None: plain, or mixed within the layer)."""
        return {i: layout.stored_form(self.ckpt, self.blocks[i]) for i, layout in self.layouts.items()}

    @cached_property
    def stored_form(self):
        """The form the model's routed experts are all stored in (a QuantSpec or StoredFormat of
        kernels/quantized.py), so the runtime can keep them so; else None (plain, or mixed forms). The MTP
        layers' do not count where there are others: stored otherwise (a bfloat16 MTP layer in an NVFP4 or
        GPTQ release), their experts are quantized into the model's form (see `kept_as_stored`)."""
        model = [form for layer, form in self.forms.items() if layer not in self.drafting]
        forms = set(model or self.forms.values())
        return forms.pop() if len(forms) == 1 else None

    def kept_as_stored(self, layer: int) -> bool:
        """Whether the layer's experts are stored in `stored_form` (else they are read decoded)."""
        return self.stored_form is not None and self.forms[layer] == self.stored_form

    def read(self, layer: int, expert: int, packed: bool = False) -> dict:
        """The expert's roles, decoded; or, `packed`, as stored (where `kept_as_stored`)."""
        layout = self.layouts[layer]
        if packed:
            return layout.read_packed(self.ckpt, self.blocks[layer], expert)
        return layout.read(self.ckpt, self.blocks[layer], expert)

    def _layout(self, layouts: tuple[ExpertTensors, ...], block: SparseMoE) -> ExpertTensors:
        """The first layout present for this layer, with every expert tensor it needs checked."""
        layout = next((layout for layout in layouts if layout.present(self.ckpt, block)), layouts[0])
        layout.check(self.ckpt, block)
        return layout
