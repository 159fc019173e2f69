"""Compile every variant of the Triton expert kernels ahead of time for real GPUs, on a machine without one.

For each weight format (bfloat16, float16, float32, int8, int4, and as checkpoints ship them: symmetric
int4 with bfloat16 scales by 32 columns (Kimi K2), symmetric int8 by row (GPTQ), MXFP4, NVFP4, FP8 in
blocks and by row, MXFP8: FP8 in 1 x 32 tiles scaled by exponent bytes (Inkling 2)), each kernel (decode
and grouped; gate_up and down), plain and with everything optional at once (biases, input scales and the
direct-read path, pairs computed from host rows: the most registers a variant can need), at the expert
shapes of Mixtral (4096 x 14336), Qwen3-30B-A3B (2048 x 768), DeepSeek-V3 and Kimi K2 (7168 x 2048),
gpt-oss (2880 x 2880, MXFP4), Inkling 2 (4608 x 2304, MXFP8, its softcapped GLU) and Nemotron-3's
ungated ReLU-squared experts (Nano: 2688 x 1856; Super: 1024 x 2688, in its latent space), and the
activations those shapes do not use, it builds the launches `triton_pair_outputs` would make
(`kernel_launches`, on untouched `torch.empty` tensors) and compiles them with Triton's own compiler and
ptxas for sm_80, sm_86, sm_89 and sm_90. It fails (exit 1) on:

- a compile error;
- a register spill (ptxas's spill stores);
- more shared memory than the target gives one block;
- a 32-bit multiply that feeds an address and depends on the pair, token, slot or expert axis: the
  program id of axis 0 or an integer the kernel loads (slot tables, sorted pairs). Those grow with the
  batch and the pool and must be 64-bit; a product inside one expert's matrix is bounded by the
  launcher's check that the matrix spans fewer than 2^31 elements.

Launches that compile to the same binary (the shapes enter only as runtime integers, specialised on
divisibility by 16) are compiled once. `--write` records the table in bench/results/compile/ and
regenerates docs/benchmarks.md.

    python scripts/check_kernels.py                      # every variant, every target, 2 processes
    python scripts/check_kernels.py --targets 90 --jobs 4 --write
"""

import argparse
import contextlib
import datetime
import importlib
import io
import json
import os
import re
import resource
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter's
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# a cache of our own, emptied at exit: a kernel found in a cache would not go through ptxas, whose report
# gives the registers and spills
CACHE = tempfile.TemporaryDirectory(prefix="check-kernels-")
os.environ["TRITON_CACHE_DIR"] = CACHE.name  # Triton 3.9's default, without its warning

import torch  # noqa: E402
import triton  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from localmoe.bench import compile_table  # noqa: E402
from localmoe.kernels import triton_experts  # noqa: E402
from localmoe.kernels.quantized import (  # noqa: E402
    Fp8Weights,
    Mxfp4Weights,
    Nvfp4Weights,
    QuantizedWeights,
    QuantSpec,
)
from localmoe.kernels.reference import ExpertStack  # noqa: E402
from localmoe.models.moe import GatedActivation  # noqa: E402

