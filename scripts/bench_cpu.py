"""CPU decode and prefill: localmoe's CPU expert kernels beside llama.cpp and transformers, on the same
random weights, in one run, repetitions interleaved (every engine once per round) so that the load of a
shared machine falls on all of them alike; each figure is the median of the rounds with their range.

Two checkpoints, written once with random weights: Mixtral-like (hidden 2048, 8 experts of 5632, top-2,
8 layers) and Qwen3-30B-like (hidden 2048, 128 experts of 768, top-8, 6 layers), in bfloat16, with a
small byte-level vocabulary (320 tokens: the LM head costs nearly nothing, as the bench is about experts).
llama.cpp reads them through its own converter (convert_hf_to_gguf.py, with the gguf-py package of the
same source: PyPI's gguf 0.19.0 lacks what this converter uses) as BF16, then llama-quantize makes Q8_0
and Q4_0; its Q8_0/Q4_0 quantize attention too, so each is also run with only the experts quantized
("experts only"), which reads the same bytes per token as localmoe, whose other weights stay in
bfloat16. localmoe runs all-resident on the CPU with --expert-bits 16, 8 and 4 (groups of 32, as Q8_0
and Q4_0); transformers in bfloat16.

Build llama.cpp once, outside the repository (2 cores: about half an hour):

    pip download llama-cpp-python --no-deps --no-binary :all:     # an sdist that vendors llama.cpp
    tar xzf llama_cpp_python-*.tar.gz
    cmake -S llama_cpp_python-*/vendor/llama.cpp -B llama.cpp-build -G Ninja -DCMAKE_BUILD_TYPE=Release \\
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build llama.cpp-build --target llama-bench llama-quantize

then

    python scripts/bench_cpu.py --llama-cpp llama.cpp-build --llama-source llama_cpp_python-*/vendor/llama.cpp

It writes bench/results/cpu/<date>.json and regenerates docs/benchmarks.md. The checkpoints and GGUF
files (about 25 GB) go to --work (default: localmoe's cache folder, bench-cpu/).
"""

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from localmoe.bench import machine, write_benchmarks  # noqa: E402
from localmoe.files import temporary_path  # noqa: E402
from localmoe.paths import cache_dir  # noqa: E402

MODELS = {
    "mixtral": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 8,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    "qwen3": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_hidden_layers": 6,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
    },
}
VOCAB = 320
COMMON = {
    "vocab_size": VOCAB,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "bfloat16",
}
# everything but the experts kept in BF16 (attention; the token embeddings and the LM head)
BF16_REST = ["--tensor-type", "attn=bf16", "--token-embedding-type", "bf16", "--output-tensor-type", "bf16"]
# (name, localmoe's --expert-bits, llama.cpp's type, llama-quantize's extra arguments)
FORMATS = [
    ("bf16", 16, "BF16", None),
    ("8 bit", 8, "Q8_0", []),
    ("8 bit, experts only", 8, "Q8_0", BF16_REST),
    ("4 bit", 4, "Q4_0", []),
    ("4 bit, experts only", 4, "Q4_0", BF16_REST),
]
GROUP = 32  # localmoe's quantization groups: Q8_0's and Q4_0's blocks

# the converter knows BPE vocabularies by a hash of how they split a test text; a random checkpoint's has
# none it knows, and which pre-tokenizer it names changes nothing measured here
CONVERT = """
import runpy, sys
sys.path.insert(0, {source!r})
sys.argv = {argv!r}
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
runpy.run_path({script!r}, run_name="__main__")
"""


def config_of(model: str, layers: int | None) -> dict:
    """`model`'s configuration, with `layers` layers where given (a smaller file, the same per-layer work)."""
    return {**MODELS[model], **COMMON, **({"num_hidden_layers": layers} if layers else {})}


def checkpoint(work: Path, name: str, config: dict) -> Path:
    """The random checkpoint `name` of `config`, written once."""
    from localmoe.demo import write_random_checkpoint

    folder = work / name
    if not (folder / "tokenizer.json").is_file():
        print(f"writing a random checkpoint to {folder}", flush=True)
        write_random_checkpoint(folder, config, shard_bytes=1 << 30)
        tokenizer = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
        byte_level_bpe().save(str(folder / "tokenizer.json"))
    return folder


