"""`localmoe cache`: what localmoe keeps in its cache folder, listed with sizes and removed by name."""

import json

from click.testing import CliRunner

from localmoe.cli import main


def test_cache_lists_and_removes_what_localmoe_keeps(tiny_mixtral, tmp_path):
    env = {"LOCALMOE_CACHE": str(tmp_path)}

    def run(*args):
        return CliRunner().invoke(main, list(args), env=env)

    args = ["-p", "Hi", "-n", "3", "--device", "cpu", "--expert-slots", "4", "--expert-bits", "8"]
    args += ["--miss-policy", "auto"]  # which calibrates
    assert run("generate", str(tiny_mixtral), *args).exit_code == 0
    listed = run("cache")
    assert listed.exit_code == 0, listed.output
    rows = listed.stdout.splitlines()[3:]  # under the folder's line, the header and its rule
    kinds = {row.split("  ")[0] for row in rows}
    assert {"quantized experts", "routing profile", "calibration"} <= kinds
    [quantized] = [row for row in rows if row.startswith("quantized experts")]
    assert "mixtral" in quantized and "bits=8 group=32" in quantized and "KiB" in quantized
    [profile] = (tmp_path / "profiles").glob("*.json")

    removed = run("cache", "rm", f"profiles/{profile.name}")
    assert removed.exit_code == 0 and not profile.exists() and any((tmp_path / "quantized").iterdir())
    assert run("cache", "rm", "mixtral").exit_code == 0  # all of a checkpoint's
    assert not any(p for p in (tmp_path / "quantized").iterdir() if p.suffix != ".lock")
    missing = run("cache", "rm", "no-such-thing")
    assert missing.exit_code == 2 and "holds nothing named 'no-such-thing'" in missing.stderr

    assert run("cache", "--recalibrate").stdout.startswith("removed calibration.json (calibration, ")
    assert not (tmp_path / "calibration.json").exists()
    assert "calibration" not in run("cache").stdout


def test_a_calibration_that_measured_nonsense_is_measured_again(tiny_mixtral, tmp_path):
    """A copy rate of 24.5 MB/s (measured while the machine was busy) would be shown and used for good:
    the check at the next start finds it far off and measures again."""
    env = {"LOCALMOE_CACHE": str(tmp_path)}
    args = ["generate", str(tiny_mixtral), "-p", "Hi", "-n", "2", "--device", "cpu", "--expert-slots", "4"]
    args += ["--miss-policy", "auto"]  # which calibrates
    assert CliRunner().invoke(main, args, env=env).exit_code == 0
    path = tmp_path / "calibration.json"
    [(key, measured)] = json.loads(path.read_text()).items()
    path.write_text(json.dumps({key: {"copy": 24.5e6, "cpu": measured["cpu"]}}))
    shown = CliRunner().invoke(main, ["cache"], env=env).stdout
    assert "copy 24.5 MB/s" in shown  # not "0.0 GB/s"
    again = CliRunner().invoke(main, args, env=env)
    assert again.exit_code == 0 and "measuring again" in again.stderr
    assert json.loads(path.read_text())[key]["copy"] > 100 * 24.5e6
