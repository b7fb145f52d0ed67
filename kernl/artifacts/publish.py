"""Putting a bundle in place atomically, and clearing what a killed compile left beside it.

A bundle folder is replaced in one step, an exchange of the new folder with the old (renameat2 with
RENAME_EXCHANGE): at every instant the name holds the old bundle or the new one. Everything a compile writes
before it publishes lives under hidden names beside the output, `.NAME.kernl-tmp-ID…`; the folder being written
is flock'ed by its writer for as long as it lives, so the next compile tells a live writer's files from a killed
one's and removes only the latter. The kernel drops the lock of a killed process: nothing waits for the dead.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import platform
import shutil
from collections.abc import Iterator
from pathlib import Path

TMP_TAG = ".kernl-tmp-"
STAGED_SUFFIX = ".kernl"  # a staged archive: the writer's folder name + this
REMOVED_SUFFIX = ".kernl-removed"  # an old archive moved aside by a publish without one
OLD_SUFFIX = "-old"  # an old folder moved aside where the file system cannot exchange
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP)


@contextlib.contextmanager
def name_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on the output's parent folder: one compile at a time publishes or clears leftovers
    there (publishing is a few renames; nothing slow is done under it)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):  # no locks on this file system: publishing still renames atomically
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def hold(path: Path) -> int:
    """Open path and flock it for as long as the returned descriptor stays open: the writer is alive."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in _UNSUPPORTED + (errno.ENOLCK,):
            os.close(fd)
            raise
    return fd


def is_dead(path: Path) -> bool:
    """True when no live writer holds path (its lock can be taken); a missing path is dead too."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    except OSError:
        return not path.is_dir()  # a link planted under our prefix: not a writer's
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def exchange(a: Path, b: Path) -> bool:
    """Swap the two paths in one step; False where the kernel or file system cannot (then nothing moved)."""
    libc = _libc()
    if libc is None:
        return False
    args = (_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if hasattr(libc, "renameat2"):
        done = libc.renameat2(*args)
    elif platform.machine() in _SYS_RENAMEAT2:
        done = libc.syscall(_SYS_RENAMEAT2[platform.machine()], *args)
    else:
        return False
    if done == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(b))


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
