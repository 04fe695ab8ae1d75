"""Writing outputs so that nothing is lost: atomic files and one process per output.

- `atomic_write(path, write)`: write(tmp) into a temporary file in the same folder, fsync it,
  rename it over `path`, fsync the folder. A reader (or a crash) sees the old file or the new
  one, never half of one; a failed write removes its temporary file and leaves `path` as it was.
- `output_lock(out, command)`: an exclusive lock (flock) on `<out>.lock` for as long as a job
  writes `out`. A second process on the same output is refused with a message naming the
  holder's pid; the lock of a process that died is free again (the kernel drops a dead process's
  flock), so it is taken over without any cleanup.

Every job that writes an output (embed, embed-text, train) goes through both: data first,
metadata last, each atomically, under the lock.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import re

try:
    import fcntl
except ImportError:  # Windows: no flock; jobs run unlocked there
    fcntl = None

TMP_PREFIX = ".tmp-"  # temporary files and folders: ".tmp-<pid>-<name>", ignored and removed by later runs


def fsync_file(path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path) -> None:
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_TMP_NAME = re.compile(re.escape(TMP_PREFIX) + r"\d+-(.+)")  # tmp_path's ".tmp-<pid>-<name>"


def tmp_target(name: str) -> str | None:
    """The name a temporary file or folder of ours stands in for (".tmp-123-e.npy" -> "e.npy"),
    None for any other name (a user's ".tmp-notes")."""
    m = _TMP_NAME.fullmatch(name)
    return m.group(1) if m else None


def is_tmp(name: str) -> bool:
    return tmp_target(name) is not None


def tmp_path(path: pathlib.Path) -> pathlib.Path:
    """A temporary name for `path`, in its folder (so the rename stays on one filesystem)."""
    return path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")


def atomic_write(path, write) -> None:
    """write(tmp: pathlib.Path) writes the whole file; then fsync, rename over `path`, fsync the
    folder. On any failure the temporary file is removed and `path` is untouched."""
    path = pathlib.Path(path)
    tmp = tmp_path(path)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_tmp(folder, name: str) -> None:
    """Temporary files a killed process left for `folder/name` (another live process's are
    protected by the output lock, which the caller holds)."""
    for stray in pathlib.Path(folder).glob(f"{TMP_PREFIX}*-{name}"):
        if tmp_target(stray.name) == name:  # not ".tmp-<pid>-a-<name>", the write of a-<name>
            with contextlib.suppress(OSError):
                stray.unlink()


def lock_path(out) -> pathlib.Path:
    out = pathlib.Path(os.path.abspath(out))  # "." and ".." name no file of their own
    return out.with_name(out.name + ".lock")


class OutputBusy(RuntimeError):
    """Another live process holds the output's lock."""


@contextlib.contextmanager
def output_lock(out, command: str):
    """Hold `<out>.lock` (flock, exclusive, never waiting) while the body runs."""
    path = lock_path(out)
    if fcntl is None:
        yield path
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot create the folder of {out}: {e.strerror}") from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OSError(e.errno, f"cannot write beside {out} (lock file {path}): {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputBusy(f"{out} is being written by another fastsiglip {holder or 'process'} (lock {path}); "
                                 "wait for it to finish, or stop it, or choose another output") from None
            raise
        # The file may have been unlinked by its previous holder between our open and flock: then
        # we hold a lock on a file nobody else sees, so try again on the current one.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{command} (pid {os.getpid()})\n".encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still held: a waiting open sees another inode and retries
        os.close(fd)


def _read_holder(fd) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""