def byte_level_bpe():
    """A byte-level BPE vocabulary of VOCAB tokens, merges learnt from this file's docstring (llama.cpp
    refuses a BPE vocabulary without merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=alphabet, special_tokens=["<s>", "</s>"])
    tokenizer.train_from_iterator([__doc__], trainer)
    return tokenizer


def gguf_files(work: Path, model: str, folder: Path, llama_cpp: Path, source: Path, formats) -> dict[str, Path]:
    """llama.cpp's files for each of `formats`, converted from `folder` once."""
    bf16 = work / f"{model}-BF16.gguf"
    if not bf16.is_file():
        written_whole(bf16, lambda part: convert_command(source, folder, part))
    files = {}
    for name, _, kind, extra in formats:
        if extra is None:
            files[name] = bf16
            continue
        path = work / f"{model}-{kind}{'-experts' if extra else ''}.gguf"
        if not path.is_file():
            quantize = [str(llama_cpp / "bin" / "llama-quantize"), *extra, str(bf16)]
            written_whole(path, lambda part, quantize=quantize, kind=kind: [*quantize, str(part), kind])
        files[name] = path
    return files


def convert_command(source: Path, folder: Path, out: Path) -> list[str]:
    """llama.cpp's converter writing `folder` to `out` in BF16, with its own gguf-py."""
    argv = ["convert_hf_to_gguf.py", str(folder), "--outfile", str(out), "--outtype", "bf16"]
    script = CONVERT.format(source=str(source), argv=argv, script=str(source / "convert_hf_to_gguf.py"))
    return [sys.executable, "-c", script]


def written_whole(path: Path, command) -> None:
    """Run `command(part)`, which writes a temporary file of its own, then rename it to `path`: an
    interrupted run leaves no file that looks finished, and two runs never write the same file."""
    part = temporary_path(path)
    try:
        subprocess.run(command(part), check=True)
        part.replace(path)
    finally:
        part.unlink(missing_ok=True)


