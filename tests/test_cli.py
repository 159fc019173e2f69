"""The `localmoe` command: output, one-line errors with exit status 2, the demo, and no transformers."""

import json
import os
import shutil
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

import localmoe
from localmoe.cli import main


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, list(args), env=env)


def test_generate_prints_the_greedy_continuation(tiny_mixtral):
    result = run("generate", str(tiny_mixtral), "--prompt", "Hello", "-n", "12", "--device", "cpu")
    assert result.exit_code == 0, result.output
    engine = localmoe.load(str(tiny_mixtral), device="cpu")
    expected = "".join(engine.generate("Hello", 12))
    assert result.stdout == expected + "\n"
    assert "generated: " in result.stderr


def test_misses_computed_on_the_cpu_give_the_same_text(tiny_mixtral):
    args = ["generate", str(tiny_mixtral), "--prompt", "Hello", "-n", "12", "--device", "cpu", "--expert-slots", "2"]
    copied = run(*args, "--miss-policy", "copy")
    on_cpu = run(*args, "--miss-policy", "cpu", "--stats")
    auto = run(*args, "--miss-policy", "auto", "--copy-bandwidth", "1", "--cpu-bandwidth", "1.5")
    assert copied.exit_code == on_cpu.exit_code == auto.exit_code == 0, on_cpu.output
    assert copied.stdout == on_cpu.stdout == auto.stdout
    assert "misses: cpu" in on_cpu.stderr and "computed on the CPU from the host store" in on_cpu.stderr
    assert "misses: auto (copy 1 GB/s, CPU 1.5 GB/s)" in auto.stderr


def test_a_run_keeps_a_routing_profile_that_the_next_starts_from(tiny_mixtral, tmp_path):
    env = {"LOCALMOE_CACHE": str(tmp_path)}
    args = ["generate", str(tiny_mixtral), "-p", "Hello", "-n", "8", "--device", "cpu", "--expert-slots", "4"]
    first = run(*args, "--stats", env=env)
    assert first.exit_code == 0, first.output
    [profile] = (tmp_path / "profiles").glob("*.json")
    data = json.loads(profile.read_text())
    assert sum(data["tokens"].values()) > 0 and "warm-up copies: 0" in first.stderr
    second = run(*args, "--pin-hot", "1", "--stats", env=env)
    assert second.exit_code == 0 and second.stdout == first.stdout
    assert "warm-up copies: 0" not in second.stderr and "pinned experts: 1" in second.stderr
    assert json.loads(profile.read_text())["tokens"] != data["tokens"]  # updated when the run ended
    off = run(*args, "--profile", "off", env={"LOCALMOE_CACHE": str(tmp_path / "other")})
    assert off.exit_code == 0 and not (tmp_path / "other" / "profiles").exists()
    profile.write_text("{")  # localmoe's own: started again, with a notice
    broken = run(*args, env=env)
    assert (
        broken.exit_code == 0 and "is not a routing profile" in broken.stderr and "starting a new one" in broken.stderr
    )
    assert json.loads(profile.read_text())["format"] == 1
    # the user's own file, which is not a profile: named, refused, and neither written nor to be deleted
    theirs = run(*args, "--profile", str(tiny_mixtral / "config.json"), env=env)
    assert theirs.exit_code == 2 and "config.json is not a routing profile" in theirs.stderr
    assert "delete" not in theirs.stderr and len(theirs.stderr.strip().splitlines()) <= 2


def test_raw_adds_no_special_tokens(tiny_mixtral):
    engine = localmoe.load(str(tiny_mixtral), device="cpu")
    assert engine.tokenizer.encode("def f(") != engine.tokenizer.encode("def f(", add_special_tokens=False)
    result = run("generate", str(tiny_mixtral), "-p", "def f(", "-n", "8", "--device", "cpu", "--raw")
    ids = engine.tokenizer.encode("def f(", add_special_tokens=False)
    assert result.exit_code == 0 and result.stdout == "".join(engine.text(engine.generate_ids(ids, 8))) + "\n"
    both = run("generate", str(tiny_mixtral), "-p", "x", "--raw", "--chat")
    assert both.exit_code == 2 and "--chat and --raw exclude each other" in both.stderr


