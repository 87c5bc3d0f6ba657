"""Files that runs leave behind and other processes may share: locks, atomic writes, JSON reads.

The files a resumed or concurrent run reads back (configs, manifests, data records, feature
caches, demo clips, checkpoint metrics) are written through `write_atomic`, so a kill leaves
the old file or the new one, never half of one, and two processes writing the same file never
trip over one temporary name. (Reports are rewritten whole by a rerun and are written
plainly.) Readers use `read_json`, whose errors name the file.
`exclusive_lock` keeps a second run out of a folder or file that one run is writing.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
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
    import errno
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
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # Some network and FUSE file systems have no flock: go on unguarded, as before.
            print(f"warning: cannot lock {lock_path} ({err.strerror}): nothing keeps a second "
                  f"process out", file=sys.stderr)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _new_file(path: Path, suffix: str) -> tuple[int, Path]:
    """A new, unique file beside `path`, opened for writing, with the permissions a plain
    open(path, "w") would give (the process umask applies; mkstemp's 0600 would hide shared
    caches from other users)."""
    import secrets
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Writes `data` to `path` through a temporary file of its own in the same folder, synced
    and then renamed over `path`: readers see the old file or the new one, whole.

    A new file gets the permissions a plain `open(path, "w")` would give; a file replaced
    keeps its own; a symbolic link at `path` is followed (its target is replaced).
    """
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_file(path, ".tmp")
    if path.exists():
        os.chmod(tmp, path.stat().st_mode & 0o7777)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())          # the rename must not land before the data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:                                  # the rename itself, past a power cut
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:
        pass                              # some file systems cannot sync a folder
    return path


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
    file). A last line without its newline is finished when it is JSON (an editor left the
    newline out: it gets one) and cut off the file when it is not (a writer killed mid-line),
    so that the next append starts on a line of its own.

    Args:
      check: called with the lines before the file is changed; it raises to leave a file that
        is not what the caller expects (another file named by mistake) untouched.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    lines = complete.decode("utf-8").splitlines()
    tail = data[len(complete):].decode("utf-8", errors="replace")
    finished = False
    if tail.strip():
        try:
            json.loads(tail)
            lines.append(tail)
            finished = True
        except json.JSONDecodeError:
            pass
    if check is not None:
        check(lines)
    if finished:
        with open(path, "ab") as f:
            f.write(b"\n")
    elif len(complete) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    return lines
