"""Atomic file writing: results appear under their final name complete, or not at all."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import tempfile
import threading
from typing import Iterator, List

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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


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
