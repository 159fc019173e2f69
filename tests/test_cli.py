"""The `localmoe` command: output, one-line errors with exit status 2, the demo, and no transformers."""

import json
import os
import subprocess
import sys

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
    assert "misses: auto (copy 1.0 GB/s, CPU 1.5 GB/s)" in auto.stderr


def test_a_run_keeps_a_routing_profile_that_the_next_starts_from(tiny_mixtral, tmp_path):
    env = {"LOCALMOE_CACHE": str(tmp_path)}
    args = ["generate", str(tiny_mixtral), "-p", "Hello", "-n", "8", "--device", "cpu", "--expert-slots", "4"]
    first = run(*args, "--stats", env=env)
    assert first.exit_code == 0, first.output
    [profile] = (tmp_path / "profiles").iterdir()
    data = json.loads(profile.read_text())
    assert sum(data["tokens"].values()) > 0 and "warm-up copies: 0" in first.stderr
    second = run(*args, "--pin-hot", "1", "--stats", env=env)
    assert second.exit_code == 0 and second.stdout == first.stdout
    assert "warm-up copies: 0" not in second.stderr and "pinned experts: 1" in second.stderr
    assert json.loads(profile.read_text())["tokens"] != data["tokens"]  # updated when the run ended
    off = run(*args, "--profile", "off", env={"LOCALMOE_CACHE": str(tmp_path / "other")})
    assert off.exit_code == 0 and not (tmp_path / "other" / "profiles").exists()
    profile.write_text("{")
    broken = run(*args, env=env)
    assert broken.exit_code == 2 and "is not a routing profile" in broken.stderr


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

    args = ["--device", "cpu", "--host-budget", "1", "--expert-slots", "2"]  # the experts stay in the files
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
    ],
)
def test_errors_are_one_line_with_status_2(tiny_mixtral, args, needle):
    result = run(*[arg.replace("{ckpt}", str(tiny_mixtral)) for arg in args])
    assert result.exit_code == 2
    # the error is the last line, after at most the one-line summary of what was loaded
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 2 and lines[-1].startswith("localmoe: error: ") and needle in lines[-1]
    assert "Traceback" not in result.stderr


def test_missing_tokenizer_is_an_error(tiny_mixtral):
    (tiny_mixtral / "tokenizer.json").unlink()
    result = run("generate", str(tiny_mixtral), "-p", "hi")
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
