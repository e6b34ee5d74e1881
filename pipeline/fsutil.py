"""Small file-system helpers: atomic writes, hashes, an owner-pid lock file, and disk-full errors
turned into one OSError(errno, strerror, path) whatever library made the write."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import resource
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import PipelineError


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# How libraries word a disk-full errno they do not raise as OSError: h5py "errno = 28", safetensors
# (Rust) "os error 28", or the strerror text itself.
_ERRNO_IN_TEXT = re.compile(r"(?:errno\s*=?\s*|os error\s*|\[Errno\s*)(\d+)", re.IGNORECASE)


def disk_full_errno(exc: BaseException, probe: str | os.PathLike | None = None) -> int | None:
    """ENOSPC / EFBIG / EDQUOT when `exc`, raised while writing, means the disk (or the file size
    limit, or the quota) ran out, else None. Read from the OSError's errno or from the message; for
    writers that fail without saying why (numpy.tofile: "N requested and M written", torch.save:
    "unexpected pos"), from `probe`, the file or folder being written: no free space left under it, or
    a file in it that reached the file size limit (RLIMIT_FSIZE)."""
    if isinstance(exc, PipelineError):
        return None
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return exc.errno
    text = str(exc)
    for match in _ERRNO_IN_TEXT.finditer(text):
        if int(match.group(1)) in DISK_FULL_ERRNOS:
            return int(match.group(1))
    for code in DISK_FULL_ERRNOS:
        if os.strerror(code) in text:
            return code
    if probe is None or not isinstance(exc, (OSError, RuntimeError)):
        return None
    probe = Path(probe)
    with contextlib.suppress(OSError):
        stat = os.statvfs(probe if probe.is_dir() else probe.parent)
        if stat.f_bavail * stat.f_frsize < 1 << 20:
            return errno.ENOSPC
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        files = probe.rglob("*") if probe.is_dir() else [probe]
        with contextlib.suppress(OSError):
            if any(f.is_file() and f.stat().st_size >= limit for f in files):
                return errno.EFBIG
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike, probe: str | os.PathLike | None = None) -> Iterator[None]:
    """Run a block that writes `path` (a file or a folder); if it runs out of space, re-raise as
    OSError(ENOSPC | EFBIG | EDQUOT, strerror, path) -- the CLI prints that as one line naming path.
    `probe` (default `path`): what was actually being written, e.g. a temp file. Other errors pass unchanged."""
    try:
        yield
    except Exception as exc:
        code = disk_full_errno(exc, probe if probe is not None else path)
        if code is None or (isinstance(exc, OSError) and exc.errno == code and exc.filename):
            raise  # not a disk-full error, or one that already names its file
        raise OSError(code, os.strerror(code), str(path)) from exc


def reserve_space(path: str | os.PathLike, nbytes: int) -> None:
    """Allocate `nbytes` for the file at `path` now, so that a full disk (or file size limit) is a plain
    OSError before a writer starts that cannot survive one: HDF5 left with a failed write crashes the
    interpreter when it exits. Filesystems that cannot preallocate are not checked."""
    with open(path, "wb") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, max(int(nbytes), 1))
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise
        f.truncate(0)


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the same folder; rename it onto final_path only if the block succeeds."""
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final_path.name}.", suffix=".tmp", dir=final_path.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        with writing(final_path, probe=tmp_path):
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, final_path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike):
    with open(path) as f:
        return json.load(f)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str, name: str = ".lock") -> Iterator[None]:
    """Hold `folder/name` (owner pid + host) for the block; refuse if a live process holds it.

    A lock left by a dead process (kill -9) is stale and taken over. Work that may run side by side in one
    folder (cache-logits shard jobs) takes locks of different names.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / name
    me = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = lock_path.read_text().split()
                pid, host = int(owner[0]), owner[1]
            except (OSError, ValueError, IndexError):
                pid, host = -1, socket.gethostname()
            if host == socket.gethostname() and pid > 0 and _pid_alive(pid) and pid != os.getpid():
                raise PipelineError(
                    f"{folder} is in use by {what} running as pid {pid}; wait for it to finish "
                    f"or stop it (kill {pid}). If no such process exists, delete {lock_path}."
                ) from None
            lock_path.unlink(missing_ok=True)  # stale: its owner is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    else:
        raise PipelineError(f"could not take the lock {lock_path}; delete it if no run is using {folder}")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if lock_path.read_text() == me:
                lock_path.unlink()