def run_llama(llama_cpp: Path, path: Path, prompt: int, new: int, threads: int) -> dict:
    """One llama-bench run: prefill of `prompt` tokens and decode of `new`, tokens per second."""
    command = [str(llama_cpp / "bin" / "llama-bench"), "-m", str(path), "-p", str(prompt), "-n", str(new)]
    command += ["-t", str(threads), "-r", "1", "-o", "json"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        failed = f"llama-bench failed on {path.name} (exit {done.returncode})"
        sys.exit(f"bench_cpu: {failed}: leave its format out of --formats")
    tests = json.loads(done.stdout)
    rate = {("prefill" if t["n_prompt"] else "decode"): t["avg_ts"] for t in tests}
    return {"prefill": rate["prefill"], "decode": rate["decode"]}


def run_child(engine: str, path: Path, bits: int, prompt: int, new: int, threads: int) -> dict:
    """localmoe or transformers in a fresh process (so each starts as a user's would, and no run's
    memory outlives it)."""
    command = [sys.executable, __file__, "--child", engine, "--checkpoint", str(path), "--bits", str(bits)]
    command += ["--prompt", str(prompt), "--new", str(new), "--threads", str(threads)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_localmoe(path: Path, bits: int, prompt: list[int], new: int, threads: int) -> dict:
    from localmoe.engine import RuntimeOptions, load

    options = RuntimeOptions(expert_bits=bits, expert_group_size=GROUP, threads=threads, profile=None)
    engine = load(str(path), device="cpu", dtype=torch.bfloat16, options=options)
    assert engine.plan.all_resident, "the bench wants every expert resident in RAM"
    list(engine.generate_ids(prompt[:4], 3))  # warm up: page faults, the kernels' first use
    list(engine.generate_ids(prompt, new))
    fp = engine.plan.footprint
    return {
        "prefill": engine.stats.prefill_rate,
        "decode": engine.stats.decode_rate,
        "kernels": engine.kernels,
        "read_per_token": fp.resident_bytes + fp.moe_layers * fp.top_k * fp.expert_bytes,
        "read_per_prompt": fp.resident_bytes + fp.total_experts * fp.expert_bytes,
    }


def child_transformers(path: Path, prompt: list[int], new: int, threads: int) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        model.generate(ids[:, :4], max_new_tokens=3, do_sample=False)  # warm up
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill = time.perf_counter() - start
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new - 1):
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - start
    return {"prefill": len(prompt) / prefill, "decode": (new - 1) / decode}


def read_bandwidth(threads: int) -> float:
    """Bytes per second one pass of reading RAM reaches (a sum over 1 GiB, the best of three)."""
    torch.set_num_threads(threads)
    data = torch.ones(2**28)
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        data.sum()
        best = max(best, data.nbytes / (time.perf_counter() - start))
    return best


def gguf_read_per_token(path: Path, top_k: int, experts: int) -> tuple[int, int]:
    """Bytes llama.cpp reads per decode token (all weights but the experts not chosen) and per prompt."""
    from gguf import GGUFReader  # llama.cpp's gguf-py (see main)

    tensors = GGUFReader(str(path)).tensors
    experts_total = sum(int(t.n_bytes) for t in tensors if "_exps" in t.name)
    rest = sum(int(t.n_bytes) for t in tensors if "_exps" not in t.name)
    return rest + experts_total * top_k // experts, rest + experts_total


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def bench_model(args, model: str) -> dict:
    config = config_of(model, args.layers)
    tag = f"{model}-{config['num_hidden_layers']}layers"
    folder = checkpoint(args.work, tag, config)
    formats = [f for f in FORMATS if f[0] in args.formats.split(";")]
    files = gguf_files(args.work, tag, folder, args.llama_cpp, args.llama_source, formats)
    top_k, experts = config["num_experts_per_tok"], config.get("num_local_experts") or config["num_experts"]
    runs: dict[tuple[str, str], list[dict]] = {}
    bandwidths, loads = [], []
    for round_ in range(args.rounds):
        print(f"{model}: round {round_ + 1} of {args.rounds}", flush=True)
        loads.append(os.getloadavg()[0])  # what else the machine runs: the runs of a round share it
        bandwidths.append(read_bandwidth(args.threads))
        for name, bits, _, _ in formats:
            runs.setdefault(("llama.cpp", name), []).append(
                run_llama(args.llama_cpp, files[name], args.prompt, args.new, args.threads)
            )
            own = name.split(",")[0]  # localmoe's format: its other weights stay bfloat16 either way
            if len(runs.get(("localmoe", own), [])) == round_:
                result = run_child("localmoe", folder, bits, args.prompt, args.new, args.threads)
                runs.setdefault(("localmoe", own), []).append(result)
            if bits == 16 and not args.no_transformers:
                result = run_child("transformers", folder, bits, args.prompt, args.new, args.threads)
                runs.setdefault(("transformers", name), []).append(result)
    bandwidth = statistics.median(bandwidths)
    rows = []
    for (engine, name), results in runs.items():
        if engine == "llama.cpp":
            per_token, per_prompt = gguf_read_per_token(files[name], top_k, experts)
        else:
            local = runs[("localmoe", name.split(",")[0])][0]
            per_token, per_prompt = local["read_per_token"], local["read_per_prompt"]
        rows.append(
            {
                "engine": engine,
                "format": name,
                "prefill": spread([r["prefill"] for r in results]),
                "decode": spread([r["decode"] for r in results]),
                "read_per_token": per_token,
                "floor_decode": bandwidth / per_token,  # tokens/s if reading the weights were all it took
                "floor_prefill": args.prompt * bandwidth / per_prompt,
                "detail": results[0].get("kernels", ""),
            }
        )
    return {"model": model, "config": config, "bandwidth": spread(bandwidths), "load": spread(loads), "rows": rows}


def random_prompt(tokens: int) -> list[int]:
    return torch.randint(2, VOCAB, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()


def child_main(args) -> None:
    prompt = random_prompt(args.prompt)
    if args.child == "localmoe":
        result = child_localmoe(args.checkpoint, args.bits, prompt, args.new, args.threads)
    else:
        result = child_transformers(args.checkpoint, prompt, args.new, args.threads)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", type=Path, help="llama.cpp's build folder (with bin/llama-bench)")
    parser.add_argument("--llama-source", type=Path, help="llama.cpp's source (with convert_hf_to_gguf.py)")
    parser.add_argument("--models", default="mixtral,qwen3")
    parser.add_argument("--layers", type=int, help="layers of each model  [default: the table's, 8 and 6]")
    names = [f[0] for f in FORMATS]
    # llama.cpp's fully quantized files (attention too) crash llama-bench on the tiny vocabulary at the
    # build measured; the experts-only files are the like-for-like comparison anyway
    default = "bf16;8 bit, experts only;4 bit, experts only"
    parser.add_argument("--formats", default=default, help=f"separated by ';', of: {'; '.join(names)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens (prefill)")
    parser.add_argument("--new", type=int, default=32, help="tokens decoded")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--work", type=Path, default=cache_dir() / "bench-cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--child", choices=["localmoe", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bits", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)
    if args.llama_cpp is None or args.llama_source is None:
        parser.error("--llama-cpp and --llama-source are needed: see --help for building llama.cpp")
    sys.path.insert(0, str(args.llama_source / "gguf-py"))
    args.work.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python scripts/bench_cpu.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": machine(),
        "threads": args.threads,
        "prompt_tokens": args.prompt,
        "new_tokens": args.new,
        "rounds": args.rounds,
        "models": [bench_model(args, model) for model in args.models.split(",")],
    }
    folder = args.out / "cpu"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{now:%Y%m%d-%H%M}.json"
    out.write_text(json.dumps(result, indent=2))
    write_benchmarks(args.out, args.docs)
    print(f"wrote {out} and {args.docs}")


if __name__ == "__main__":
    main()
