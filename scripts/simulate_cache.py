"""Replay routing traces through the expert cache at several slot counts, policies, pools and starts.

    python scripts/simulate_cache.py ../shared/traces/qwen15moe_decode.npz
    python scripts/simulate_cache.py run.jsonl --prefetch --no-write    # a trace from `localmoe generate --trace`

Per slot count it prints the offline references: Belady's optimum (a miss may be left uncached and
what to keep is chosen once each token is over, as the direct miss policy does; it bounds every
policy), Belady restricted to admitting every miss before use, and the static oracle (the most
used experts pinned from the start). Then per configuration: the hit rate, its ratio to both Belady
figures, experts copied and experts computed on the CPU per token (in experts: x one expert's bytes
for a real model), and for traces that recorded predictions, prefetch precision and recall.

Configurations: each policy with one pool shared by all layers and with a quota per layer, every miss
copied; the score policy with bypass admission; each policy with misses read where they lie and
admitted a token later when the policy ranks them above their victim (the direct miss policy, the
default); and each request as a run of its own from an empty cache, without and with the routing
profile of the other requests (what `--profile` gives a new run). `--decays` also
sweeps the score policy's decay at one slot count. Unless --no-write, results go to
bench/results/cache/ and docs/benchmarks.md is regenerated.
"""

import argparse
import json
import platform
import shlex
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from localmoe.bench import write_benchmarks  # noqa: E402
from localmoe.errors import LocalMoEError  # noqa: E402
from localmoe.files import write_atomic  # noqa: E402
from localmoe.runtime.expert_cache import Score  # noqa: E402
from localmoe.simulate import Trace, fresh_runs, load_trace, replay, static_oracle_hit_rate  # noqa: E402

# (policy, shared pool, miss policy, start): start is "continuing" (one cache through the whole trace),
# "fresh" (each request a new run) or "profile" (a new run from the others' profile)
CONFIGURATIONS = [
    ("lru", True, "copy", "continuing"),
    ("lru", False, "copy", "continuing"),
    ("lfu", True, "copy", "continuing"),
    ("lfu", False, "copy", "continuing"),
    ("score", True, "copy", "continuing"),
    ("score", False, "copy", "continuing"),
    ("score", True, "bypass", "continuing"),
    ("score", False, "bypass", "continuing"),
    ("lru", False, "direct", "continuing"),
    ("lfu", False, "direct", "continuing"),
    ("score", True, "direct", "continuing"),
    ("score", False, "direct", "continuing"),
    ("score", False, "copy", "fresh"),
    ("score", False, "direct", "fresh"),
    ("lru", False, "copy", "profile"),
    ("lfu", False, "copy", "profile"),
    ("score", False, "copy", "profile"),
    ("score", False, "direct", "profile"),
]


def slot_counts(trace: Trace, shares: list[float]) -> list[int]:
    total = len(trace.layers) * trace.num_experts
    return sorted({max(trace.top_k * len(trace.layers), round(total * share)) for share in shares})


def references(trace: Trace, slots: int) -> dict:
    return {
        "slots": slots,
        "belady": replay(trace, slots, "belady", shared=True, miss="bypass").hit_rate,
        "belady_admit_all": replay(trace, slots, "belady", shared=True).hit_rate,
        "static_oracle": static_oracle_hit_rate(trace, slots),
    }


def measure(trace: Trace, slots: int, policy, shared: bool, miss: str, start: str, prefetch: bool, pin_hot: int):
    options = {"shared": shared, "miss": miss, "prefetch": prefetch and miss != "direct", "pin_hot": pin_hot}
    if start == "continuing":
        return replay(trace, slots, policy, **options)
    return fresh_runs(trace, slots, policy, start == "profile", **options)


def row(label: str, shared: bool, start: str, result, bounds: dict, prefetch: bool) -> dict:
    counters = result.counters
    return {
        "policy": label,
        "in_place_per_token": counters.direct / result.tokens,
        "pool": "shared" if shared else "per layer",
        "start": start,
        "hit_rate": result.hit_rate,
        "of_belady": result.hit_rate / bounds["belady"] if bounds["belady"] else 0.0,
        "of_belady_admit_all": result.hit_rate / bounds["belady_admit_all"] if bounds["belady_admit_all"] else 0.0,
        "copied_per_token": result.bytes_per_token,
        "on_cpu_per_token": counters.on_cpu / result.tokens,
        "prefetch_precision": result.prefetch_precision if prefetch else None,
        "prefetch_recall": result.prefetch_recall if prefetch else None,
    }


def simulate(trace: Trace, slots: list[int], prefetch: bool, pin_hot: int) -> list[dict]:
    sizes = []
    for count in slots:
        bounds = references(trace, count)
        pins = min(pin_hot, count - trace.top_k * len(trace.layers))
        bounds["rows"] = [
            row(
                policy if miss == "copy" else f"{policy}, {miss}",
                shared,
                start,
                measure(trace, count, policy, shared, miss, start, prefetch, pins),
                bounds,
                prefetch and miss != "direct",
            )
            for policy, shared, miss, start in CONFIGURATIONS
        ]
        sizes.append(bounds)
    return sizes


