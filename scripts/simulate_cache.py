"""Replay routing traces through the expert cache at several slot counts and policies.

    python scripts/simulate_cache.py ../shared/traces/qwen15moe_decode.npz --plot bench/results/sim.png
    python scripts/simulate_cache.py run.jsonl --prefetch      # a trace from `localmoe generate --trace`

Prints, per policy and slot count, the hit rate, its ratio to Belady's (the offline optimum for a
cache that admits every miss), the static oracle (the most used experts pinned), and for traces that
recorded predictions, prefetch precision and recall. Bytes per token are in experts (x one expert's
bytes for a real model).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from localmoe.errors import LocalMoEError  # noqa: E402
from localmoe.simulate import Trace, load_trace, replay, static_oracle_hit_rate  # noqa: E402


def slot_counts(trace: Trace) -> list[int]:
    total = len(trace.layers) * trace.num_experts
    shares = (0.05, 0.1, 0.25, 0.5, 0.75)
    return sorted({trace.top_k, *(max(trace.top_k, round(total * share)) for share in shares), total})


def simulate(trace: Trace, slots: list[int], policies: list[str], prefetch: bool, pin_hot: int) -> list[dict]:
    rows = []
    for count in slots:
        best = replay(trace, count, "belady").hit_rate
        oracle = static_oracle_hit_rate(trace, count)
        for policy in policies:
            result = replay(trace, count, policy, prefetch=prefetch, pin_hot=min(pin_hot, count - trace.top_k))
            rows.append(
                {
                    "slots": count,
                    "policy": policy,
                    "hit_rate": result.hit_rate,
                    "of_belady": result.hit_rate / best if best else 0.0,
                    "belady": best,
                    "static_oracle": oracle,
                    "experts_copied_per_token": result.bytes_per_token,
                    "prefetch_precision": result.prefetch_precision if prefetch else None,
                    "prefetch_recall": result.prefetch_recall if prefetch else None,
                }
            )
    return rows


def print_table(name: str, trace: Trace, rows: list[dict]) -> None:
    total = len(trace.layers) * trace.num_experts
    print(
        f"\n{name}: {len(trace.requests)} requests, {trace.tokens} tokens, {len(trace.layers)} MoE layers x "
        f"{trace.num_experts} experts, top-{trace.top_k}"
    )
    header = (
        f"{'slots':>6} {'share':>6} {'policy':>7} {'hit rate':>9} {'of Belady':>10} {'Belady':>7} {'static':>7} "
        f"{'copied/token':>13}"
    )
    prefetching = rows and rows[0]["prefetch_precision"] is not None
    print(header + (f" {'precision':>10} {'recall':>7}" if prefetching else ""))
    for row in rows:
        line = (
            f"{row['slots']:>6} {row['slots'] / total:>6.0%} {row['policy']:>7} {row['hit_rate']:>9.3f} "
            f"{row['of_belady']:>10.2f} {row['belady']:>7.3f} {row['static_oracle']:>7.3f} "
            f"{row['experts_copied_per_token']:>13.2f}"
        )
        if prefetching:
            line += f" {row['prefetch_precision']:>10.2f} {row['prefetch_recall']:>7.2f}"
        print(line)


def plot(results: dict[str, tuple[Trace, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, (trace, rows) in results.items():
        total = len(trace.layers) * trace.num_experts
        for policy in dict.fromkeys(row["policy"] for row in rows):
            points = [(row["slots"] / total, row["hit_rate"]) for row in rows if row["policy"] == policy]
            axis.plot(*zip(*points, strict=True), marker="o", label=f"{Path(name).stem}: {policy}")
        belady = sorted({(row["slots"] / total, row["belady"]) for row in rows})
        axis.plot(*zip(*belady, strict=True), linestyle="--", color="black", label=f"{Path(name).stem}: Belady")
    axis.set_xlabel("experts cached (share of all)")
    axis.set_ylabel("hit rate (share of expert uses)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"\nplot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", nargs="+", type=Path)
    parser.add_argument("--slots", help="comma-separated slot counts (default: from top-k to all experts)")
    parser.add_argument("--policies", default="lru,lfu", help="comma-separated, of lru, lfu")
    parser.add_argument("--prefetch", action="store_true", help="prefetch the predictions the trace recorded")
    parser.add_argument("--pin-hot", type=int, default=0, help="pin the N hottest experts of the first request")
    parser.add_argument("--plot", type=Path, help="write hit rate against slots to this PNG")
    args = parser.parse_args()
    results = {}
    try:
        for path in args.traces:
            trace = load_trace(path)
            slots = [int(s) for s in args.slots.split(",")] if args.slots else slot_counts(trace)
            rows = simulate(trace, slots, args.policies.split(","), args.prefetch, args.pin_hot)
            print_table(str(path), trace, rows)
            results[str(path)] = (trace, rows)
    except LocalMoEError as error:
        sys.exit(f"simulate_cache: {error}")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
