"""Crash-safe file writes: temp file in the same dir, fsync, rename, fsync the dir.

A reader therefore sees either the old file or the whole new one, never a torn write.
An OSError (disk full, read-only dir) becomes a `UserError` naming the path, and the
temp file is removed, so the previous good state stays intact.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import socket
from pathlib import Path

from common.errors import UserError


def sha256_file(path: Path) -> str:
    """The file's sha256, read 4 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_error(e: BaseException, path: Path) -> OSError | None:
    """The OS error behind a failed write of `path`, also where a library hides it, or None
    when `e` is not a write failure.  safetensors raises `SafetensorError('... (os error 28)')`;
    torch.save a RuntimeError naming no cause ('unexpected pos ...'), taken as disk full when
    the disk holding `path` has under 1 MiB left (call this before removing the partial write)."""
    if isinstance(e, OSError):
        return e
    code = re.search(r"\(os error (\d+)\)", str(e))
    if code:
        return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
    if isinstance(e, RuntimeError):
        existing = next((p for p in (Path(path), *Path(path).parents) if p.exists()), None)
        if existing is not None and shutil.disk_usage(existing).free < 1 << 20:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})  # a write failed, whatever was read


def write_error_in(e: BaseException) -> OSError | None:
    """An OSError of a failed write (disk full, quota, read-only) in the chain of causes a
    library wrapped it in, or None."""
    seen = 0
    while e is not None and seen < 16:
        if isinstance(e, OSError) and e.errno in OUTPUT_ERRNOS:
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def describe_os_error(e: OSError, path: Path) -> str:
    if e.errno == errno.ENOSPC:
        what = "disk full"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = "not writable"
    else:
        what = e.strerror or type(e).__name__
    return f"cannot write {path}: {what}; free space or choose another output dir (previous files are intact)"


def write_file_atomically(path: Path, data: bytes, write=lambda f, data: f.write(data)) -> None:
    """Temp file in the same dir, fsync, rename, fsync the dir. Raises OSError, leaving no temp.

    `write(f, data)` is the one place the bytes hit the file (tests inject ENOSPC there).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    try:
        write_file_atomically(path, data)
    except OSError as e:
        raise UserError(describe_os_error(e, Path(path))) from e


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def publish_dir(tmp: Path, final: Path) -> None:
    """Make a fully written temp dir visible under `final` in one rename.

    An existing `final` is moved aside first and removed only after the new one is in place;
    a Ctrl-C between the two renames puts it back (else the caller's cleanup, removing `tmp`,
    would leave neither)."""
    fsync_tree(tmp)
    old = final.with_name(f".{final.name}.old{_writer_tag()}")
    try:
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def _writer_tag() -> str:
    """This process, in the names of the temp dirs it writes: host and pid (on a filesystem
    several machines share, a pid alone names processes of each)."""
    return f"-{socket.gethostname()}-{os.getpid()}"


def _remove_left_behind(final: Path) -> None:
    """Temp dirs of `final` that a process of this host left when it was killed (kill -9: no
    cleanup ran; its pid is gone): its `.tmp` dirs, and its `.old` dir (the previous `final`,
    moved aside) once `final` is there again."""
    if not final.parent.is_dir():
        return
    host = socket.gethostname()
    for kind in ("tmp", "old"):
        if kind == "old" and not final.exists():
            continue  # the previous version may be all there is
        for left in final.parent.glob(f".{glob.escape(final.name)}.{kind}-{glob.escape(host)}-*"):
            pid = left.name.rsplit("-", 1)[1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(left, ignore_errors=True)


def writable_temp_dir(final: Path) -> Path:
    """A fresh temp dir beside `final` (same filesystem, so the rename is atomic); what killed
    writers of `final` left is removed first."""
    tmp = final.with_name(f".{final.name}.tmp{_writer_tag()}")
    try:
        _remove_left_behind(final)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise UserError(describe_os_error(e, final)) from e
    return tmp


@contextlib.contextmanager
def staged_dir(final: Path):
    """Yield a temp dir beside `final` to write into; on a clean exit it replaces `final` in one
    rename (`publish_dir`).  On failure it is removed, and a failed write (disk full, not
    writable; also as a library's own error type, `write_error`) is a UserError naming `final`."""
    tmp = writable_temp_dir(final)
    try:
        yield tmp
        publish_dir(tmp, final)
    except UserError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:  # disk full comes as safetensors' or torch's own error type, not OSError
        failed = write_error(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if failed is None:
            raise
        raise UserError(describe_os_error(failed, final)) from e
    except BaseException:  # Ctrl-C, SIGTERM (raised as KeyboardInterrupt): no half-written dir left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def human_bytes(n: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as disks are sold)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n} B"


def try_lock(path: Path, on_busy=None) -> tuple[int | None, str]:
    """An exclusive, non-blocking lock on `path` (created): (its fd, "") with this pid written
    in it, or (None, the holder's pid) when another process holds it.  The kernel drops the lock
    when its holder dies, kill -9 too, so a stale file never blocks a later run; `unlock(fd)`.
    on_busy(holder's pid): called when it is held, then the lock is waited for instead."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        if on_busy is None:
            os.close(fd)
            return None, holder
        on_busy(holder)
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd, ""


def unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def exclusive_lock(path: Path, busy: str):
    """Hold `try_lock(path)` for the block; a second process is refused at once:
    `busy (pid N holds PATH); ...`."""
    return _locked(Path(path), busy=busy)


def waiting_lock(path: Path, on_busy):
    """Hold the lock on `path` for the block, waiting for another holder to finish first
    (on_busy(its pid) is called once, to say so)."""
    return _locked(Path(path), on_busy=on_busy)


@contextlib.contextmanager
def _locked(path: Path, busy: str = "", on_busy=None):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, holder = try_lock(path, on_busy)
    except OSError as e:
        raise UserError(describe_os_error(e, path.parent)) from None
    if fd is None:
        raise UserError(f"{busy} (pid {holder} holds {path}); wait for it to finish, or use another out_dir")
    try:
        yield
    finally:
        unlock(fd)
