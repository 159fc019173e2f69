"""The `localmoe` command."""

import sys

import click
import torch

from localmoe.errors import LocalMoEError

DTYPE_CHOICES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Commands(click.Group):
    """Prints a LocalMoEError as one line and exits 2, instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LocalMoEError as error:
            click.echo(f"localmoe: error: {error}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("", err=True)
            ctx.exit(130)


@click.group(cls=_Commands)
@click.version_option(package_name="localmoe")
def main():
    """Run Mixture-of-Experts models from Hugging Face checkpoints."""


def _run_options(fn):
    fn = click.option("--max-new-tokens", "-n", default=128, show_default=True, type=click.IntRange(min=1))(fn)
    fn = click.option("--device", default=None, help="cpu, cuda or cuda:N  [default: cuda if present, else cpu]")(fn)
    fn = click.option(
        "--dtype",
        type=click.Choice(list(DTYPE_CHOICES)),
        default="auto",
        help="Compute dtype; auto: the checkpoint's.",
    )(fn)
    return fn


@main.command()
@click.argument("model")
@click.option("--prompt", "-p", required=True, help="Text to continue.")
@_run_options
@click.option("--revision", default=None, help="Hub branch, tag or commit (for a repo id).")
def generate(model: str, prompt: str, max_new_tokens: int, device: str | None, dtype: str, revision: str | None):
    """Print the greedy continuation of PROMPT. MODEL is a checkpoint folder or a Hub repo id."""
    from localmoe.engine import load

    engine = load(model, device=device, dtype=DTYPE_CHOICES[dtype], revision=revision)
    _stream(engine, prompt, max_new_tokens)


@main.command()
@click.option("--prompt", "-p", default="The quick brown fox", show_default=True)
@_run_options
def demo(prompt: str, max_new_tokens: int, device: str | None, dtype: str):
    """Generate with a tiny random-weight MoE checkpoint: no download needed."""
    from localmoe.demo import demo_checkpoint
    from localmoe.engine import load

    folder = demo_checkpoint()
    click.echo(
        f"localmoe demo: a tiny Mixtral-shaped checkpoint with RANDOM weights ({folder}); the text below is "
        "noise, it shows that loading and generation work.",
        err=True,
    )
    engine = load(str(folder), device=device, dtype=DTYPE_CHOICES[dtype])
    _stream(engine, prompt, max_new_tokens)


def _stream(engine, prompt: str, max_new_tokens: int) -> None:
    for piece in engine.generate(prompt, max_new_tokens):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    click.echo(f"[{engine.stats.summary()}]", err=True)
