"""The `localmoe` command. Building the commands and printing their help imports no torch: what needs it
is imported inside the commands, and the choices of a flag that come from a registry are read when shown."""

import importlib
import json
import logging
import shlex
import signal
import sys
from pathlib import Path

import click

from localmoe.errors import LocalMoEError, as_flag
from localmoe.options import (
    CHAT_TOKENS,
    CUDA_GRAPHS,
    DEFAULT_CONTEXT,
    DRAFT_TOKENS,
    GENERATE_TOKENS,
    MOST_DRAFT_TOKENS,
    SPECULATIVE,
    RuntimeOptions,
    parse_size,
)

DEFAULTS = RuntimeOptions()  # every setting's one default
SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")


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


class _Registry(click.Choice):
    """A choice among the names of a registry (`module.TABLE`), imported when the flag is used or shown."""

    def __init__(self, module: str, table: str, first: tuple[str, ...] = ()):
        self._where, self._first, self.case_sensitive = (module, table), first, True

    @property
    def choices(self) -> tuple[str, ...]:
        module, table = self._where
        return (*self._first, *getattr(importlib.import_module(module), table))


@click.group(cls=_Commands)
@click.version_option(package_name="localmoe")
def main():
    """Run Mixture-of-Experts models from Hugging Face checkpoints."""


def _options(options: list):
    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def _text(ctx, param, value):
    """Refuse text flags that are not valid UTF-8: the shell passes their bytes as they are, and the
    undecodable ones reach Python as lone surrogates."""
    for text in value if isinstance(value, tuple) else [value]:
        if text is not None and (bad := next((c for c in text if "\ud800" <= c <= "\udfff"), None)):
            byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if ord(bad) >= 0xDC80 else "a surrogate"
            raise LocalMoEError(f"--{param.name.replace('_', '-')} is not valid UTF-8 text ({byte}): write it in UTF-8")
    return value


def _port(ctx, param, value: int) -> int:
    if not 0 <= value <= 65535:
        raise LocalMoEError(f"--port {value} is not a TCP port: use one from 1 to 65535 (0: any free one)")
    return value


def _size(ctx, param, value: str) -> int:
    return parse_size(value)


def _placement(yes: bool) -> list:
    """Flags that decide where the model lives: device, dtype, budgets, context and the expert slots; with
    `yes`, the consent a run from disk needs (commands that load the weights)."""
    options = [
        click.option("--device", default=None, help="cpu, cuda or cuda:N  [default: cuda if present, else cpu]"),
        click.option(
            "--dtype",
            type=_Registry("localmoe.loader", "DTYPES", first=("auto",)),
            default="auto",
            show_default=True,
            help="Compute dtype; auto: the checkpoint's.",
        ),
        click.option(
            "--vram-budget", help="Device memory to use, with a unit: 12GiB, 24GB  [default: what is free, less 5%]"
        ),
        click.option("--host-budget", help="Host RAM for the experts, with a unit: 32GiB  [default: available]"),
        click.option(
            "--expert-slots",
            type=click.IntRange(min=1),
            default=None,
            help="Expert slots on the device (overrides the plan).",
        ),
        click.option(
            "--context",
            "--ctx-size",
            "-c",
            "context",
            type=click.IntRange(min=1),
            default=None,
            help=f"Tokens of KV cache, at most the model's positions  [default: {DEFAULT_CONTEXT}, or fewer where the "
            "model has fewer]",
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
            default=None,
            help="Columns per scale, with --expert-bits 8 or 4  [default: the largest of 64, 62, ... 2 that divides "
            "the experts' widths]",
        ),
        click.option(
            "--threads",
            type=click.IntRange(min=1),
            help="CPU threads for the work the CPU does (experts computed on the CPU, and everything with "
            "--device cpu).  [default: the physical cores]",
        ),
    ]
    if yes:
        options.append(
            click.option(
                "--yes", is_flag=True, help="Start even a run estimated below 0.2 tokens/s (experts from disk)."
            )
        )
    return options


_placement_options = _options(_placement(yes=True))


