"""Files that runs leave behind and other processes may share: locks, atomic writes, JSON reads.

Every writer of a run's record files (configs, manifests, caches, reports) goes through
`write_atomic`, so a kill leaves the old file or the new one, never half of one, and two
processes writing the same file never trip over one temporary name. Readers use `read_json`,
whose errors name the file. `exclusive_lock` keeps a second run out of a folder or file that
one run is writing.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike, busy: str, *,
                   wait: str | None = None) -> Iterator[None]:
    """Holds an exclusive lock (flock) on `lock_path` for the `with` block.

    The lock file stays afterwards: deleting it would let a third process lock a new file
    while a second still holds the old one. The kernel drops the lock when its holder dies,
    so a killed run never leaves a stale lock.

    Args:
      lock_path: the lock file (created, with its folder, if missing).
      busy: the ValueError message when another process holds the lock.
      wait: None refuses at once with `busy`; a text waits for the lock instead, printing it
        on stderr first (for work the other process finishes for both, e.g. a shared cache).
    """
    import fcntl
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if wait is None:
                raise ValueError(busy) from None
            print(wait, file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Writes `data` to `path` through a temporary file of its own in the same folder, synced
    and then renamed over `path`: readers see the old file or the new one, whole.

    The file gets the permissions a plain `open(path, "w")` would give (not mkstemp's 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())          # the rename must not land before the data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def temporary_sibling(path: str | os.PathLike, suffix: str = "") -> Path:
    """A fresh, unique file name in `path`'s folder (created empty), for writers that must
    name their own temporary file (e.g. soundfile, which picks the format from `suffix`);
    rename it over `path` when done."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def read_json(path: str | os.PathLike, what: str = "") -> Any:
    """The JSON document in `path`; ValueError naming the file (and `what` it should be) when
    it is not JSON, e.g. cut short by a kill or an editor."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        kind = f" ({what})" if what else ""
        detail = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8 text"
        raise ValueError(f"{path}{kind} is damaged: not JSON ({detail})") from None


def complete_lines(path: str | os.PathLike,
                   check: Callable[[list[str]], None] | None = None) -> list[str]:
    """The lines of an appended JSON-lines file that its writer finished ([] when there is no
    file). A last line without its newline (the writer was killed mid-line) is cut off the
    file, so that the next append starts on a line of its own.

    Args:
      check: called with the finished lines before anything is cut; it raises to leave a file
        that is not what the caller expects (another file named by mistake) untouched.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    lines = complete.decode("utf-8").splitlines()
    if check is not None:
        check(lines)
    if len(complete) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    return lines
