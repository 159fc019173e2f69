"""Quality of quantized experts against the same model's experts in the compute dtype, on one
checkpoint (by default localmoe's tiny demo model, random weights), for each bit width and group size:

  - per MoE layer, the relative error of the experts' output, ||y_q - y|| / ||y||, on the inputs the
    layer really sees (recorded from the unquantized run);
  - the KL divergence of the next-token distributions, KL(p || p_q), averaged over every position of
    a fixed set of prompts;
  - greedy-token agreement: how often the argmax at a position is the same, given the same prefix.

It writes bench/results/quant/ and regenerates docs/benchmarks.md.

    python scripts/quant_quality.py
    python scripts/quant_quality.py --checkpoint ~/models/Qwen3-30B-A3B --bits 8,4 --groups 64,128
"""

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from localmoe.bench import machine, write_benchmarks  # noqa: E402
from localmoe.demo import demo_checkpoint  # noqa: E402
from localmoe.engine import RuntimeOptions, load  # noqa: E402
from localmoe.files import write_atomic  # noqa: E402
from localmoe.loader import DTYPES  # noqa: E402
from localmoe.models.moe import Routing, moe_blocks  # noqa: E402


def recorded_inputs(engine, prompts: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple]]:
    """The logits [T, V] of each prompt, and every MoE layer call's (layer, x, routing, output) on the way."""
    calls, experts = [], engine.experts

    def record(layer, x, routing):
        out = experts(layer, x, routing)
        calls.append((layer, x.clone(), Routing(*(t.clone() for t in routing)), out.float()))
        return out

    blocks = moe_blocks(engine.model)
    for block in blocks:
        block.experts = record
    logits = [forward(engine, prompt) for prompt in prompts]
    for block in blocks:
        block.experts = experts
    return logits, calls


@torch.inference_mode()
def forward(engine, prompt: torch.Tensor) -> torch.Tensor:
    return engine.model(prompt[None], engine.model.new_cache(1, prompt.numel()), all_logits=True)[0].float()


@torch.inference_mode()
def measure(engine, prompts, reference_logits, calls) -> dict:
    per_layer: dict[int, list[float]] = {}
    for layer, x, routing, expected in calls:
        got = engine.experts(layer, x, routing).float()
        per_layer.setdefault(layer, []).append(((got - expected).norm() / expected.norm()).item())
    kl, agree, positions = 0.0, 0, 0
    for prompt, expected in zip(prompts, reference_logits, strict=True):
        got = forward(engine, prompt)
        p = expected.log_softmax(-1)
        kl += (p.exp() * (p - got.log_softmax(-1))).sum().item()
        agree += (got.argmax(-1) == expected.argmax(-1)).sum().item()
        positions += prompt.numel()
    errors = {layer: sum(values) / len(values) for layer, values in sorted(per_layer.items())}
    return {
        "expert_error_mean": sum(errors.values()) / len(errors),
        "expert_error_max": max(errors.values()),
        "expert_error_per_layer": errors,
        "kl": kl / positions,
        "agreement": agree / positions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a checkpoint folder or Hub repo id (default: the demo model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--bits", default="8,4")
    parser.add_argument("--groups", default="32,64,128")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    path = args.checkpoint or str(demo_checkpoint())
    dtype = DTYPES[args.dtype]

    reference = load(path, device=args.device, dtype=dtype)
    vocab = reference.model.model.embed_tokens.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (args.tokens,), generator=g).to(reference.device) for _ in range(args.prompts)]
    reference_logits, calls = recorded_inputs(reference, prompts)
    del reference
    rows = []
    for bits in map(int, args.bits.split(",")):
        for group in map(int, args.groups.split(",")):
            options = RuntimeOptions(expert_bits=bits, expert_group_size=group, vram_budget=None)
            engine = load(path, device=args.device, dtype=dtype, options=options)
            row = {"bits": bits, "group": group, **measure(engine, prompts, reference_logits, calls)}
            print({k: v for k, v in row.items() if k != "expert_error_per_layer"}, flush=True)
            rows.append(row)
            del engine

    now = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python scripts/quant_quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": machine(),
        "model": Path(path).name + ("" if args.checkpoint else " (localmoe's demo model: random weights)"),
        "dtype": args.dtype,
        "prompts": f"{args.prompts} random prompts of {args.tokens} tokens",
        "rows": rows,
    }
    folder = args.out / "quant"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{now:%Y%m%d-%H%M}-{Path(path).name}.json"
    write_atomic(out, json.dumps(result, indent=2))
    write_benchmarks(args.out, args.docs)
    print(f"wrote {out} and {args.docs}")


if __name__ == "__main__":
    main()