def _cache_options(fn):
    """Flags of the expert cache and prefetch."""
    options = [
        click.option(
            "--policy",
            type=_Registry("localmoe.runtime.expert_cache", "POLICIES"),
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
            show_default=True,
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
            "--prefetch-margin",
            type=click.IntRange(min=0),
            default=DEFAULTS.prefetch_margin,
            show_default=True,
            help="Experts to prefetch beyond the router's top-k, with --prefetch 1 or more.",
        ),
        click.option(
            "--miss-policy",
            type=_Registry("localmoe.runtime.miss_policy", "MISS_POLICIES"),
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
            "--copy-bandwidth",
            type=click.FloatRange(min=0, min_open=True),
            help="GB/s of host-to-device copies, for --miss-policy auto  [default: measured once]",
        ),
        click.option(
            "--cpu-bandwidth",
            type=click.FloatRange(min=0, min_open=True),
            help="GB/s of expert weights the CPU gets through per token, for --miss-policy auto  [default: measured "
            "once]",
        ),
        click.option(
            "--kernels",
            type=_Registry("localmoe.kernels", "KERNELS"),
            default=DEFAULTS.kernels,
            show_default=True,
            help="Expert kernels: the PyTorch reference, the fused Triton kernels (CUDA), the compiled CPU "
            "kernels (--device cpu; built at first use), or the fastest that works here.",
        ),
        click.option(
            "--cuda-graphs",
            type=click.Choice(list(CUDA_GRAPHS)),
            default=DEFAULTS.cuda_graphs,
            show_default=True,
            help="Capture decode steps as CUDA graphs: auto where they can be (CUDA, fused kernels, direct misses, "
            "a model whose layers all run static steps), on (or an error saying why not), off.",
        ),
        click.option(
            "--trace", type=click.Path(dir_okay=False, path_type=Path), help="Write the routing as JSON lines."
        ),
    ]
    return _options(options)(fn)


_stats_option = click.option(
    "--stats", is_flag=True, help="Print the memory plan, the cache counters and speculative decoding's."
)
_speculative_options = _options(
    [
        click.option(
            "--speculative",
            type=click.Choice(list(SPECULATIVE)),
            default=None,
            help="Draft tokens and check them all in one forward pass: mtp (the checkpoint's multi-token-prediction "
            "layers), lookup (n-gram matches in the prompt and the output), off. Greedy decoding gives the tokens "
            "it gives without (see docs/speculative.md), sampling the same distribution.  [default: mtp where the "
            "checkpoint has MTP layers, else off]",
        ),
        click.option(
            "--draft-tokens",
            type=click.IntRange(1, MOST_DRAFT_TOKENS),
            default=None,
            help=f"Most drafted tokens checked per forward pass, with --speculative.  [default: {DRAFT_TOKENS}]",
        ),
    ]
)


def _sampling_options(fn):
    """Sampling flags, with the spellings of llama.cpp and mlx-lm beside ours; each left out keeps the
    checkpoint's default (generation_config.json)."""
    options = [
        click.option(
            "--temperature", "--temp", "temperature", type=float, help="0 is greedy.  [default: the checkpoint's]"
        ),
        click.option("--top-k", type=int, help="Sample among the K likeliest tokens.  [default: the checkpoint's]"),
        click.option(
            "--top-p",
            type=float,
            help="Sample among the likeliest tokens holding P of the probability.  [default: the checkpoint's]",
        ),
        click.option("--min-p", type=float, help="Drop tokens below P times the likeliest's probability."),
        click.option(
            "--repetition-penalty",
            "--repeat-penalty",
            "repetition_penalty",
            type=float,
            help="Divide the logits of tokens already seen by this (1: off).  [default: the checkpoint's]",
        ),
        click.option("--seed", type=int, help="Make sampling reproducible."),
        click.option(
            "--stop", multiple=True, callback=_text, help="Stop before this text (repeatable); it is not printed."
        ),
    ]
    return _options(options)(fn)


def _max_new_tokens(default: int, what: str):
    return click.option(
        "--max-new-tokens",
        "--max-tokens",
        "--n-predict",
        "-n",
        "max_new_tokens",
        type=click.IntRange(min=1),
        help=f"New tokens at most{what}; with the prompt, they must fit --context  [default: {default}, or what the "
        "context leaves]",
    )


