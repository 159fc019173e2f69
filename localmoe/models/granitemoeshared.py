"""GraniteMoeShared (GraniteMoeSharedForCausalLM, e.g. ibm-research/moe-7b-1b-active-shared-experts):
GraniteMoe with a shared gated MLP beside the routed experts in every layer (none when
shared_intermediate_size is 0)."""

from dataclasses import dataclass

from localmoe.models.family import Family
from localmoe.models.granitemoe import GRANITE_ALIASES, GRANITE_EXPERTS, GraniteMoeArgs, build


@dataclass
class GraniteMoeSharedArgs(GraniteMoeArgs):
    shared_intermediate_size: int = 0

    def shared_mlp_size(self) -> int:
        return self.shared_intermediate_size


FAMILY = Family(
    architectures=("GraniteMoeSharedForCausalLM",),
    model_type="granitemoeshared",
    args=GraniteMoeSharedArgs,
    model=build,
    experts=GRANITE_EXPERTS,
    hub_aliases=GRANITE_ALIASES,
    example="ibm-research/moe-7b-1b-active-shared-experts",
)
