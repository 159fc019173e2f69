"""Files localmoe writes: whole or not at all, one run at a time where runs meet, and no temporary file
left behind for good."""

import errno
import os
import subprocess
import sys
import threading
import time

import pytest

from localmoe import files
from localmoe.files import HOST, locked, sweep_temporaries, temporary_path, write_atomic


def test_a_file_is_replaced_whole_and_keeps_its_permissions(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("old")
    path.chmod(0o640)
    write_atomic(path, "new ü")
    assert path.read_text(encoding="utf-8") == "new ü" and path.stat().st_mode & 0o777 == 0o640
    write_atomic(path, memoryview(b"bytes"))
    assert path.read_bytes() == b"bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


@pytest.mark.parametrize(
    "error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()], ids=["full disk", "ctrl-c"]
)
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, error):
    path = tmp_path / "f.json"
    path.write_text("old")

    def fail(descriptor):
        raise error

    monkeypatch.setattr(files.os, "fsync", fail)
    with pytest.raises(type(error)):
        write_atomic(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def dead_pid() -> int:
    """The id of a process that has ended (and that no process has taken since, in all likelihood)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def temporary(folder, name: str, host: str, pid: int, age_s: float = 0, folder_too: bool = False):
    path = folder / f"{name}.{host}.{pid}.0123abcd.tmp"
    if folder_too:
        path.mkdir()
        (path / "inside").write_text("x")
    else:
        path.write_text("partial")
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process start times are read from /proc")
def test_only_abandoned_temporaries_are_swept(tmp_path):
    gone = dead_pid()
    swept = [
        temporary(tmp_path, "layer-1.bin", HOST, gone),  # its writer was killed
        temporary(tmp_path, ".demo", HOST, gone, folder_too=True),  # a half-written demo checkpoint
        temporary(tmp_path, "old.json", HOST, os.getpid(), age_s=10 * 365 * 86400),  # older than its writer
        temporary(tmp_path, "old.json", "elsewhere", 1, age_s=2 * files.ABANDONED_AFTER_S),  # long abandoned
    ]
    kept = [
        temporary(tmp_path, "p.json", HOST, os.getpid()),  # being written by this process
        temporary(tmp_path, "p.json", "elsewhere", 1),  # another machine's, recent: it may still run
        tmp_path / "notes.tmp",  # not one of localmoe's
    ]
    kept[-1].write_text("the user's")
    sweep_temporaries(tmp_path)
    assert not any(path.exists() for path in swept)
    assert all(path.exists() for path in kept)


def test_sweeping_one_name_leaves_the_others(tmp_path):
    gone = dead_pid()
    mine, other = temporary(tmp_path, "c.json", HOST, gone), temporary(tmp_path, "d.json", HOST, gone)
    sweep_temporaries(tmp_path, "c.json")
    assert not mine.exists() and other.exists()


def test_a_temporary_name_is_swept_by_its_pattern(tmp_path):
    assert files.TEMPORARY.fullmatch(temporary_path(tmp_path / "a.b.json").name)["name"] == "a.b.json"


def test_a_second_holder_waits_for_the_first(tmp_path):
    """While the lock is held, another taker says it waits, and runs once it is released."""
    target, waiting, order = tmp_path / "profile.json", threading.Event(), []

    def second():
        with locked(target, notice=lambda message: waiting.set()):
            order.append("second")

    with locked(target):
        thread = threading.Thread(target=second)
        thread.start()
        assert waiting.wait(timeout=120)
        order.append("first")
    thread.join(timeout=120)
    assert order == ["first", "second"]
    assert files.lock_path(target).exists() and not target.exists()


def test_a_folder_that_cannot_be_written_runs_unlocked(tmp_path, monkeypatch):
    def read_only(*args):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(files.os, "open", read_only)
    ran = []
    with locked(tmp_path / "calibration.json"):
        ran.append(True)
    assert ran == [True]