_revision_option = click.option("--revision", default=None, help="Hub branch, tag or commit (for a repo id).")
_system_option = click.option(
    "--system",
    "--system-prompt",
    "system",
    default=None,
    callback=_text,
    help="System message (generate: with --chat).",
)


def _sampling(engine, values: dict):
    return engine.sampling(**{name: values[name] for name in SAMPLING_FLAGS})


def _check_sampling_flags(values: dict) -> None:
    """Bad sampling flags are refused before the model loads (the checkpoint's defaults once it does)."""
    from localmoe.runtime.sampling import SamplingParams

    SamplingParams.check_overrides(**{name: values[name] for name in SAMPLING_FLAGS})


def _load(model: str, revision: str | None, flags: dict, check=None):
    """Prepare MODEL, let `check(prepared)` refuse what would fail (a prompt too long, no chat template)
    before the weights are read, then place it."""
    from localmoe.engine import place, prepare, resolve_device

    device = str(resolve_device(flags["device"]))  # an unusable device is the first thing to say
    prepared = prepare(model, device=device, dtype=flags["dtype"], revision=revision, options=_runtime_options(flags))
    if check:
        check(prepared)
    _check_disk_speed(prepared, flags)
    engine = place(prepared)
    click.echo(engine.summary(), err=True)
    click.get_current_context().call_on_close(lambda: _save_profile(engine))
    return engine


def _save_profile(engine) -> None:
    try:
        engine.save_profile()
    except (OSError, LocalMoEError) as error:
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


def _runtime_options(flags: dict) -> RuntimeOptions:
    """The runtime settings among a command's flags (they share their names), those left out at their
    defaults."""
    _check_flags_take_effect(flags)
    given = {name: flags[name] for name in RuntimeOptions.__dataclass_fields__ if flags.get(name) is not None}
    return RuntimeOptions(**given)


def _check_flags_take_effect(flags: dict) -> None:
    """Refuse a flag that the others leave without effect, rather than ignore it."""
    from localmoe.runtime.miss_policy import MISS_POLICIES

    if flags.get("expert_group_size") is not None and flags["expert_bits"] == "16":
        raise LocalMoEError("--expert-group-size sets how experts are quantized: add --expert-bits 8 or 4")
    if flags.get("prefetch_margin") and flags.get("prefetch") == 0:
        raise LocalMoEError("--prefetch-margin widens prefetching, which --prefetch 0 turns off")
    bandwidths = flags.get("copy_bandwidth") is not None or flags.get("cpu_bandwidth") is not None
    misses = flags.get("miss_policy")
    if bandwidths and not (misses and MISS_POLICIES[misses].weighs_bandwidths):
        raise LocalMoEError(
            f"--copy-bandwidth and --cpu-bandwidth are weighed by --miss-policy auto, not {misses or 'the default'}"
        )


def _fits(tokens: int, asked: int | None, default: int, flag: str = "max_new_tokens"):
    """A check, before loading, that `asked` new tokens (the flag `flag`) after a prompt of `tokens` fit the
    planned context."""
    from localmoe.engine import fit_new_tokens

    return lambda prepared: fit_new_tokens(tokens, asked, default, prepared.plan, flag)