def test_a_run_from_disk_says_how_slow_and_waits_for_yes(tiny_mixtral, monkeypatch):
    import localmoe.checkpoint

    args = ["--device", "cpu", "--host-budget", "1B", "--expert-slots", "2"]  # the experts stay in the files
    monkeypatch.setattr(localmoe.checkpoint, "read_bandwidth", lambda folder: 1e6)
    planned = run("plan", str(tiny_mixtral), *args)
    assert (
        planned.exit_code == 0
        and "disk tier: the experts without a slot are read from disk at about 1 MB/s" in planned.stdout
    )
    monkeypatch.setattr(localmoe.checkpoint, "read_bandwidth", lambda folder: 100.0)  # a very slow disk
    refused = run("generate", str(tiny_mixtral), "-p", "hi", "-n", "2", *args)
    assert refused.exit_code == 2 and "pass --yes to start it anyway" in refused.stderr
    assert "disk tier" in refused.stderr
    started = run("generate", str(tiny_mixtral), "-p", "hi", "-n", "2", *args, "--yes")
    assert started.exit_code == 0, started.output


@pytest.mark.parametrize(
    "args,needle",
    [
        (["generate", "/no/such/model", "-p", "hi"], "no such folder"),
        (["generate", "{ckpt}", "-p", "hi", "--device", "cuda:7"], "cuda:7"),
        (["generate", "{ckpt}", "-p", "x" * 300, "-n", "4"], "exceeds the 256-token context"),
        (["generate", "{ckpt}", "-p", "hi", "--device", "tpu"], "unknown device"),
        # the bytes of a Latin-1 "é" in the shell: Python sees a lone surrogate
        (["generate", "{ckpt}", "-p", "caf\udce9"], "--prompt is not valid UTF-8 text (byte 0xe9)"),
        (["chat", "{ckpt}", "--system", "\udcff"], "--system is not valid UTF-8 text (byte 0xff)"),
        (["generate", "{ckpt}", "-p", "hi", "--stop", "ok", "--stop", "\udc80"], "--stop is not valid UTF-8"),
        (["serve", "{ckpt}", "--port", "99999"], "--port 99999 is not a TCP port"),
        (["generate", "{ckpt}", "-p", "hi", "--trace", "/no/such/folder/t.jsonl"], "cannot write the routing trace"),
    ],
)
def test_errors_are_one_line_with_status_2(tiny_mixtral, args, needle):
    result = run(*[arg.replace("{ckpt}", str(tiny_mixtral)) for arg in args])
    assert result.exit_code == 2
    # the error is the last line, after at most the one-line summary of what was loaded
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 2 and lines[-1].startswith("localmoe: error: ") and needle in lines[-1]
    assert "Traceback" not in result.stderr


def test_missing_tokenizer_is_an_error(tiny_mixtral, tmp_path):
    without = shutil.copytree(tiny_mixtral, tmp_path / "without-tokenizer")
    (without / "tokenizer.json").unlink()
    result = run("generate", str(without), "-p", "hi")
    assert result.exit_code == 2 and "no tokenizer.json" in result.stderr


