"""How localmoe writes files: whole or not at all (`write_atomic`), one run at a time where runs meet
(`locked`), and no temporary file left behind for good (`sweep_temporaries`); and how it reads a file
a user names (`read_limited`).

A temporary file is named `<name>.<host>.<pid>.<random>.tmp` beside the file it will replace, so that a
later run can tell whose it is. Its writer removes it on every failure it sees (a full disk, Ctrl-C); one
left by a writer that could not (SIGKILL, a power cut) is removed by the next run on the same machine once
that writer is gone.
"""

import contextlib
import os
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"
TEMPORARY = re.compile(r"(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")
# Where whether a writer still runs cannot be asked (another machine sharing the folder, Windows), its
# temporary file counts as abandoned once it has not changed for this long: writers rewrite theirs
# continuously, and no file localmoe writes takes a day.
ABANDONED_AFTER_S = 24 * 3600
LOCK_POLL_S = 0.1  # where the lock cannot be waited for in the kernel (msvcrt)


def temporary_path(path: Path) -> Path:
    """A fresh name beside `path` for the temporary file (or folder) that will become it."""
    return path.with_name(f"{path.name}.{HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_atomic(path: Path, data: str | bytes | memoryview) -> None:
    """Replace `path` by `data` (text as UTF-8) whole: written to a temporary file beside it, flushed to
    the disk, then renamed over it, so that a reader, or a run killed meanwhile, sees the old file or the
    new one and never a part. A replaced file keeps its permissions. The temporary file is removed
    whatever fails, and the error raised."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    temporary = temporary_path(path)
    try:
        # 0o666 less the umask: the permissions a plain open() would give
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with open(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        with contextlib.suppress(OSError):
            shutil.copymode(path, temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def read_limited(path: Path, limit: int) -> bytes:
    """The bytes of `path`, refused with ValueError beyond `limit`, without reading more than that
    (a path the user gives may be /dev/zero)."""
    with path.open("rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"it is larger than {limit / 2**20:g} MiB")
    return data


def lock_path(target: Path) -> Path:
    """The lock file of `target`: beside it, named after it."""
    return target.with_name(target.name + ".lock")


@contextlib.contextmanager
def locked(target: Path, notice: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock of `target` (a file or folder that runs of localmoe share) for the block, waiting
    for it with a notice if another run holds it. The lock is `lock_path(target)`, locked with fcntl
    (POSIX) or msvcrt (Windows); the system releases it when its holder ends, however it ends. Where the
    lock file cannot be made (a read-only folder) the block runs unlocked: it cannot write there either.
    The lock is not reentrant: a process must not take it twice."""
    path = lock_path(target)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        try:
            if not _try_lock(descriptor):
                (notice or _stderr)(f"localmoe: waiting for another localmoe run, which holds {path}")
                _wait_for_lock(descriptor)
        except OSError:
            pass  # a file system that cannot lock (some network mounts): the block runs unlocked
        yield
    finally:
        _unlock(descriptor)
        os.close(descriptor)


def sweep_temporaries(folder: Path, name: str = "*", recursive: bool = False) -> None:
    """Remove the abandoned temporary files and folders in `folder` (those of file `name` only, where
    given; in its subfolders too, `recursive`)."""
    pattern = f"{'**/' if recursive else ''}{name}.*.tmp"
    with contextlib.suppress(OSError):
        for path in list(folder.glob(pattern)):
            match = TEMPORARY.fullmatch(path.name)
            if match and _abandoned(path, match["host"], int(match["pid"])):
                _remove(path)


def _abandoned(path: Path, host: str, pid: int) -> bool:
    try:
        written = path.stat().st_mtime
    except OSError:
        return False  # already gone
    if host != HOST or os.name == "nt":
        return time.time() - written > ABANDONED_AFTER_S
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists, under another user
    return written < _started(pid)  # the id now belongs to a later process (a restarted container)


def _started(pid: int) -> float:
    """When process `pid` started (Linux), else 0 (unknown, so that nothing counts as older than it)."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0
    # the boot time is in whole seconds: one second of margin so that a writer never looks newer than its file
    return boot + ticks / os.sysconf("SC_CLK_TCK") - 1.0


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _try_lock(descriptor: int) -> bool:
    """Take the lock if it is free; False where another holds it. OSError where the file system cannot lock."""
    try:
        if fcntl:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            os.lseek(descriptor, 0, os.SEEK_SET)
            msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)
    except (BlockingIOError, PermissionError):  # held by another: EWOULDBLOCK (POSIX), EACCES (Windows)
        return False
    return True


def _wait_for_lock(descriptor: int) -> None:
    if fcntl:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        return
    while not _try_lock(descriptor):
        time.sleep(LOCK_POLL_S)


def _unlock(descriptor: int) -> None:
    with contextlib.suppress(OSError):  # not held (the lock could not be taken, or the block ran unlocked)
        if fcntl:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
        else:
            os.lseek(descriptor, 0, os.SEEK_SET)
            msvcrt.locking(descriptor, msvcrt.LK_UNLCK, 1)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)