TARGETS = (80, 86, 89, 90)
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes one block may opt into
SWIGLU, CLAMPED = GatedActivation(), GatedActivation(kind="clamped_swiglu", alpha=1.702, limit=7.0)
RELU2 = GatedActivation(kind="ungated", act="relu2")  # up projection only: gate_up is [N, I, E]
SOFTCAPPED = GatedActivation(kind="softcapped_glu", gate_limit=4.0, limit=25.0)  # Inkling 2's
# name: (hidden, expert intermediate, formats, activation); the experts' hidden width, the latent one where
# they work in a latent space
SHAPES = {
    "mixtral-8x7b": (4096, 14336, ("bf16", "fp16", "fp32", "int8", "int4"), SWIGLU),
    "qwen3-30b-a3b": (2048, 768, ("bf16", "int8", "int4", "int8-row", "nvfp4", "fp8-row"), SWIGLU),
    "deepseek-v3": (7168, 2048, ("fp8", "bf16"), SWIGLU),
    "kimi-k2": (7168, 2048, ("int4-sym",), SWIGLU),
    "gpt-oss": (2880, 2880, ("mxfp4",), CLAMPED),
    "inkling-2": (4608, 2304, ("fp8-mx",), SOFTCAPPED),  # transformers' Inkling2TextConfig's defaults
    "nemotron-3-nano": (2688, 1856, ("bf16", "int8", "int4"), RELU2),
    "nemotron-3-super": (1024, 2688, ("bf16", "int4"), RELU2),
}
# the activations the shapes above do not use, compiled once each
OTHER_ACTIVATIONS = {
    "gelu-tanh": GatedActivation(act="gelu_pytorch_tanh"),
    "clamped-glu": GatedActivation("clamped_glu"),
    "clamped-after": GatedActivation("glu_clamped_after", limit=7.0),  # Step-3.7
}
FORMATS = ("bf16", "fp16", "fp32", "int8", "int4", "int4-sym", "int8-row", "mxfp4", "nvfp4", "fp8", "fp8-row")
FORMATS += ("fp8-mx",)
# checkpoints' integer forms: Kimi K2's (compressed-tensors), GPTQ's 8 bits with group_size -1
CHECKPOINT_INTEGERS = {
    "int4-sym": QuantSpec(4, 32, symmetric=True, scale_dtype=torch.bfloat16),
    "int8-row": QuantSpec(8, 0, symmetric=True),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SLOTS, TOP_K = 2, 2
TOKENS = {"decode": 1, "grouped": 64}  # 2 and 128 pairs: the matrix-vector and the grouped kernels


def stack(fmt: str, rows: int, columns: int, parts: int = 1):
    """An untouched stack of SLOTS matrices [rows, columns] in `fmt`: real strides, no memory touched;
    `parts`: NVFP4's part scales (gate and up: 2)."""
    if fmt in DTYPES:
        return torch.empty(SLOTS, rows, columns, dtype=DTYPES[fmt])
    if fmt in ("int8", "int4") or fmt in CHECKPOINT_INTEGERS:
        spec = CHECKPOINT_INTEGERS.get(fmt) or QuantSpec(int(fmt[3:]), 64)
        q = torch.empty(SLOTS, rows, spec.packed_columns(columns), dtype=torch.uint8)
        scale = torch.empty(SLOTS, rows, spec.groups(columns), dtype=spec.scale_dtype)
        zero = None if spec.symmetric else torch.empty(SLOTS, rows, spec.groups(columns), dtype=torch.float16)
        return QuantizedWeights(q, scale, zero, spec, torch.bfloat16)
    if fmt == "mxfp4":
        blocks = torch.empty(SLOTS, rows, columns // 2, dtype=torch.uint8)
        return Mxfp4Weights(blocks, torch.empty(SLOTS, rows, columns // 32, dtype=torch.uint8), torch.bfloat16)
    if fmt == "nvfp4":  # part scales for gate and up (the gate_up stacks have even rows), or one
        codes, scales = (torch.empty(SLOTS, rows, columns // n, dtype=torch.uint8) for n in (2, 16))
        return Nvfp4Weights(codes, scales, torch.empty(SLOTS, parts), True, torch.bfloat16)
    if fmt == "fp8-mx":  # MXFP8: an exponent byte per 1 x 32 tile
        scales = torch.empty(SLOTS, rows, columns // 32, dtype=torch.uint8)
        return Fp8Weights(torch.empty(SLOTS, rows, columns, dtype=torch.uint8), scales, (1, 32), torch.bfloat16)
    block = 128 if fmt == "fp8" else (1, 0)  # DeepSeek's 128 x 128 tiles, or a scale per row
    scales = torch.empty(
        SLOTS, rows if fmt == "fp8-row" else -(-rows // 128), 1 if fmt == "fp8-row" else -(-columns // 128)
    )
    return Fp8Weights(torch.empty(SLOTS, rows, columns, dtype=torch.uint8), scales, block, torch.bfloat16)


def variants(formats=FORMATS):
    """(row label, launch) for every variant in these formats: the launches `triton_pair_outputs` makes."""
    cases = [
        (shape, fmt, act, None, extras)
        for shape, (_, _, shape_formats, act) in SHAPES.items()
        for fmt in shape_formats
        if fmt in formats
        for extras in (False, True)
    ]
    if "bf16" in formats:
        cases += [("qwen3-30b-a3b", "bf16", act, name, False) for name, act in OTHER_ACTIVATIONS.items()]
    for shape, fmt, act, act_name, extras in cases:
        hidden, inter = SHAPES[shape][:2]
        dtype = DTYPES.get(fmt, torch.bfloat16)
        in_rows = (2 if act.gated else 1) * inter  # gate and up rows, or up alone
        gate_up, down = stack(fmt, in_rows, hidden, 2 if act.gated else 1), stack(fmt, hidden, inter)
        biases = (torch.empty(SLOTS, in_rows, dtype=dtype), torch.empty(SLOTS, hidden, dtype=dtype))
        experts = ExpertStack(gate_up, down, *biases) if extras else ExpertStack(gate_up, down)
        for size, tokens in TOKENS.items():
            x, out = torch.empty(tokens, hidden, dtype=dtype), torch.empty(tokens * TOP_K, hidden, dtype=dtype)
            slots = torch.zeros(tokens, TOP_K, dtype=torch.int32)
            optional = (torch.empty(tokens * TOP_K), slots, experts) if extras else (None, None, None)
            code = triton_experts.activation_code(act)
            launches = triton_experts.kernel_launches(out, x, gate_up, down, slots, code, act, *experts[2:], *optional)
            for launch, part in zip(launches, ("gate_up", "down"), strict=True):
                if act_name and part == "down":
                    continue  # the activation is gate_up's
                label = dict(shape=shape, format=fmt, kernel=f"{size} {part}", extras=extras)
                yield label | ({"activation": act_name} if act_name else {}), launch


def specialise(launch, capability: int) -> dict:
    """What Triton's launcher would compile for this launch on this target: the kernel's name, the
    signature, compile-time constants, specialisation attributes and options (picklable)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.constants)
    options, signature, constants, attrs = kernel._pack_args(backend, launch.constants, bound, specialization, options)
    return dict(
        module=kernel.fn.__module__,
        name=kernel.__name__,
        capability=capability,
        signature=signature,
        constants=constants,
        attrs=attrs,
        options={k: v for k, v in options.__dict__.items() if k in ("num_warps", "num_stages", "num_ctas")},
    )


def compile_one(spec: dict) -> dict:
    """Compile one specialised kernel: registers, spill bytes, shared memory, unsafe multiplies, or the
    error. Runs in a worker process."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(spec["module"]), spec["name"])
    source = ASTSource(kernel, spec["signature"], spec["constants"], spec["attrs"])
    knobs.nvidia.dump_ptxas_log = True  # ptxas's register and spill report, printed on stdout
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", spec["capability"], 32), options=spec["options"])
    except Exception as error:  # a compile error, whatever its type
        return dict(error=f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}")
    registers = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores", log.getvalue())
    return dict(
        registers=int(registers[1]) if registers else None,
        spill_bytes=int(spills[1]) if spills else None,
        shared=compiled.metadata.shared,
        unsafe=unsafe_multiplies(compiled.asm["ttir"]),
    )


VALUE = r"%[\w.$-]+"
OP = re.compile(rf"^\s*(?:({VALUE})(?::\d+)?\s*=\s*)?([\w.]+)\s*(.*)$")
I32 = re.compile(r":\s*(?:i32|tensor<[\dx]+xi32>)\s*(?:loc\(|$)")
INTEGER_LOAD = re.compile(r"!tt\.ptr<i\d+>")
WIDENED = re.compile(r"to (?:tensor<[\dx]+x)?i64")


def unsafe_multiplies(ttir: str) -> list[str]:
    """The 32-bit multiplies (and left shifts) in a kernel's TTIR that feed an address and depend on the
    program id of axis 0 or on an integer loaded from memory, as 'result = op' lines."""
    defs, lines = {}, {}
    offsets = set()  # values used as the offset of an address
    tainted = set()
    for line in ttir.splitlines():
        match = OP.match(line)
        if not match:
            continue
        result, op, rest = match.groups()
        operands = [v.split("#")[0] for v in re.findall(rf"{VALUE}(?:#\d+)?", rest.split(" loc(")[0])]
        if op == "tt.addptr":
            offsets.add(operands[1])
        if result is None:
            continue
        defs[result], lines[result] = (op, operands), line.strip()
        source = (op == "tt.get_program_id" and rest.startswith("x")) or (op == "tt.load" and INTEGER_LOAD.search(rest))
        # a value computed from a tainted one is tainted, unless it is a pointer or was widened to 64 bits
        derived = op not in ("tt.load", "tt.addptr") and not (op == "arith.extsi" and WIDENED.search(rest))
        if source or (derived and any(v in tainted for v in operands)):
            tainted.add(result)
    feeds_address, pending = set(), list(offsets)
    while pending:  # everything an address offset is computed from
        value = pending.pop()
        if value in feeds_address or value not in defs:
            continue
        feeds_address.add(value)
        pending += defs[value][1]
    return [
        lines[v]
        for v in sorted(feeds_address)
        if defs[v][0] in ("arith.muli", "arith.shli")
        and I32.search(lines[v])
        and any(operand in tainted for operand in defs[v][1])
    ]


def problems_of(result: dict, capability: int) -> list[str]:
    """What is wrong with one compiled kernel on this target, in words."""
    if "error" in result:
        return [f"compile error: {result['error']}"]
    found = []
    if result["spill_bytes"]:
        found.append(f"{result['spill_bytes']} bytes of register spills")
    if result["registers"] is None or result["spill_bytes"] is None:
        found.append("no register report from ptxas")
    if result["shared"] > SHARED_LIMIT[capability]:
        found.append(f"{result['shared']} bytes of shared memory (sm_{capability} allows {SHARED_LIMIT[capability]})")
    found += [f"32-bit address multiply on the pair/slot axis: {line}" for line in result["unsafe"]]
    return found


def key_of(spec: dict) -> str:
    """Launches with equal keys compile to the same binary."""
    return repr(sorted((name, repr(value)) for name, value in spec.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)), help="compute capabilities, e.g. 80,90")
    parser.add_argument("--formats", default=",".join(FORMATS), help="weight formats, e.g. int4,mxfp4")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes")
    parser.add_argument("--write", action="store_true", help="record in bench/results/compile and the docs")
    args = parser.parse_args()
    targets = [int(t) for t in args.targets.split(",")]
    started = time.perf_counter()
    rows, unique = [], {}
    for label, launch in variants(args.formats.split(",")):
        for capability in targets:
            spec = specialise(launch, capability)
            unique.setdefault(key_of(spec), spec)
            rows.append((label, capability, key_of(spec)))
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = dict(zip(unique, pool.map(compile_one, unique.values()), strict=True))
    cpu = sum(
        getattr(resource.getrusage(who), f)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for f in ("ru_utime", "ru_stime")
    )
    failures = 0
    for label, capability, key in rows:
        for problem in problems_of(results[key], capability):
            failures += 1
            print(f"FAIL sm_{capability} {describe(label)}: {problem}")
    elapsed = time.perf_counter() - started
    table = summary_rows(rows, results, targets)
    print("\n".join(compile_table(table, targets)))
    print(
        f"{len(rows)} variants, {len(unique)} distinct compiles: {elapsed:.0f} s with {args.jobs} processes, "
        f"{cpu:.0f} s of CPU time; {failures} problems"
    )
    if args.write:
        write(
            table, targets, dict(seconds=round(elapsed), cpu_seconds=round(cpu), compiles=len(unique), jobs=args.jobs)
        )
    return 1 if failures else 0


def describe(label: dict) -> str:
    extras = "biases, input scale, direct read" if label["extras"] else "plain"
    act = f", {label['activation']}" if "activation" in label else ""
    return f"{label['shape']} {label['format']} {label['kernel']} ({extras}{act})"


def summary_rows(rows, results, targets) -> list[dict]:
    """One row per variant: registers (and spills) per target, the most shared memory."""
    table = defaultdict(dict)
    for label, capability, key in rows:
        table[json.dumps(label)][capability] = results[key]
    out = []
    for label, per_target in table.items():
        cells = {}
        for capability in targets:
            r = per_target[capability]
            cells[str(capability)] = (
                "error"
                if "error" in r
                else f"{r['registers']}" + (f" +{r['spill_bytes']}B spill" if r["spill_bytes"] else "")
            )
        shared = max(r.get("shared", 0) for r in per_target.values())
        out.append(dict(label=json.loads(label), cells=cells, shared=shared))
    return out


def write(table: list[dict], targets, cost: dict) -> None:
    from localmoe.bench import machine, write_benchmarks

    now = datetime.datetime.now(datetime.timezone.utc)
    record = dict(
        date=now.strftime("%Y-%m-%d %H:%M UTC"),
        command=shlex.join(["python", "scripts/check_kernels.py", *sys.argv[1:]]),
        machine=machine(),
        triton=triton.__version__,
        targets=targets,
        **cost,
        rows=table,
    )
    folder = ROOT / "bench" / "results" / "compile"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{now:%Y%m%d-%H%M}.json").write_text(json.dumps(record, indent=1) + "\n")
    write_benchmarks(ROOT / "bench" / "results", ROOT / "docs" / "benchmarks.md")


if __name__ == "__main__":
    sys.exit(main())