def decay_sweep(trace: Trace, slots: int, decays: list[float]) -> list[dict]:
    """The score policy's hit rate per decay, per-layer pool, continuing and from a profile."""
    return [
        {
            "decay": decay,
            "continuing": replay(trace, slots, partial(Score, decay=decay)).hit_rate,
            "profile": fresh_runs(trace, slots, partial(Score, decay=decay), True).hit_rate,
        }
        for decay in decays
    ]


def print_tables(name: str, trace: Trace, sizes: list[dict], sweep: list[dict], sweep_slots: int) -> None:
    total = len(trace.layers) * trace.num_experts
    print(
        f"\n{name}: {len(trace.requests)} requests, {trace.tokens} tokens, {len(trace.layers)} MoE layers x "
        f"{trace.num_experts} experts, top-{trace.top_k}"
    )
    for size in sizes:
        print(
            f"\n{size['slots']} slots ({size['slots'] / total:.0%}): Belady {size['belady']:.3f}, Belady admitting "
            f"every miss {size['belady_admit_all']:.3f}, static oracle {size['static_oracle']:.3f}"
        )
        print(
            f"{'policy':>14} {'pool':>9} {'start':>10} {'hit rate':>9} {'of Belady':>10} {'of admit-all':>13} "
            f"{'copied/token':>13} {'CPU/token':>10} {'in place/token':>15}"
        )
        for r in size["rows"]:
            line = (
                f"{r['policy']:>14} {r['pool']:>9} {r['start']:>10} {r['hit_rate']:>9.3f} {r['of_belady']:>10.2f} "
                f"{r['of_belady_admit_all']:>13.2f} {r['copied_per_token']:>13.2f} {r['on_cpu_per_token']:>10.2f} "
                f"{r['in_place_per_token']:>15.2f}"
            )
            if r["prefetch_precision"] is not None:
                line += f"  prefetch precision {r['prefetch_precision']:.2f} recall {r['prefetch_recall']:.2f}"
            print(line)
    if sweep:
        print(f"\nscore policy by decay, {sweep_slots} slots, per-layer pool:")
        for r in sweep:
            print(f"  decay {r['decay']:<5} continuing {r['continuing']:.3f}  from a profile {r['profile']:.3f}")


def plot(results: dict[str, tuple[Trace, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, (trace, sizes) in results.items():
        total = len(trace.layers) * trace.num_experts
        shares = [size["slots"] / total for size in sizes]
        for i, (policy, shared, miss, start) in enumerate(CONFIGURATIONS):
            pool = "shared" if shared else "per layer"
            points = [size["rows"][i]["hit_rate"] for size in sizes]
            axis.plot(shares, points, marker="o", label=f"{Path(name).stem}: {policy}, {miss}, {pool}, {start}")
        axis.plot(shares, [size["belady"] for size in sizes], linestyle="--", color="black", label="Belady")
    axis.set_xlabel("experts cached (share of all)")
    axis.set_ylabel("hit rate (share of expert uses)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=6)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"\nplot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", nargs="+", type=Path)
    parser.add_argument("--shares", default="0.1,0.25,0.5", help="slot counts as shares of all experts")
    parser.add_argument("--slots", help="comma-separated slot counts (instead of --shares)")
    parser.add_argument("--decays", default="0.8,0.9,0.95,0.98,0.99,1.0", help="score decays to sweep ('' for none)")
    parser.add_argument("--prefetch", action="store_true", help="prefetch the predictions the trace recorded")
    parser.add_argument("--pin-hot", type=int, default=0, help="pin the N hottest experts of the first request")
    parser.add_argument("--plot", type=Path, help="write hit rate against slots to this PNG")
    parser.add_argument("--no-write", action="store_true", help="print only: no result file, docs untouched")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    results = {}
    try:
        for path in args.traces:
            trace = load_trace(path)
            shares = [float(s) for s in args.shares.split(",")]
            slots = [int(s) for s in args.slots.split(",")] if args.slots else slot_counts(trace, shares)
            sizes = simulate(trace, slots, args.prefetch, args.pin_hot)
            sweep_slots = slot_counts(trace, [0.25])[0]
            sweep = decay_sweep(trace, sweep_slots, [float(d) for d in args.decays.split(",") if d])
            print_tables(str(path), trace, sizes, sweep, sweep_slots)
            results[str(path)] = (trace, sizes)
            if not args.no_write:
                write_result(args.out / "cache", path, trace, sizes, sweep, sweep_slots)
    except LocalMoEError as error:
        sys.exit(f"simulate_cache: {error}")
    if not args.no_write:
        write_benchmarks(args.out, args.docs)
        print(f"\nresults in {args.out / 'cache'}; {args.docs} regenerated")
    if args.plot:
        plot(results, args.plot)


def write_result(folder: Path, path: Path, trace: Trace, sizes: list[dict], sweep: list[dict], sweep_slots: int):
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result = {
        "date": date,
        "trace": path.name,
        "command": "python scripts/simulate_cache.py " + shlex.join(sys.argv[1:]),
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
        "requests": len(trace.requests),
        "tokens": trace.tokens,
        "layers": len(trace.layers),
        "experts": trace.num_experts,
        "top_k": trace.top_k,
        "sizes": sizes,
        "decay_sweep": {"slots": sweep_slots, "rows": sweep},
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(
        folder / f"{time.strftime('%Y%m%d-%H%M', time.gmtime())}-{path.stem}.json", json.dumps(result, indent=1)
    )


if __name__ == "__main__":
    main()
