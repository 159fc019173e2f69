"""Expert kernel benchmark: one MoE layer's experts computed three ways, in one run, on random weights
of real models' shapes:

  1. the fused Triton kernels (CUDA only);
  2. localmoe's PyTorch reference (one expert at a time, the pair outputs summed once);
  3. a per-expert loop as transformers computes it (gather, three projections, weighted index_add).

It reports milliseconds per call and, for the Triton kernels, the bytes of expert weights read per
second as a share of the device's measured copy bandwidth, then writes bench/results/kernels/ and
regenerates docs/benchmarks.md.

    python scripts/bench_kernels.py                      # CUDA if present, every shape, T = 1, 8, 512
    python scripts/bench_kernels.py --device cpu --tokens 1,8 --shapes qwen3-30b-a3b
"""

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from localmoe.bench import machine, measure_bandwidth, write_benchmarks  # noqa: E402
from localmoe.files import write_atomic  # noqa: E402
from localmoe.kernels.reference import combine_pairs, expert_pair_outputs  # noqa: E402
from localmoe.loader import DTYPES  # noqa: E402
from localmoe.models.moe import GatedActivation  # noqa: E402

# name: (hidden, expert intermediate, experts, top-k)
SHAPES = {
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "deepseek-v2-lite": (2048, 1408, 64, 6),
}


def transformers_loop(x, gate_up, down, weights, ids):
    """What transformers' eager MoE blocks do: per expert hit, gather its tokens, run it, index_add."""
    out = torch.zeros_like(x)
    for expert in ids.unique().tolist():
        token, choice = (ids == expert).nonzero(as_tuple=True)
        gate, up = F.linear(x[token], gate_up[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[expert]) * weights[token, choice, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def timed_ms(run, device: torch.device, repeats: int) -> float:
    run()  # warm-up: compilation, allocation
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def bench_shape(name, tokens, device, dtype, repeats, triton_kernel):
    hidden, inter, experts, top_k = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=g) / 32).to(device=device, dtype=dtype)
    down = (torch.randn(experts, hidden, inter, generator=g) / 32).to(device=device, dtype=dtype)
    x = torch.randn(tokens, hidden, generator=g).to(device=device, dtype=dtype)
    scores = torch.randn(tokens, experts, generator=g).softmax(-1)
    weights, ids = (t.to(device) for t in scores.topk(top_k, dim=-1))
    act = GatedActivation()
    pairs = x.new_zeros(tokens * top_k, hidden)

    def run(kernel):
        return lambda: combine_pairs((kernel(pairs, x, gate_up, down, ids, act), pairs)[1], weights)

    distinct = ids.unique().numel()
    expert_bytes = 3 * hidden * inter * dtype.itemsize
    row = {
        "shape": f"{name} (H {hidden}, I {inter}, {experts} experts, top-{top_k})",
        "tokens": tokens,
        "reference_ms": timed_ms(run(expert_pair_outputs), device, repeats),
        "loop_ms": timed_ms(lambda: transformers_loop(x, gate_up, down, weights, ids), device, repeats),
        "triton_ms": None,
        "triton_bandwidth": None,
    }
    if triton_kernel is not None:
        row["triton_ms"] = timed_ms(run(triton_kernel), device, repeats)
        row["triton_bandwidth"] = distinct * expert_bytes / (row["triton_ms"] / 1000)
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--tokens", default="1,8,512", help="comma-separated token counts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    triton_kernel, note = None, "The Triton column is empty: it was not run here (no CUDA device)."
    if device.type == "cuda":
        from localmoe.kernels.triton_experts import triton_pair_outputs

        triton_kernel, note = triton_pair_outputs, ""
    bandwidth = measure_bandwidth(device)
    copy_rate = bandwidth.get("device_memory") or bandwidth["ram"]
    rows = [
        bench_shape(name, int(tokens), device, dtype, args.repeats, triton_kernel)
        for name in args.shapes.split(",")
        for tokens in args.tokens.split(",")
    ]
    now = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python scripts/bench_kernels.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": machine(),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": args.dtype,
        "bandwidth": copy_rate,
        "note": note,
        "rows": rows,
    }
    folder = args.out / "kernels"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{now:%Y%m%d-%H%M}-{device.type}.json"
    write_atomic(out, json.dumps(result, indent=2))
    write_benchmarks(args.out, args.docs)
    print(f"wrote {out} and {args.docs}")


if __name__ == "__main__":
    main()
