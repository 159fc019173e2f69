"""The dense products of a CPU decode step: the CPU library's `linear` (cpu_experts.cpp's lm_dense) beside
F.linear (oneDNN), as the RAM bandwidth each reaches reading the weights of a Qwen3-30B-like layer's
attention (q/k/v fused, 2048 -> 5120, and o, 4096 -> 2048), six layers' worth so that no cache holds them,
for 1, 2, 4 and 8 rows of bfloat16 activations; rounds interleaved, each figure the median of the rounds
with their range. The RAM read rate (a float32 sum over the same bytes) is the floor's. It prints a table
and writes bench/results/cpu-dense/<date>.json.

    python scripts/bench_cpu_dense.py [--threads 2] [--rounds 7]
"""

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from localmoe.bench import machine  # noqa: E402
from localmoe.files import write_atomic  # noqa: E402
from localmoe.kernels import cpu_experts as cpu  # noqa: E402

SHAPES = [(5120, 2048), (2048, 4096)] * 6  # (out, in) of q/k/v fused and o, six layers
ROWS = (1, 2, 4, 8)


def seconds(run, repeats: int = 10) -> float:
    run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    available, isa = cpu.cpu_kernel()
    if not available:
        sys.exit(f"the CPU library could not be built: {isa}")
    cpu.DENSE_ROWS = max(ROWS)  # every row count through the library, whatever `linear` would choose
    weights = [torch.randn(n, k).bfloat16() for n, k in SHAPES]
    size = sum(w.numel() * w.element_size() for w in weights)
    floats = torch.randn(size // 4)
    engines = {"library": cpu.linear, "F.linear": F.linear}
    rates: dict[str, list[float]] = {"RAM read": []} | {f"{e}, {m} row(s)": [] for m in ROWS for e in engines}
    for _ in range(args.rounds):
        rates["RAM read"].append(size / seconds(floats.sum))
        for m in ROWS:
            inputs = {k: torch.randn(m, k).bfloat16() for k in {k for _, k in SHAPES}}
            for name, product in engines.items():
                rate = size / seconds(lambda p=product, x=inputs: [p(x[w.shape[1]], w) for w in weights])
                rates[f"{name}, {m} row(s)"].append(rate)
    table = {name: {"median": statistics.median(r), "min": min(r), "max": max(r)} for name, r in rates.items()}
    print(f"{args.threads} threads, {isa}, {size / 1e6:.0f} MB of weights, {args.rounds} rounds: GB/s median (range)")
    for name, r in table.items():
        print(f"  {name:24} {r['median'] / 1e9:5.1f} ({r['min'] / 1e9:.1f}-{r['max'] / 1e9:.1f})")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    out = Path(__file__).resolve().parents[1] / "bench" / "results" / "cpu-dense" / f"{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), "threads": args.threads, "isa": isa, "bytes": size, "bytes_per_second": table}
    write_atomic(out, json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
