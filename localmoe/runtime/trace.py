"""`--trace FILE`: the routing of every token at every MoE layer, as JSON lines for offline analysis."""

import json
from pathlib import Path

from localmoe.errors import LocalMoEError


class RoutingTrace:
    """Rows {"token", "layer", "experts", "weights"}; `token` is the position in the sequence. With
    prefetch on, rows also have "predicted": the experts predicted for the next MoE layer; with a
    cache policy that weighs the router, "probabilities": the router's distribution over all experts."""

    def __init__(self, path: Path, first_layer: int):
        self.path = path
        self.first_layer = first_layer
        self._rows: list[str] = []
        self._seen = 0  # tokens before the current forward pass
        self._start = 0
        try:
            path.write_text("")
        except OSError as error:
            raise LocalMoEError(f"cannot write the routing trace to {path}: {error.strerror or error}") from None

    def record(
        self,
        layer: int,
        experts: list[int],
        weights: list[float],
        top_k: int,
        predicted: list[int] | None = None,
        probabilities: list[float] | None = None,
    ) -> None:
        """One layer's routing for the tokens of the current forward pass, flattened [T * k] (and the
        next layer's predicted experts, flattened [T * count], and the router's distribution, [T * E])."""
        tokens = len(experts) // top_k
        if layer == self.first_layer:
            self._start, self._seen = self._seen, self._seen + tokens
        for t in range(tokens):
            row = {"token": self._start + t, "layer": layer}
            row.update(experts=experts[t * top_k : (t + 1) * top_k], weights=weights[t * top_k : (t + 1) * top_k])
            if predicted is not None:
                count = len(predicted) // tokens
                row["predicted"] = predicted[t * count : (t + 1) * count]
            if probabilities is not None:
                count = len(probabilities) // tokens
                row["probabilities"] = probabilities[t * count : (t + 1) * count]
            self._rows.append(json.dumps(row))

    def flush(self) -> None:
        with self.path.open("a") as file:
            file.writelines(row + "\n" for row in self._rows)
        self._rows.clear()
