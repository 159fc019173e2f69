"""The `localmoe` command."""

import json
import sys
from pathlib import Path

import click
import torch

from localmoe.engine import CUDA_GRAPHS, RuntimeOptions
from localmoe.errors import LocalMoEError, as_flag
from localmoe.kernels import KERNELS
from localmoe.runtime.expert_cache import POLICIES
from localmoe.runtime.miss_policy import MISS_POLICIES

DTYPE_CHOICES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULTS = RuntimeOptions()  # every setting's one default


class _Commands(click.Group):
    """Prints a LocalMoEError as one line, naming settings as flags, and exits 2, instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LocalMoEError as error:
            click.echo(f"localmoe: error: {error.phrased(as_flag)}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("", err=True)
            ctx.exit(130)


@click.group(cls=_Commands)
@click.version_option(package_name="localmoe")
def main():
    """Run Mixture-of-Experts models from Hugging Face checkpoints."""


def _size(ctx, param, value: str | None) -> int | None:
    from localmoe.runtime.memory import parse_size

    return None if value is None else parse_size(value)


def _placement_options(fn):
    """Flags that decide where the model lives: device, dtype, budgets, context and the expert slots."""
    options = [
        click.option("--device", default=None, help="cpu, cuda or cuda:N  [default: cuda if present, else cpu]"),
        click.option(
            "--dtype",
            type=click.Choice(list(DTYPE_CHOICES)),
            default="auto",
            help="Compute dtype; auto: the checkpoint's.",
        ),
        click.option("--vram-budget", callback=_size, help="Device memory to use, e.g. 12GiB  [default: what is free]"),
        click.option(
            "--host-budget", callback=_size, help="Host RAM for the experts, e.g. 32GiB  [default: available]"
        ),
        click.option(
            "--expert-slots",
            type=click.IntRange(min=1),
            default=None,
            help="Expert slots on the device (overrides the plan).",
        ),
        click.option(
            "--context",
            type=click.IntRange(min=1),
            default=DEFAULTS.context,
            show_default=True,
            help="Tokens of KV cache.",
        ),
        click.option(
            "--expert-bits",
            type=click.Choice(["16", "8", "4"]),
            default="16",
            show_default=True,
            help="Keep the routed experts quantized to 8 or 4 bits (cached on disk after the first start).",
        ),
        click.option(
            "--expert-group-size",
            type=click.IntRange(min=2),
            default=DEFAULTS.expert_group_size,
            show_default=True,
            help="Columns per scale.",
        ),
        click.option("--yes", is_flag=True, help="Start even a run estimated below 0.2 tokens/s (experts from disk)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _cache_options(fn):
    """Flags of the expert cache and prefetch, and what to report."""
    options = [
        click.option(
            "--policy",
            type=click.Choice(list(POLICIES)),
            default=DEFAULTS.policy,
            show_default=True,
            help="Which expert a full cache evicts: lowest decayed router score, least often or least recently used.",
        ),
        click.option(
            "--profile",
            default="auto",
            show_default=True,
            help="Routing profile to start from and update: auto (this checkpoint's, in localmoe's cache "
            "folder), a FILE, or off.",
        ),
        click.option(
            "--pin-hot",
            type=click.IntRange(min=0),
            default=DEFAULTS.pin_hot,
            help="Pin the N hottest experts: the profile's, or else those the first prompt used most.",
        ),
        click.option(
            "--prefetch",
            type=click.IntRange(min=0),
            default=DEFAULTS.prefetch,
            help="MoE layers to look ahead, for the miss policies that decide on the host (copy, cpu, auto, "
            "bypass); 0: off.  [default: 1 for those, 0 for direct]",
        ),
        click.option(
            "--prefetch-margin", type=click.IntRange(min=0), default=DEFAULTS.prefetch_margin, show_default=True
        ),
        click.option(
            "--miss-policy",
            type=click.Choice(list(MISS_POLICIES)),
            default=DEFAULTS.miss_policy,
            help="An expert not in a slot: direct: read by the kernel where it lies in the host copy (over the bus "
            "on CUDA), nothing waiting for the host, the cache learning a token later; copy: copied to the device "
            "first; cpu: computed on the CPU from the host copy; auto: whichever the measured bandwidths say is "
            "faster; bypass: on the CPU when the policy ranks it below the expert it would evict. All but direct "
            "read each MoE layer's routing on the host before its experts run: one wait for the device per layer, "
            "which on a GPU keeps decode bound by the host.  [default: direct, or copy where the host copy cannot be "
            "read in place (experts mapped from disk)]",
        ),
        click.option(
            "--copy-bandwidth", type=click.FloatRange(min=0, min_open=True), help="GB/s for --miss-policy auto"
        ),
        click.option(
            "--cpu-bandwidth",
            type=click.FloatRange(min=0, min_open=True),
            help="GB/s of expert weights the CPU gets through per token, for --miss-policy auto",
        ),
        click.option(
            "--kernels",
            type=click.Choice(list(KERNELS)),
            default=DEFAULTS.kernels,
            show_default=True,
            help="Expert kernels: the PyTorch reference, the fused Triton kernels (CUDA), or Triton where it works.",
        ),
        click.option(
            "--cuda-graphs",
            type=click.Choice(list(CUDA_GRAPHS)),
            default=DEFAULTS.cuda_graphs,
            show_default=True,
            help="Capture decode steps as CUDA graphs: auto where they can be (CUDA, fused kernels, direct misses, "
            "a model whose layers all run static steps), on (or an error saying why not), off.",
        ),
        click.option("--stats", is_flag=True, help="Print the memory plan and the cache counters."),
        click.option(
            "--trace", type=click.Path(dir_okay=False, path_type=Path), help="Write the routing as JSON lines."
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _sampling_options(fn):
    """Sampling flags; each left out keeps the checkpoint's default (generation_config.json)."""
    options = [
        click.option("--temperature", type=float, default=None, help="0 is greedy.  [default: the checkpoint's]"),
        click.option("--top-k", type=int, default=None),
        click.option("--top-p", type=float, default=None),
        click.option("--min-p", type=float, default=None),
        click.option("--repetition-penalty", type=float, default=None),
        click.option("--seed", type=int, default=None, help="Make sampling reproducible."),
        click.option("--stop", multiple=True, help="Stop before this text (repeatable); it is not printed."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _sampling(engine, values: dict):
    names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
    return engine.sampling(**{name: values[name] for name in names})


def _load(model: str, revision: str | None, flags: dict):
    from localmoe.engine import place, prepare, resolve_device

    device = str(resolve_device(flags["device"]))  # an unusable device is the first thing to say
    prepared = prepare(
        model, device=device, dtype=DTYPE_CHOICES[flags["dtype"]], revision=revision, options=_runtime_options(flags)
    )
    _check_disk_speed(prepared, flags)
    engine = place(prepared)
    click.echo(engine.summary(), err=True)
    click.get_current_context().call_on_close(lambda: _save_profile(engine))
    return engine


def _save_profile(engine) -> None:
    try:
        engine.save_profile()
    except OSError as error:
        click.echo(f"localmoe: the routing profile was not saved: {error}", err=True)


SLOWEST_WITHOUT_YES = 0.2  # decode tokens/s below which a run from disk needs --yes


def _check_disk_speed(prepared, flags: dict) -> None:
    """Where experts would come from disk, say how slow that allows, and refuse below 0.2 tokens/s
    unless --yes."""
    from localmoe.checkpoint import read_bandwidth

    plan = prepared.plan
    if plan.store != "mmap":
        return
    bandwidth = read_bandwidth(prepared.checkpoint.path)
    click.echo(plan.disk_notice(bandwidth), err=True)
    if plan.disk_tokens_per_s(bandwidth) < SLOWEST_WITHOUT_YES and not flags.get("yes"):
        raise LocalMoEError(
            f"from disk this run would decode below {SLOWEST_WITHOUT_YES} tokens/s: give it more --host-budget or "
            "--vram-budget, or pass --yes to start it anyway"
        )


def _runtime_options(values: dict) -> RuntimeOptions:
    return RuntimeOptions(
        vram_budget=values["vram_budget"],
        host_budget=values["host_budget"],
        expert_slots=values["expert_slots"],
        context=values["context"],
        expert_bits=int(values["expert_bits"]),
        expert_group_size=values["expert_group_size"],
        profile=None if values.get("profile", "off") == "off" else values["profile"],
        **{
            key: values[key]
            for key in (
                "policy",
                "pin_hot",
                "prefetch",
                "prefetch_margin",
                "trace",
                "miss_policy",
                "kernels",
                "cuda_graphs",
            )
            if key in values
        },
        **{
            f"{kind}_bandwidth": values[f"{kind}_bandwidth"] * 1e9
            for kind in ("copy", "cpu")
            if values.get(f"{kind}_bandwidth") is not None
        },
    )


@main.command()
@click.argument("model")
@click.option("--prompt", "-p", required=True, help="Text to continue.")
@click.option("--max-new-tokens", "-n", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--chat", is_flag=True, help="Send the prompt as a user message through the chat template.")
@click.option(
    "--raw", is_flag=True, help="Encode the prompt exactly as written, adding no special tokens (code completion)."
)
@click.option("--system", default=None, help="System message, with --chat.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: the text, timings and counters.")
@click.option("--revision", default=None, help="Hub branch, tag or commit (for a repo id).")
@_sampling_options
@_placement_options
@_cache_options
def generate(
    model: str, prompt: str, max_new_tokens: int, chat: bool, raw: bool, system, as_json: bool, revision, **flags
):
    """Print the continuation of PROMPT. MODEL is a checkpoint folder or a Hub repo id."""
    if chat and raw:
        raise LocalMoEError("--chat and --raw exclude each other: --raw sends the prompt with no template at all")
    engine = _load(model, revision, flags)
    sampling = _sampling(engine, flags)
    pieces = engine.generate(prompt, max_new_tokens, sampling, flags["stop"], chat=chat, raw=raw, system=system)
    if as_json:
        click.echo(json.dumps(_report(engine, "".join(pieces)), indent=2))
        return
    _stream(engine, pieces, flags["stats"])


@main.command()
@click.argument("model")
@click.option("--system", default=None, help="System message.")
@click.option("--max-new-tokens", "-n", default=1024, show_default=True, type=click.IntRange(min=1), help="Per answer.")
@click.option("--revision", default=None, help="Hub branch, tag or commit (for a repo id).")
@_sampling_options
@_placement_options
@_cache_options
def chat(model: str, system: str | None, max_new_tokens: int, revision: str | None, **flags):
    """Chat with MODEL. In a terminal: a prompt with history and /commands (/help). With piped input:
    each line is a message, and the answers are printed as plain text."""
    from localmoe.chat import ChatSession, run

    engine = _load(model, revision, flags)
    engine.tokenizer.render_chat([{"role": "user", "content": "hi"}])  # fail now if there is no template
    session = ChatSession(engine, _sampling(engine, flags), max_new_tokens, list(flags["stop"]), system)
    run(session, interactive=sys.stdin.isatty())


@main.command()
@click.argument("model")
@click.option("--revision", default=None, help="Hub branch, tag or commit (for a repo id).")
@_placement_options
def plan(model: str, revision: str | None, **flags):
    """Print where MODEL's weights would live, without loading them. Works without the GPU: give
    --device cuda --vram-budget SIZE to plan for a card that is not here."""
    from localmoe.checkpoint import read_bandwidth
    from localmoe.engine import prepare

    prepared = prepare(
        model,
        device=flags["device"],
        dtype=DTYPE_CHOICES[flags["dtype"]],
        revision=revision,
        options=_runtime_options(flags),
    )
    plan = prepared.plan
    bandwidth = read_bandwidth(prepared.checkpoint.path) if plan.store == "mmap" else None
    click.echo(plan.describe(bandwidth))


@main.command()
@click.argument("model")
@click.option("--tokens", default=16, show_default=True, type=click.IntRange(min=2), help="Decode tokens per try.")
@click.option("--revision", default=None, help="Hub branch, tag or commit (for a repo id).")
@_placement_options
def tune(model: str, tokens: int, revision: str | None, **flags):
    """Try expert cache settings on this machine within the budget and print the fastest flags."""
    from localmoe.tune import Tuner

    engine = _load(model, revision, flags)
    base = _placement_flags(model, flags, engine)
    if engine.expert_cache() is None:
        click.echo("every expert fits on the device: there is no expert cache to tune. Run:")
        click.echo(f"localmoe generate {base}")
        return

    def report(setting, result):
        slots = setting.slots or engine.plan.slots
        line = (
            f"{result.decode_tokens_per_s:8.2f} tok/s  hit rate {result.hit_rate:.3f}  {slots} slots  {setting.flags()}"
        )
        click.echo(line)

    click.echo(f"decode tokens/s over {tokens} tokens, {engine.plan.slots} expert slots:")
    best = Tuner(engine, _bench_prompt(engine), tokens, report).run()
    click.echo(f"fastest: localmoe generate {base} {best.flags()}")


@main.command()
@click.argument("model")
@click.option("--tokens", default=32, show_default=True, type=click.IntRange(min=2), help="Decode tokens.")
@click.option("--revision", default=None, help="Hub branch, tag or commit (for a repo id).")
@_placement_options
@_cache_options
def bench(model: str, tokens: int, revision: str | None, **flags):
    """Measure prefill and decode speed on this machine, against the physical floor."""
    from localmoe.bench import decode_floor, measure_bandwidth, results_table, run_engine

    engine = _load(model, revision, flags)
    result = run_engine(engine, "localmoe", _bench_prompt(engine), tokens)
    floor = decode_floor(engine.plan.footprint, measure_bandwidth(engine.device), result.bytes_copied_per_token or 0)
    click.echo(results_table([result], floor["floor_s"]))
    click.echo(f"floor: {floor['floor_s'] * 1000:.1f} ms per token, set by {floor['bound']}")


def _bench_prompt(engine) -> list[int]:
    """A fixed prompt of 32 token ids (no tokenizer needed)."""
    vocab = engine.model.model.embed_tokens.weight.shape[0]
    return [(7 * i + 3) % min(vocab, 1000) for i in range(32)]


def _placement_flags(model: str, flags: dict, engine) -> str:
    """The flags that reproduce this engine's placement, for a command line to copy."""
    from localmoe.runtime.memory import flag_size

    words = [model, "--device", str(engine.device), "--context", str(engine.plan.context)]
    if flags["dtype"] != "auto":
        words += ["--dtype", flags["dtype"]]
    if not engine.plan.all_resident:
        words += ["--vram-budget", flag_size(engine.plan.device_budget), "--expert-slots", str(engine.plan.slots)]
    return " ".join(words)


@main.command()
@click.argument("model")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (localhost only by default)."
)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--api-key", default=None, help="Require `Authorization: Bearer KEY` on every endpoint but /health.")
@click.option("--name", default=None, help="The model name clients use  [default: the checkpoint's name].")
@click.option("--queue", default=8, show_default=True, type=click.IntRange(min=1), help="Requests that may wait.")
@click.option(
    "--max-tokens-limit", default=None, type=click.IntRange(min=1), help="Largest max_tokens a request may ask."
)
@click.option("--revision", default=None, help="Hub branch, tag or commit (for a repo id).")
@_placement_options
@_cache_options
def serve(model, host, port, api_key, name, queue, max_tokens_limit, revision, **flags):
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models,
    /health, /metrics), one generation at a time."""
    try:
        import uvicorn

        from localmoe.server import Server
    except ImportError:
        raise LocalMoEError("localmoe serve needs its extra: pip install 'localmoe[serve]'") from None
    engine = _load(model, revision, flags)
    served = name or model.rstrip("/").split("/")[-1]
    server = Server(engine, served, api_key, queue, max_tokens_limit or engine.plan.context)
    click.echo(f"serving {served} on http://{host}:{port}/v1", err=True)
    uvicorn.run(server.app(), host=host, port=port, log_level="warning")


@main.command()
def families():
    """List the model families localmoe runs, with an example Hub id for each."""
    from localmoe.models import families_table

    click.echo(families_table())


@main.command()
@click.option("--prompt", "-p", default="The quick brown fox", show_default=True)
@click.option("--max-new-tokens", "-n", default=48, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default=None, help="cpu, cuda or cuda:N  [default: cuda if present, else cpu]")
def demo(prompt: str, max_new_tokens: int, device: str | None):
    """Generate with a tiny random-weight MoE checkpoint, no download needed, with a quarter of its
    experts in device slots so that the expert cache is at work; prints the cache counters."""
    from localmoe.demo import DEMO_CONFIG, demo_checkpoint
    from localmoe.engine import RuntimeOptions, load

    folder = demo_checkpoint()
    click.echo(
        f"localmoe demo: a tiny Mixtral-shaped checkpoint with RANDOM weights ({folder}); the text below is "
        "noise, it shows that loading, the expert cache and generation work.",
        err=True,
    )
    total = DEMO_CONFIG["num_hidden_layers"] * DEMO_CONFIG["num_local_experts"]
    engine = load(str(folder), device=device, options=RuntimeOptions(expert_slots=total // 4))
    click.echo(engine.summary(), err=True)
    _stream(engine, engine.generate(prompt, max_new_tokens), stats=True)


def _stream(engine, pieces, stats: bool) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    click.echo(f"[{engine.stats.summary()}]", err=True)
    if stats:
        click.echo(engine.cache_report(), err=True)


def _report(engine, text: str) -> dict:
    """`generate --json`: the text with the run's timings, plan and expert cache counters."""
    from dataclasses import asdict

    stats = engine.stats
    cache = engine.expert_cache()
    return {
        "text": text,
        "prompt_tokens": stats.prompt_tokens,
        "new_tokens": stats.new_tokens,
        "time_to_first_token_s": stats.prefill_seconds,
        "prefill_tokens_per_s": stats.prefill_rate,
        "decode_tokens_per_s": stats.decode_rate,
        "device": engine.plan.device,
        "expert_slots": engine.plan.slots if cache is None else cache.slots,
        "total_experts": engine.plan.footprint.total_experts,
        "cache": None if cache is None else {**asdict(cache.total), "hit_rate": cache.total.hit_rate},
        "cache_per_layer": None if cache is None else {str(k): asdict(v) for k, v in cache.per_layer.items()},
    }