def _prompt_text(prompt: str | None, file: Path | None) -> str:
    """The prompt from -p TEXT, from standard input (-p -), or from --file."""
    if (prompt is None) == (file is None):
        raise LocalMoEError("give the prompt as --prompt TEXT, --prompt - (standard input) or --file PATH")
    try:
        if file is not None:
            return file.read_text(encoding="utf-8")
        return sys.stdin.read() if prompt == "-" else prompt
    except UnicodeDecodeError as error:
        raise LocalMoEError(f"the prompt is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise LocalMoEError(f"cannot read the prompt from {file}: {error.strerror or error}") from None


@main.command()
@click.argument("model")
@click.option("--prompt", "-p", default=None, callback=_text, help="Text to continue; - reads it from standard input.")
@click.option(
    "--file",
    "-f",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read the prompt from this file (UTF-8) instead.",
)
@_max_new_tokens(GENERATE_TOKENS, "")
@click.option("--chat", is_flag=True, help="Send the prompt as a user message through the chat template.")
@click.option(
    "--raw", is_flag=True, help="Encode the prompt exactly as written, adding no special tokens (code completion)."
)
@_system_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: the text, timings and counters.")
@click.option(
    "--json-schema",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Constrain the output to JSON that this JSON Schema file validates (needs localmoe[json]).",
)
@_revision_option
@_sampling_options
@_placement_options
@_cache_options
@_speculative_options
@_stats_option
def generate(
    model: str,
    prompt,
    file,
    max_new_tokens,
    chat: bool,
    raw: bool,
    system,
    as_json: bool,
    json_schema: Path | None,
    revision,
    **flags,
):
    """Print the continuation of a prompt. MODEL is a checkpoint folder or a Hub repo id."""
    from localmoe.engine import encode_prompt

    text = _prompt_text(prompt, file)
    if chat and raw:
        raise LocalMoEError("--chat and --raw exclude each other: --raw sends the prompt with no template at all")
    if system is not None and not chat:
        raise LocalMoEError("--system is a message for the chat template: add --chat")
    _check_sampling_flags(flags)
    schema = None
    if json_schema is not None:
        from localmoe.grammar import read_schema

        schema = read_schema(json_schema)
    messages = [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": text}]
    prompt_in = messages if chat else text

    def check(prepared) -> None:
        _fits(len(encode_prompt(prepared.tokenizer, prompt_in, raw)), max_new_tokens, GENERATE_TOKENS)(prepared)

    engine = _load(model, revision, flags, check)
    settings = {name: flags[name] for name in SAMPLING_FLAGS}
    pieces = engine.stream(prompt_in, max_new_tokens, **settings, stop=flags["stop"], raw=raw, json_schema=schema)
    if as_json:
        click.echo(json.dumps(_report(engine, "".join(pieces)), indent=2))
        if flags["stats"]:
            click.echo(engine.cache_report(), err=True)
        return
    _stream(engine, pieces, flags["stats"])


@main.command()
@click.argument("model")
@_system_option
@_max_new_tokens(CHAT_TOKENS, " per answer")
@_revision_option
@_sampling_options
@_placement_options
@_cache_options
@_speculative_options
def chat(model: str, system: str | None, max_new_tokens: int | None, revision: str | None, **flags):
    """Chat with MODEL. In a terminal: a prompt with history and /commands (/help). With piped input:
    each line is a message, and the answers are printed as plain text."""
    from localmoe.chat import ChatSession, run

    _check_sampling_flags(flags)

    def check(prepared) -> None:
        _fits(1, max_new_tokens, CHAT_TOKENS)(prepared)
        # a checkpoint without a chat template is refused before its weights are read
        prepared.tokenizer.render_chat([{"role": "user", "content": "hi"}])

    engine = _load(model, revision, flags, check)
    per_answer = max_new_tokens or CHAT_TOKENS  # the session gives each answer what the context leaves, at most
    session = ChatSession(engine, _sampling(engine, flags), per_answer, list(flags["stop"]), system)
    run(session, interactive=sys.stdin.isatty())


@main.command()
@click.argument("model")
@_revision_option
@_options(_placement(yes=False))
@_speculative_options
def plan(model: str, revision: str | None, **flags):
    """Print where MODEL's weights would live, without loading them. A Hub model's shards are not
    downloaded: their headers are read from the Hub. Works without the GPU: give --device cuda
    --vram-budget SIZE to plan for a card that is not here."""
    from localmoe.checkpoint import read_bandwidth
    from localmoe.engine import prepare

    prepared = prepare(
        model,
        device=flags["device"],
        dtype=flags["dtype"],
        revision=revision,
        options=_runtime_options(flags),
        headers_only=True,
    )
    plan, here = prepared.plan, prepared.checkpoint.weights_here
    bandwidth = read_bandwidth(prepared.checkpoint.path) if plan.store == "mmap" and here else None
    click.echo(plan.describe(bandwidth))
    if plan.store == "mmap" and not here:
        click.echo("disk tier: the disk's speed is measured once the shards are downloaded (generate does it)")


@main.command()
@click.argument("model")
@click.option("--tokens", default=16, show_default=True, type=click.IntRange(min=2), help="Decode tokens per run.")
@click.option(
    "--repeats", default=3, show_default=True, type=click.IntRange(min=2), help="Runs of each setting (median)."
)
@_revision_option
@_placement_options
def tune(model: str, tokens: int, repeats: int, revision: str | None, **flags):
    """Try expert cache settings on this machine within the budget and print a command with the fastest."""
    from localmoe.tune import Tuner

    engine = _load(model, revision, flags, _fits(len(BENCH_PROMPT), tokens, tokens, "tokens"))
    base = _placement_flags(model, revision, flags, engine)
    if engine.expert_cache() is None:
        click.echo("every expert fits on the device: there is no expert cache to tune. Run:")
        click.echo(shlex.join(["localmoe", "generate", *base, *PASTED_PROMPT]))
        return

    def report(setting, timing) -> None:
        slots = setting.slots or engine.plan.slots
        runs = ", ".join(f"{rate:.2f}" for rate in timing.rates)
        click.echo(
            f"{timing.median:8.2f} tok/s ({runs})  hit rate {timing.hit_rate:.3f}  {slots} slots  {setting.flags()}"
        )

    click.echo(f"decode tokens/s over {tokens} tokens, median of {repeats} runs, {engine.plan.slots} expert slots:")
    best = Tuner(engine, _bench_prompt(engine), tokens, report, repeats).run()
    click.echo("fastest: " + shlex.join(["localmoe", "generate", *base, *best.flags().split(), *PASTED_PROMPT]))


@main.command()
@click.argument("model")
@click.option("--tokens", default=32, show_default=True, type=click.IntRange(min=2), help="Decode tokens.")
@click.option("--markdown", is_flag=True, help="Print the table in Markdown.")
@_revision_option
@_placement_options
@_cache_options
@_speculative_options
@_stats_option
def bench(model: str, tokens: int, markdown: bool, revision: str | None, **flags):
    """Measure prefill and decode speed on this machine, against the physical floor; with speculative
    decoding, with and without it (its acceptance, and so its speed, needs a real checkpoint and text)."""
    from localmoe.bench import decode_floor, measure_bandwidth, results_table, run_engine

    engine = _load(model, revision, flags, _fits(len(BENCH_PROMPT), tokens, tokens, "tokens"))
    result = run_engine(engine, "localmoe", _bench_prompt(engine), tokens, speculative=False)
    results = [result]
    if engine.speculative != "off":
        name = f"localmoe, speculative {engine.speculative}"
        results.append(run_engine(engine, name, _bench_prompt(engine), tokens))
    floor = decode_floor(engine.plan.footprint, measure_bandwidth(engine.device), result.bytes_copied_per_token or 0)
    click.echo(results_table(results, floor["floor_s"], markdown=markdown))
    click.echo(f"floor: {floor['floor_s'] * 1000:.1f} ms per token, set by {floor['bound']}")
    if flags["stats"]:
        click.echo(engine.cache_report(), err=True)


BENCH_PROMPT = range(32)  # a fixed prompt of 32 token ids (no tokenizer needed)
PASTED_PROMPT = ["--prompt", "Once upon a time"]  # for the command `tune` prints, which must run when pasted


def _bench_prompt(engine) -> list[int]:
    vocab = engine.model.model.embed_tokens.weight.shape[0]
    return [(7 * i + 3) % min(vocab, 1000) for i in BENCH_PROMPT]


def _placement_flags(model: str, revision: str | None, flags: dict, engine) -> list[str]:
    """The flags that reproduce this engine's placement, for a command line to paste."""
    from localmoe.runtime.memory import flag_size

    words = [model, *(["--revision", revision] if revision else []), "--device", str(engine.device)]
    words += ["--context", str(engine.plan.context)]
    if flags["dtype"] != "auto":
        words += ["--dtype", flags["dtype"]]
    if engine.options.expert_bits != 16:
        words += ["--expert-bits", str(engine.options.expert_bits)]
        words += ["--expert-group-size", str(engine.options.expert_group_size)] if flags["expert_group_size"] else []
    if flags["host_budget"] is not None:
        words += ["--host-budget", flags["host_budget"]]
    if flags["yes"]:
        words += ["--yes"]
    if not engine.plan.all_resident:
        words += ["--vram-budget", flag_size(engine.plan.device_budget), "--expert-slots", str(engine.plan.slots)]
    return words


@main.command()
@click.argument("model")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (localhost only by default)."
)
@click.option("--port", default=8000, show_default=True, type=int, callback=_port, help="TCP port to listen on.")
@click.option(
    "--api-key",
    default=None,
    help="Require `Authorization: Bearer KEY` (or `x-api-key: KEY`) on every endpoint but /health.",
)
@click.option(
    "--served-model-name",
    "--name",
    "names",
    multiple=True,
    help="A model name clients may use (repeatable)  [default: the Hub id and its last part, or the folder's name].",
)
@click.option("--queue", default=8, show_default=True, type=click.IntRange(min=1), help="Requests that may wait.")
@click.option(
    "--max-tokens-limit",
    default=None,
    type=click.IntRange(min=1),
    help="Largest max_tokens a request may ask; it must fit --context  [default: the context]",
)
@click.option(
    "--max-body", default="4MiB", show_default=True, callback=_size, help="Largest request body; larger ones get 413."
)
@click.option(
    "--cors",
    multiple=True,
    help="A browser origin allowed to call the API, e.g. http://localhost:3000 (repeatable; * allows any). "
    "Requests from other origins get 403.",
)
@click.option(
    "--timeout-keep-alive",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Seconds an idle connection stays open.",
)
@click.option(
    "--header-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a client has to send a request's headers.",
)
@click.option(
    "--limit-concurrency",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Open connections beyond which new requests get 503.",
)
@_revision_option
@_sampling_options
@_placement_options
@_cache_options
@_speculative_options
def serve(model, host, port, api_key, names, queue, max_tokens_limit, max_body, cors, revision, **flags):
    """Serve MODEL over the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) and Anthropic's
    (/v1/messages), with /health and /metrics, one generation at a time. Sampling flags set the
    defaults that requests may override."""
    try:
        import uvicorn

        from localmoe.server import Server, is_loopback, protocol_with_header_timeout
    except ImportError:
        raise LocalMoEError("localmoe serve needs its extra: pip install 'localmoe[serve]'") from None
    _check_sampling_flags(flags)
    if not is_loopback(host) and api_key is None:
        click.secho(
            f"localmoe: WARNING: listening on {host} without --api-key: anyone who can reach this address can use "
            "the model. Give --api-key KEY, or keep --host 127.0.0.1.",
            err=True,
            fg="red",
            bold=True,
        )
    engine = _load(model, revision, flags, _fits(1, max_tokens_limit, 1, "max_tokens_limit"))
    served = list(names or _default_names(model))
    server = Server(
        engine,
        served,
        api_key,
        queue,
        max_tokens_limit or engine.plan.context,
        max_body=max_body,
        cors=tuple(cors),
        sampling=_sampling(engine, flags),
        stop=tuple(flags["stop"]),
        host=host,
    )
    logging.basicConfig(level=logging.INFO, format="localmoe: %(message)s")
    click.echo(f"serving {', '.join(served)} on http://{host}:{port}/v1", err=True)
    _exit_on_sigterm_as_on_ctrl_c()
    uvicorn.run(
        server.app(),
        host=host,
        port=port,
        log_level="warning",
        http=protocol_with_header_timeout(flags["header_timeout"]),
        timeout_keep_alive=flags["timeout_keep_alive"],
        limit_concurrency=flags["limit_concurrency"],
    )


def _default_names(model: str) -> list[str]:
    """A Hub id and its last part ("Qwen/Qwen3-30B-A3B", "Qwen3-30B-A3B"); a folder by its name only, so
    that no path of this machine is shown to clients."""
    last = model.rstrip("/").split("/")[-1]
    return [last] if Path(model).exists() else list(dict.fromkeys([model, last]))


def _exit_on_sigterm_as_on_ctrl_c() -> None:
    """systemd and docker stop with SIGTERM: end as Ctrl-C does, the routing profile saved. uvicorn shuts
    down gracefully on either signal, then raises it again: SIGINT's KeyboardInterrupt, which uvicorn.run
    swallows, and SIGTERM's default action, which would kill the process before the profile is written."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


@main.command()
@click.option("--markdown", is_flag=True, help="Print the table in Markdown (as README.md shows it).")
def families(markdown: bool):
    """List the model families localmoe runs, with an example Hub id for each."""
    from localmoe.models import families_table

    click.echo(families_table(markdown))


@main.group(invoke_without_command=True)
@click.option(
    "--recalibrate",
    is_flag=True,
    help="Forget the measured copy and CPU bandwidths: the next run with --miss-policy auto measures them again.",
)
@click.pass_context
def cache(ctx: click.Context, recalibrate: bool):
    """List what localmoe keeps in its cache folder ($LOCALMOE_CACHE): quantized experts per checkpoint and
    setting, routing profiles, the bandwidth calibration, the demo checkpoint; `cache rm NAME...` removes
    entries. All of it is rebuilt or measured again when needed; downloaded models are not here."""
    from localmoe.cache import entries, remove
    from localmoe.paths import cache_dir
    from localmoe.runtime.cpu_experts import CALIBRATION_FILE

    if recalibrate:
        calibration = [entry for entry in entries() if entry.name == CALIBRATION_FILE]
        _removed(remove([CALIBRATION_FILE]) if calibration else [])
    if ctx.invoked_subcommand is None and not recalibrate:
        from localmoe.runtime.memory import format_bytes
        from localmoe.tables import render

        kept = entries()
        click.echo(f"{cache_dir()}: {format_bytes(sum(entry.size for entry in kept))}")
        rows = [[e.kind, e.checkpoint, e.detail, format_bytes(e.size) if e.size else "", e.name] for e in kept]
        if rows:
            click.echo(render(["kind", "checkpoint", "detail", "size", "name (for cache rm)"], rows))


@cache.command("rm")
@click.argument("names", nargs=-1, required=True)
def cache_rm(names: tuple[str, ...]):
    """Remove NAMES from localmoe's cache folder: entries by the name `localmoe cache` lists, or all of a
    checkpoint's (its quantized experts and routing profile) by the checkpoint's name."""
    from localmoe.cache import remove

    _removed(remove(list(names)))


def _removed(entries) -> None:
    from localmoe.runtime.memory import format_bytes

    for entry in entries:
        click.echo(f"removed {entry.name} ({entry.kind}, {format_bytes(entry.size)})")
    if not entries:
        click.echo("nothing to remove")


@main.command()
@click.option(
    "--prompt", "-p", default="The quick brown fox", show_default=True, callback=_text, help="Text to continue."
)
@click.option(
    "--max-new-tokens", "-n", default=48, show_default=True, type=click.IntRange(min=1), help="New tokens at most."
)
@click.option("--device", default=None, help="cpu, cuda or cuda:N  [default: cuda if present, else cpu]")
def demo(prompt: str, max_new_tokens: int, device: str | None):
    """Generate with a tiny random-weight MoE checkpoint, no download needed, with a quarter of its
    experts in device slots so that the expert cache is at work; prints the cache counters."""
    from localmoe.demo import DEMO_CONFIG, demo_checkpoint
    from localmoe.engine import load

    folder = demo_checkpoint()
    click.echo(
        f"localmoe demo: a tiny Mixtral-shaped checkpoint with RANDOM weights ({folder}); the text below is "
        "noise, it shows that loading, the expert cache and generation work.",
        err=True,
    )
    total = DEMO_CONFIG["num_hidden_layers"] * DEMO_CONFIG["num_local_experts"]
    engine = load(str(folder), device=device, expert_slots=total // 4)
    click.echo(engine.summary(), err=True)
    _stream(engine, engine.stream(prompt, max_new_tokens), stats=True)


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
        "experts_loaded_per_token": stats.loaded_per_token,
        "speculation": None if stats.speculation is None else stats.speculation.as_dict(),
        "device": engine.plan.device,
        "expert_slots": engine.plan.slots if cache is None else cache.slots,
        "total_experts": engine.plan.footprint.total_experts,
        "cache": None if cache is None else {**asdict(cache.total), "hit_rate": cache.total.hit_rate},
        "cache_per_layer": None if cache is None else {str(k): asdict(v) for k, v in cache.per_layer.items()},
    }
