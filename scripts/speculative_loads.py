"""What a check of N drafted tokens in one forward pass does to the expert cache, with drafts forced: all
kept (the plain continuation, known beforehand: the best any drafter can do) or all rejected (each one
token off: the worst). Random weights, so no drafter's real acceptance is measured here; only the
mechanism: experts loaded from outside the slots per decoded token, and the forward passes per token.

A Qwen3-30B-like routing (128 experts, top-8) in 12 layers at a width where compute is nothing, written
with random weights once, offloaded on the CPU with 192 slots (an eighth of the experts), greedy, 48 new
tokens after a 32-token prompt. Timings on a shared 2-core machine are noise and are not the point; the
counts are deterministic.

    python scripts/speculative_loads.py      # writes bench/results/speculative/<date>.json and prints a table
"""

import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

import localmoe
from localmoe.bench import QWEN3_ROUTING_TINY
from localmoe.demo import write_random_checkpoint
from localmoe.files import write_atomic
from localmoe.runtime.speculative import Drafter

CONFIG = {**QWEN3_ROUTING_TINY, "num_hidden_layers": 12, "torch_dtype": "float32"}
SLOTS, PROMPT, NEW = 192, list(range(32)), 48


class Forced(Drafter):
    """Drafts the known continuation, each token right or (wrong) one off."""

    def __init__(self, continuation: list[int], wrong: bool):
        self.continuation, self.wrong = continuation, wrong

    def propose(self, tokens, limit):
        right = self.continuation[len(tokens) - len(PROMPT) :][:limit]
        return [(t + 1) % CONFIG["vocab_size"] if self.wrong else t for t in right]


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        write_random_checkpoint(Path(folder), CONFIG, shard_bytes=1 << 24)
        engine = localmoe.load(folder, device="cpu", expert_slots=SLOTS, miss_policy="direct")
        rows = []

        def run(name: str, drafter: Drafter | None, draft_tokens: int | None) -> list[int]:
            engine.reconfigure(cold=True)
            tokens = list(engine.generate_ids(PROMPT, NEW, drafter=drafter, draft_tokens=draft_tokens))
            stats, spec = engine.stats, engine.stats.speculation
            rows.append(
                {
                    "run": name,
                    "experts_loaded_per_token": stats.loaded_per_token,
                    "checks": None if spec is None else spec.verifications,
                    "acceptance": None if spec is None else spec.acceptance_rate,
                    "decode_tokens_per_s_noisy": stats.decode_rate,
                }
            )
            return tokens

        plain = run("plain", None, None)
        for n in (1, 2, 4, 8):
            assert run(f"all kept, {n} drafted", Forced(plain, wrong=False), n) == plain
        assert run("all rejected, 4 drafted", Forced(plain, wrong=True), 4) == plain
    result = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python scripts/speculative_loads.py",
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "config": {"layers": CONFIG["num_hidden_layers"], "experts": 128, "top_k": 8, "slots": SLOTS},
        "rows": rows,
    }
    out = Path("bench/results/speculative")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M}.json", json.dumps(result, indent=2))
    for row in rows:
        print(json.dumps(row), file=sys.stdout)


if __name__ == "__main__":
    main()
