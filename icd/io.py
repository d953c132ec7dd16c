"""Atomic file writing: results appear under their final name complete, or not at all."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Iterator, List, Set

import numpy as np

log = logging.getLogger(__name__)

# the names atomic_path gives its temporaries: .<base>.<8 random characters>.tmp<ext>
_TEMPORARY = re.compile(r"^\.(?P<base>.+)\.[a-z0-9_]{8}\.tmp(?P<ext>\.[^.]*)?$")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary name beside `path`; rename it to `path` only if the block succeeds.

    The temporary name keeps the final extension so that writers choosing a format by
    extension (cv2.imwrite, np.save) behave as for the final name.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{ext}", dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes 0600; results get the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        full = isinstance(e, Exception) and _disk_full(e, folder)
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if full:
            # the writers' own messages name no file (`[Errno 28] No space left on device`,
            # MXNet's `FileStream.Write incomplete`)
            raise OSError(errno.ENOSPC, f"{path}: no space left on device while writing it "
                                        f"(nothing was written under this name); free space "
                                        f"and run again") from None
        raise


def _disk_full(error: Exception, folder: str) -> bool:
    """Whether a write into `folder` failed for want of space: ENOSPC, or any writer's error
    (MXNet, OpenCV) with less than 1 MiB left there."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    with contextlib.suppress(OSError):
        stat = os.statvfs(folder)
        return stat.f_bavail * stat.f_frsize < 1 << 20
    return False


def remove_stale_temporaries(folder: str, prefix: str = "") -> List[str]:
    """Delete the temporaries that interrupted `atomic_path` writes (SIGKILL, power loss) left in
    `folder` for final names starting with `prefix`; returns their paths. Call it when a stage
    starts writing there, before any writer; `prefix` spares other stages writing beside it."""
    if not os.path.isdir(folder):
        return []
    stale = []
    for name in sorted(os.listdir(folder)):
        match = _TEMPORARY.match(name)
        if match and (match.group("base") + (match.group("ext") or "")).startswith(prefix):
            stale.append(os.path.join(folder, name))
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    return stale


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) until the block ends, so that a group of files written together
    (a checkpoint, its optimizer states and its run record) is complete or absent. Outside the main
    thread, where no signal handler can be set, the block runs unprotected."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received and callable(previous):
        previous(signal.SIGINT, None)   # Python's default handler raises KeyboardInterrupt here


def write_json(path: str, value, indent: int = 1) -> None:
    """Write `value` as JSON to `path` atomically (strict JSON: NaN and infinity are errors)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=indent, allow_nan=False)
        f.write("\n")


def read_json(path: str):
    """The JSON value in `path`, with errors naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def require_finite(array: np.ndarray, what: str) -> None:
    """ValueError naming `what` when `array` holds NaN or infinite values (a diverged model's
    scores would otherwise pass every stage: all-background seeds, an evaluation report)."""
    finite = np.isfinite(array)
    if not finite.all():
        raise ValueError(f"{what}: {array.size - int(finite.sum())} of {array.size} values are "
                         f"NaN or infinite")


_HELD: Set[str] = set()   # the lock files this process holds (exclusive_lock is re-entrant)


class FolderInUse(RuntimeError):
    """Another process holds the lock of a folder this run would write."""


@contextlib.contextmanager
def exclusive_lock(path: str, folder: str) -> Iterator[None]:
    """Hold an OS advisory lock (`fcntl.flock`) on the lock file `path` for the block, so that
    two runs never write `folder` at once; the kernel releases it on any exit (SIGKILL too).

    The lock file names its holder (pid, host, start time, command); a second run raises
    FolderInUse naming them. The holder removes the file when the block ends; one left by a
    holder that is gone (its flock vanished with it) is stale: it is taken over, with a warning
    naming the old holder. Re-entrant: a block inside one holding the same lock just runs.
    """
    key = os.path.realpath(path)
    if key in _HELD:   # this process holds it already (a stage inside a locked command)
        yield
        return
    parent = os.path.dirname(os.path.abspath(path))
    created = not os.path.isdir(parent)
    os.makedirs(parent, exist_ok=True)
    try:
        fd = _locked_file(path, folder)
    except BaseException:
        _remove_if_empty(parent, created)
        raise
    try:
        stale = _lock_holder(fd)
        if stale:
            log.warning("%s: taking over the lock of a run that ended without releasing it (%s)",
                        folder, stale)
        holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                             "command": " ".join(sys.argv)})
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode("utf-8"), 0)
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)   # still locked: a run opening it now finds it gone, retries
    finally:
        os.close(fd)              # releases the flock
        _remove_if_empty(parent, created)


def _remove_if_empty(folder: str, created: bool) -> None:
    """Remove `folder` if this run `created` it for its lock and nothing was written there
    (a run that failed before its first file leaves no folder behind)."""
    if created:
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _locked_file(path: str, folder: str) -> int:
    """A descriptor of the lock file `path`, flock-ed; FolderInUse naming the holder."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            raise OSError(e.errno, f"{path}: cannot open the lock file of {folder} "
                                   f"({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd) or "a process that has not yet written its name"
            os.close(fd)
            raise FolderInUse(f"{folder}: in use by another run ({holder}; lock {path}); wait "
                              f"for it to end, or write to another folder") from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino:
                return fd
        os.close(fd)   # the file was removed by its holder between our open and flock


def _lock_holder(fd: int) -> str:
    """'pid P on host H since T (command)' from a lock file, '' when it is empty."""
    text = os.pread(fd, 1 << 16, 0).decode("utf-8", "replace").strip()
    if not text:
        return ""
    try:
        info = json.loads(text)
        return (f"pid {info['pid']} on host {info['host']} since {info['started']}: "
                f"{info['command']}")
    except (ValueError, KeyError, TypeError):
        return f"unreadable holder {text[:80]!r}"