def test_demo_writes_once_then_reuses(tmp_path):
    env = {"LOCALMOE_CACHE": str(tmp_path)}
    first = run("demo", "-n", "8", env=env)
    assert first.exit_code == 0, first.output
    assert "RANDOM weights" in first.stderr
    folder = tmp_path / "demo-mixtral-tiny-v1"
    assert (folder / "model.safetensors.index.json").is_file()
    stamp = (folder / "config.json").stat().st_mtime_ns
    second = run("demo", "-n", "8", env=env)
    assert second.exit_code == 0 and second.stdout == first.stdout
    assert (folder / "config.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_a_full_generate_never_imports_transformers(tiny_mixtral, tmp_path):
    """In a fresh interpreter: the package, the Hub path (offline, from the cache) and a generation."""
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--tiny--mixtral"
    (repo / "snapshots").mkdir(parents=True)
    (repo / "snapshots" / commit).symlink_to(tiny_mixtral, target_is_directory=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = (
        "import sys\n"
        "from localmoe.cli import main\n"
        "try:\n"
        "    main(['generate', 'tiny/mixtral', '-p', 'Hi', '-n', '4', '--device', 'cpu'])\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "generated: " in done.stderr


@pytest.mark.slow
def test_error_exit_from_a_real_process_has_no_traceback():
    done = subprocess.run(
        [sys.executable, "-m", "localmoe", "generate", "/no/such/model", "-p", "hi"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("localmoe: error: no such folder")


def test_every_flag_says_what_it_does():
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"localmoe {name} {param.opts[0]} has no help text"


def test_help_starts_without_torch():
    script = (
        "import sys\n"
        "from localmoe.cli import main\n"
        "main(['--help'], standalone_mode=False)\n"
        "assert 'torch' not in sys.modules, 'localmoe --help imported torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "generate" in done.stdout


def test_the_prompt_from_standard_input_or_a_file(tiny_mixtral, tmp_path):
    args = ["generate", str(tiny_mixtral), "-n", "6", "--device", "cpu"]
    typed = run(*args, "-p", "Hello there")
    piped = CliRunner().invoke(main, [*args, "-p", "-"], input="Hello there")
    (tmp_path / "prompt.txt").write_text("Hello there", encoding="utf-8")
    read = run(*args, "--file", str(tmp_path / "prompt.txt"))
    assert typed.exit_code == piped.exit_code == read.exit_code == 0, piped.output
    assert typed.stdout == piped.stdout == read.stdout
    for wrong in ([], ["-p", "x", "--file", str(tmp_path / "prompt.txt")]):
        refused = run(*args, *wrong)
        assert refused.exit_code == 2 and "give the prompt as --prompt TEXT" in refused.stderr


def test_the_spellings_of_llama_cpp_and_mlx_lm():
    ours = main.commands["generate"].make_context(
        "generate",
        ["m", "-p", "x", "--temperature", "0.5", "--repetition-penalty", "1.1", "-n", "7", "--context", "64"],
    )
    theirs = main.commands["generate"].make_context(
        "generate", ["m", "-p", "x", "--temp", "0.5", "--repeat-penalty", "1.1", "--max-tokens", "7", "-c", "64"]
    )
    assert ours.params == theirs.params
    llama = main.commands["chat"].make_context(
        "chat", ["m", "--n-predict", "7", "--ctx-size", "64", "--system-prompt", "S"]
    )
    assert (llama.params["max_new_tokens"], llama.params["context"], llama.params["system"]) == (7, 64, "S")


def test_revision_of_a_local_folder_is_refused(tiny_mixtral):
    result = run("plan", str(tiny_mixtral), "--revision", "v2", "--device", "cpu")
    assert result.exit_code == 2 and "is a local folder: --revision picks a revision of a Hub repo" in result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["plan", "m", "--yes"], "No such option '--yes'"),
        (["chat", "m", "--stats"], "No such option '--stats'"),
        (["serve", "m", "--stats"], "No such option '--stats'"),
        (["generate", "m", "-p", "x", "--system", "S"], "--system is a message for the chat template: add --chat"),
        (["plan", "m", "--expert-group-size", "32"], "--expert-group-size sets how experts are quantized"),
        (["generate", "m", "-p", "x", "--prefetch", "0", "--prefetch-margin", "2"], "--prefetch 0 turns off"),
        (["generate", "m", "-p", "x", "--miss-policy", "copy", "--cpu-bandwidth", "5"], "not copy"),
    ],
)
def test_a_flag_that_would_do_nothing_is_refused(args, message):
    result = run(*args)
    assert result.exit_code == 2 and message in result.stderr, result.output


def test_chat_without_a_template_says_so_before_loading(tiny_mixtral, monkeypatch):
    import localmoe.engine

    monkeypatch.setattr(localmoe.engine, "place", lambda prepared: pytest.fail("the weights were loaded"))
    for args in (["chat"], ["generate", "-p", "hi", "--chat"]):
        result = run(args[0], str(tiny_mixtral), *args[1:], "--device", "cpu")
        assert result.exit_code == 2 and "has no chat template" in result.stderr, result.output


def test_one_rule_for_lengths_before_loading(tiny_mixtral, monkeypatch):
    """The tiny model has 256 positions: a context beyond them, or new tokens beyond the context, are refused
    on every command before a weight is read; left out, the defaults fit."""
    import localmoe.engine

    monkeypatch.setattr(localmoe.engine, "place", lambda prepared: pytest.fail("the weights were loaded"))
    model = str(tiny_mixtral)
    for args, message in [
        (["generate", model, "-p", "Hello", "-n", "300"], "plus 300 new tokens exceeds the 256-token context"),
        (["generate", model, "-p", "Hello", "-n", "100", "-c", "64"], "exceeds the 64-token context"),
        (["generate", model, "-p", "Hello", "--context", "1000"], "--context 1000 is out of range"),
        (["chat", model, "-n", "256"], "plus 256 new tokens exceeds the 256-token context"),
        (
            ["bench", model, "--tokens", "250"],
            "plus 250 new tokens exceeds the 256-token context: shorten the prompt, lower --tokens",
        ),
        (["tune", model, "--tokens", "250"], "lower --tokens"),
        (["serve", model, "--max-tokens-limit", "300"], "lower --max-tokens-limit"),
    ]:
        result = run(*args, "--device", "cpu")
        assert result.exit_code == 2 and message in result.stderr, (args, result.output)


def test_families_prints_an_aligned_table_or_markdown():
    from localmoe.models import FAMILIES, families_table

    aligned = run("families").stdout.splitlines()
    assert "|" not in "".join(aligned) and len(aligned) == len(FAMILIES) + 2
    column = aligned[0].index("model_type")
    assert all(line[column - 2 : column] == "  " for line in aligned[2:])  # every row's second column lines up
    assert run("families", "--markdown").stdout == families_table(markdown=True) + "\n"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--temperature", "nan"], "temperature"),
        (["--repetition-penalty", "nan"], "repetition_penalty"),
        (["--seed", str(2**70)], "seed"),
    ],
)
def test_sampling_flags_are_checked_before_loading(tmp_path, args, needle):
    """The model does not exist: the flag's error comes first, so nothing was loaded."""
    result = CliRunner().invoke(main, ["generate", str(tmp_path / "missing"), "-p", "x", *args])
    assert result.exit_code == 2 and needle in result.output and "missing" not in result.output


def test_serve_warns_loudly_on_a_public_host_without_a_key(tmp_path):
    result = CliRunner().invoke(main, ["serve", str(tmp_path / "missing"), "--host", "0.0.0.0"])
    assert "WARNING" in result.output and "--api-key" in result.output and result.exit_code == 2
    result = CliRunner().invoke(main, ["serve", str(tmp_path / "missing"), "--port", "99999"])
    assert result.exit_code == 2 and "99999" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_sigterm_saves_the_routing_profile_as_ctrl_c_does(tiny_mixtral, tmp_path, signal_name):
    """systemd's and docker's stop (SIGTERM) ends the server as Ctrl-C (SIGINT) does: a clean exit
    with the routing profile written."""
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    profile = tmp_path / "profile.json"
    command = [sys.executable, "-m", "localmoe", "serve", str(tiny_mixtral), "--device", "cpu", "--port", str(port)]
    command += ["--expert-slots", "6", "--profile", str(profile)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        for _ in range(600):  # the model loads, then uvicorn listens
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                time.sleep(0.2)
        body = json.dumps({"prompt": "Hello", "max_tokens": 4}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"}
        )
        assert json.load(urllib.request.urlopen(request, timeout=120))["usage"]["completion_tokens"] == 4
        process.send_signal(getattr(signal, signal_name))
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
    assert json.loads(profile.read_text())["counts"]  # written on the way out


def test_default_model_names_show_no_local_path(tmp_path):
    from localmoe.cli import _default_names

    assert _default_names("Qwen/Qwen3-30B-A3B") == ["Qwen/Qwen3-30B-A3B", "Qwen3-30B-A3B"]
    assert _default_names(str(tmp_path)) == [tmp_path.name]
