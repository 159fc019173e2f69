"""CPU prefill rate by kernel path: the same prompt prefilled by localmoe built for different instruction
sets (LOCALMOE_CPU_ISA), or from different checkouts, each variant loaded once in its own process and
the rounds interleaved (every variant once per round), so that the load of a shared machine falls on all
of them alike. On a CPU with AMX this compares the tiles (avx512bf16+amx) with the paths of CPUs without
them (avx512bf16: vdpbf16ps; avx512, avx2: float32 FMA):

    python scripts/bench_cpu_prefill.py --checkpoint ~/.cache/localmoe/bench-cpu/mixtral-2layers \\
        --bits 4 --variant tiles=avx512bf16+amx --variant vectors=avx512bf16 --variant fma=avx2

A variant is LABEL=ISA, or LABEL=ISA@CHECKOUT for another checkout's localmoe; below AMX, torch's oneDNN
is held to the same instruction set (ONEDNN_MAX_CPU_ISA). The checkpoints are
scripts/bench_cpu.py's (--layers 2). Prints each variant's median prefill tok/s with its range and writes
them to --out (JSON). It prints "measuring" when every variant is loaded, before the timed rounds.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GROUP = 32  # quantization group, as scripts/bench_cpu.py (Q8_0, Q4_0)
# torch's own oneDNN products (attention, and the reference's products where the kernels leave an expert)
# held to the same instruction set, so that a variant runs as on a CPU with only that one (oneDNN uses AMX
# tiles wherever the CPU has them otherwise)
ONEDNN_ISAS = {"avx512bf16": "AVX512_CORE_BF16", "avx512": "AVX512_CORE", "avx2": "AVX2"}


def child(args) -> None:
    """One variant: load, prefill once (warm-up), then one timed prefill per line read."""
    import torch

    from localmoe.engine import RuntimeOptions, load

    options = RuntimeOptions(expert_bits=args.bits, expert_group_size=GROUP, threads=args.threads, profile=None)
    engine = load(str(args.checkpoint), device="cpu", dtype=torch.bfloat16, options=options)
    prompt = torch.randint(2, 300, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    list(engine.generate_ids(prompt, 1))
    print(json.dumps({"kernels": engine.kernels}), flush=True)
    for _ in sys.stdin:
        list(engine.generate_ids(prompt, 1))
        print(json.dumps({"prefill": engine.stats.prefill_rate}), flush=True)


def start(variant: str, args) -> tuple[str, subprocess.Popen]:
    label, _, spec = variant.partition("=")
    isa, _, checkout = spec.partition("@")
    env = {**os.environ, "LOCALMOE_CPU_ISA": isa, "PYTHONPATH": checkout or str(ROOT)}
    if isa in ONEDNN_ISAS:
        env["ONEDNN_MAX_CPU_ISA"] = ONEDNN_ISAS[isa]
    command = [sys.executable, __file__, "--child", "--checkpoint", str(args.checkpoint), "--bits", str(args.bits)]
    command += ["--prompt", str(args.prompt), "--threads", str(args.threads)]
    process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return label, process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--bits", type=int, default=16, help="expert bits: 16, 8 or 4 (groups of 32)")
    parser.add_argument("--variant", action="append", default=[], help="LABEL=ISA or LABEL=ISA@CHECKOUT")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="the JSON written  [default: none]")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if not args.variant:
        parser.error("name at least one --variant")
    variants = [start(v, args) for v in args.variant]
    kernels = {label: json.loads(p.stdout.readline())["kernels"] for label, p in variants}
    print("measuring", file=sys.stderr, flush=True)
    rates: dict[str, list[float]] = {label: [] for label, _ in variants}
    for _ in range(args.rounds):
        for label, process in variants:
            process.stdin.write("go\n")
            process.stdin.flush()
            rates[label].append(json.loads(process.stdout.readline())["prefill"])
    for _, process in variants:
        process.stdin.close()
        process.wait()
    result = {
        "checkpoint": str(args.checkpoint),
        "bits": args.bits,
        "prompt": args.prompt,
        "threads": args.threads,
        "variants": {
            label: {"kernels": kernels[label], "median": statistics.median(r), "min": min(r), "max": max(r)}
            for label, r in rates.items()
        },
    }
    for label, v in result["variants"].items():
        print(f"{label:>12}: {v['median']:8.1f} tok/s ({v['min']:.1f}-{v['max']:.1f})  {v['kernels']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
