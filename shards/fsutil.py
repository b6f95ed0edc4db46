"""Durable, atomic file operations for the commit protocol.

A rename is atomic, but only durable once the data it points at and the directory entry itself have
reached the disk: hence fsync of every file, then of the directory, before the rename is trusted.
Temporary names carry host and pid so a later run can tell a crashed writer's leftovers (dead pid on
this host) from a live writer's work in progress.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

TMP_MARK = ".tmp-"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the data files were synced
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under ``path`` (itself included)."""
    if path.is_file():
        fsync_path(path)
        return
    for root, _dirs, files in os.walk(path, topdown=False):
        for f in files:
            fsync_path(Path(root) / f)
        fsync_path(Path(root))


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum((Path(r) / f).stat().st_size for r, _, fs in os.walk(path) for f in fs)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


_HOST = socket.gethostname().replace("-", "_").replace(".", "_") or "host"


def temp_path(final: Path) -> Path:
    """``dir/.NAME.tmp-HOST-PID-UUID`` next to ``final`` (same filesystem, so rename is atomic)."""
    return final.with_name(f".{final.name}{TMP_MARK}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


@dataclass(frozen=True)
class TempName:
    final_name: str  # e.g. "00000.zarr"
    host: str
    pid: int

    @property
    def unit(self) -> str:
        return self.final_name.split(".", 1)[0].split("_", 1)[0]

    def owner_alive(self) -> bool | None:
        """True/False for a writer on this host; None when it ran elsewhere (cannot tell)."""
        if self.host != _HOST:
            return None
        if self.pid == os.getpid():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else
            return True
        return True


def parse_temp(name: str) -> TempName | None:
    if not name.startswith(".") or TMP_MARK not in name:
        return None
    final, _, rest = name[1:].rpartition(TMP_MARK)
    parts = rest.split("-")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return TempName(final, parts[0], int(parts[1]))


def write_atomic(final: Path, data: bytes, *, overwrite: bool = False) -> None:
    """Write ``data`` to ``final`` via a synced temp file and a rename; refuse to replace unless asked."""
    tmp = temp_path(final)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, final)
        else:
            # link() fails if `final` exists: no window in which a concurrent writer's file is replaced.
            os.link(tmp, final)
            tmp.unlink()
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    fsync_path(final.parent)


LOCK_SUFFIX = ".lock"


def lock_path(directory: Path, unit: str) -> Path:
    return directory / f".{unit}{LOCK_SUFFIX}"


class UnitLock:
    """An exclusive ``flock`` on ``.UNIT.lock``: held by a unit's writer from ``open_unit`` until its commit
    (stats included) or abort, and taken by cleanup and repair before they touch the unit's files.

    The kernel drops the lock when its holder dies, so "lockable" means "no live writer" without pids or
    ages. The holder removes the file before letting go; whoever opened the old file meanwhile notices
    (inode differs) and tries again, so two processes never both believe they hold the unit. flock on
    NFS is only as good as the server's locking: cleanup also keeps the host/age rule for temp files.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock without waiting: False when another open file description holds it."""
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            try:
                current = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                current = False
            if current:
                self.fd = fd
                os.ftruncate(fd, 0)
                os.write(fd, f"{_HOST} {os.getpid()}\n".encode())  # for a person looking at a stuck unit
                return True
            os.close(fd)  # its holder released and removed it while we waited: lock the new file

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: see the class docstring
        finally:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:  # a writer dropped without commit or abort: let the unit go with it
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __enter__(self) -> UnitLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
