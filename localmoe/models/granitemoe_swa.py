"""GraniteMoeSWA (GraniteMoeSWAForCausalLM, e.g. ibm-granite/granite-swash-3b-a600m): GraniteMoeShared
with sliding-window layers where `layer_types` says (by default all but every fourth), a learned
attention sink per head on every layer, and a rotary base per layer (`layer_rope_theta`; 0: no position
embeddings)."""

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

from localmoe.models.family import Family
from localmoe.models.granitemoe import GRANITE_ALIASES, GRANITE_EXPERTS, build
from localmoe.models.granitemoeshared import GraniteMoeSharedArgs


@dataclass
class GraniteMoeSWAArgs(GraniteMoeSharedArgs):
    sliding_window: int | None = 128
    layer_types: list[str] | None = None
    layer_rope_theta: list[float] | None = None

    def _contradictions(self) -> Iterator[str]:
        yield from super()._contradictions()
        for name in ("layer_types", "layer_rope_theta"):
            listed = getattr(self, name)
            if listed is not None and len(listed) != self.num_hidden_layers:
                yield f"lists {len(listed)} {name} for {self.num_hidden_layers} layers"

    def window(self, i: int) -> int | None:
        kind = self.layer_types[i] if self.layer_types else ("full_attention" if i % 4 == 0 else "sliding_attention")
        return self.sliding_window if kind == "sliding_attention" else None

    def rope_theta(self, i: int) -> float:
        return self.rope["rope_theta"] if self.layer_rope_theta is None else self.layer_rope_theta[i]


FAMILY = Family(
    architectures=("GraniteMoeSWAForCausalLM",),
    model_type="granitemoe_swa",
    args=GraniteMoeSWAArgs,
    model=partial(build, sinks=True),
    experts=GRANITE_EXPERTS,
    hub_aliases=GRANITE_ALIASES,
    example="ibm-granite/granite-swash-3b-a600m",
)
