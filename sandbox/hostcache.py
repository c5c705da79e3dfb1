"""Small per-boot caches in the kernel home that only root writes and only root trusts.

The firejail probe's smoke run and the compiled seccomp programs are cached this way (each
keyed by everything its result depends on; see their modules). A cache file is believed only
when it is a regular file owned by this user and not group/other-writable, in a directory owned
by this user with no group/other access, and not larger than the caller allows; anything else
reads as "no cache" and the work is done again. Writes go to a temp file that replaces the old
one atomically; a failed write is ignored (the cache is an optimization only).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path


def read_private(path: Path, limit: int) -> bytes | None:
    """The bytes of ``path`` if it can be trusted (see above), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        dst = os.stat(path.parent, follow_symlinks=False)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022
                or not stat.S_ISDIR(dst.st_mode) or dst.st_uid != os.geteuid()
                or dst.st_mode & 0o077 or st.st_size > limit):
            return None
        return os.read(fd, limit + 1)
    except OSError:
        return None
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (mode 0600, its directory made 0700); errors ignored."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
