"""haaqi_jax.files: atomic writes, JSON reads that name the file, torn JSON lines, locks."""

from __future__ import annotations

import os

import pytest

from haaqi_jax import files


def test_an_atomic_write_leaves_the_whole_file_and_nothing_else(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "record.json"
    files.write_atomic(path, '{"a": 1}\n')
    files.write_atomic(path, b'{"a": 2}\n')
    assert files.read_json(path) == {"a": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["record.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask        # as open(path, "w") gives

    # A replaced file keeps its mode; a link is followed to its target.
    os.chmod(path, 0o600)
    files.write_atomic(path, '{"a": 2}\n')
    assert path.stat().st_mode & 0o777 == 0o600
    link = tmp_path / "link.json"
    link.symlink_to(path)
    files.write_atomic(link, '{"a": 2}\n')
    assert link.is_symlink() and files.read_json(path) == {"a": 2}
    fd, sibling = files._new_file(tmp_path / "clip.wav", ".tmp")   # write_atomic's temporary
    os.close(fd)
    assert sibling.name.startswith(".clip.wav.") and sibling.suffix == ".tmp"
    assert sibling.stat().st_mode & 0o777 == 0o666 & ~umask     # not mkstemp's 0600
    sibling.unlink()

    def full_disk(fd):                   # the write fails before the rename: the old file stays
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        files.write_atomic(path, '{"a": 3}\n')
    assert files.read_json(path) == {"a": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["record.json"]


def test_damaged_json_is_named(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text('{"a": ')
    with pytest.raises(ValueError, match=rf"{path} \(the record\) is damaged: not JSON"):
        files.read_json(path, "the record")
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        files.read_json(path)


def test_a_torn_last_line_is_cut_after_the_check(tmp_path):
    path = tmp_path / "rows.jsonl"
    assert files.complete_lines(path) == []
    path.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "x')
    assert files.complete_lines(path) == ['{"id": 1}', '{"id": 2}']
    assert path.read_text() == '{"id": 1}\n{"id": 2}\n'
    # A last line that is whole JSON without its newline (an editor's) is kept and finished.
    path.write_text('{"id": 1}\n{"id": 2}')
    assert files.complete_lines(path) == ['{"id": 1}', '{"id": 2}']
    assert path.read_text() == '{"id": 1}\n{"id": 2}\n'
    # A check that refuses the file (not the caller's kind of file) leaves it untouched.
    other = tmp_path / "settings.json"                       # one JSON object, no newline
    other.write_text('{"n_clips": 6}')

    def refuse(lines):
        raise ValueError("not rows")

    with pytest.raises(ValueError, match="not rows"):
        files.complete_lines(other, check=refuse)
    assert other.read_text() == '{"n_clips": 6}'


def test_a_held_lock_refuses_or_waits(tmp_path):
    lock = tmp_path / "dir" / ".lock"
    with files.exclusive_lock(lock, "busy"):
        with pytest.raises(ValueError, match="^busy$"):
            with files.exclusive_lock(lock, "busy"):
                pass
    with files.exclusive_lock(lock, "busy"):        # released: free again
        pass
    assert lock.exists()


def test_a_file_system_without_flock_goes_on_unguarded(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with files.exclusive_lock(tmp_path / ".lock", "busy"):
        ran.append(True)
    assert ran and "cannot lock" in capsys.readouterr().err
    # Any other error is not swallowed.
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(
        OSError(errno.EBADF, "Bad file descriptor")))
    with pytest.raises(OSError, match="Bad file descriptor"):
        with files.exclusive_lock(tmp_path / ".lock", "busy"):
            pass
