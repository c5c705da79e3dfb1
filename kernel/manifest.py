"""Workspace manifests: what a tree holds (path -> kind, mode, size, digest), by file descriptor.

Used to record the initial and final workspace of a run, to clone the workspace into the private
copy an ``exec``'d command works in, and to diff that copy afterwards so each change it made goes
through the same checks as a ``write``.

The walk never follows a symlink (every open is ``O_NOFOLLOW`` relative to the parent's fd),
never opens a special file for reading, and opens regular files ``O_NONBLOCK`` and checks them
with ``fstat`` after opening, so a FIFO swapped in at the last moment cannot hang it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernel.canonical import canonical_json, sha256_digest

MANIFEST_VERSION = 1
_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_FILE_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Entry:
    kind: str
    """``file``, ``dir``, ``symlink`` or ``special`` (device, fifo, socket)."""
    mode: int
    """Permission bits (``st_mode & 0o7777``)."""
    size: int
    """Bytes for files, length of the target for symlinks, 0 otherwise."""
    digest: str | None = None
    """``sha256:<hex>`` of a file's content."""
    target: str | None = None
    """A symlink's target, as stored (never followed)."""


@dataclass(frozen=True)
class Change:
    op: str
    """``write``, ``delete``, ``mkdir``, ``chmod``; or ``symlink``/``special`` (refused later)."""
    rel: str
    mode: int | None = None


def _excluded(rel: str, exclude: Sequence[str]) -> bool:
    return any(rel == ex or rel.startswith(ex + "/") for ex in exclude)


def _join(base: str, name: str) -> str:
    return f"{base}/{name}" if base else name


def _hash_fd(fd: int) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    while True:
        b = os.read(fd, _CHUNK)
        if not b:
            break
        h.update(b)
        n += len(b)
    return "sha256:" + h.hexdigest(), n


def _walk(dirfd: int, base: str, exclude: Sequence[str],
          visit: Callable[[int, str, str, os.stat_result], int | None]) -> None:
    """Depth-first walk by fd; ``visit`` returns an fd to descend into (it is closed here)."""
    for name in sorted(os.listdir(dirfd)):
        rel = _join(base, name)
        if _excluded(rel, exclude):
            continue
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        sub = visit(dirfd, name, rel, st)
        if sub is not None:
            try:
                _walk(sub, rel, exclude, visit)
            finally:
                os.close(sub)


def _open_root(root: Path) -> int:
    return os.open(root, _DIR_OPEN)


def _open_same(dirfd: int, name: str, flags: int, st: os.stat_result) -> int | None:
    """Open ``name`` no-follow, non-blocking; ``None`` if it vanished or is no longer ``st``."""
    try:
        fd = os.open(name, flags, dir_fd=dirfd)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
            return None
        raise
    st2 = os.fstat(fd)
    if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino) or \
            stat.S_IFMT(st2.st_mode) != stat.S_IFMT(st.st_mode):
        os.close(fd)
        return None
    return fd


def scan(root: Path, *, exclude: Sequence[str] = ()) -> dict[str, Entry]:
    """Every entry beneath ``root`` (not the root itself), keyed by relative POSIX path."""
    out: dict[str, Entry] = {}

    def visit(dirfd: int, name: str, rel: str, st: os.stat_result) -> int | None:
        m = st.st_mode
        perm = stat.S_IMODE(m)
        if stat.S_ISDIR(m):
            fd = _open_same(dirfd, name, _DIR_OPEN, st)
            if fd is None:
                return None
            out[rel] = Entry("dir", perm, 0)
            return fd
        if stat.S_ISLNK(m):
            try:
                target = os.readlink(name, dir_fd=dirfd)
            except OSError:
                return None
            out[rel] = Entry("symlink", perm, len(os.fsencode(target)), None, target)
            return None
        if stat.S_ISREG(m):
            fd = _open_same(dirfd, name, _FILE_OPEN, st)
            if fd is None:
                out[rel] = Entry("special", perm, 0)
                return None
            try:
                digest, size = _hash_fd(fd)
            finally:
                os.close(fd)
            out[rel] = Entry("file", perm, size, digest)
            return None
        out[rel] = Entry("special", perm, 0)
        return None

    rootfd = _open_root(root)
    try:
        _walk(rootfd, "", exclude, visit)
    finally:
        os.close(rootfd)
    return out


def _text(s: str) -> str:
    """A name as recorded: itself, or for a name that is not UTF-8, ``\\x00hex:<its bytes>``.

    NUL never occurs in a real name, so the escaped form cannot collide with one.
    """
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return "\x00hex:" + os.fsencode(s).hex()
    return s


def entry_record(e: Entry) -> dict[str, Any]:
    return {"kind": e.kind, "mode": e.mode, "size": e.size, "digest": e.digest,
            "target": None if e.target is None else _text(e.target)}


def manifest_bytes(entries: dict[str, Entry]) -> bytes:
    """Canonical JSON of the manifest (keys sorted): the bytes the run folder stores."""
    return canonical_json({"version": MANIFEST_VERSION,
                           "entries": {_text(k): entry_record(v) for k, v in entries.items()}})


def tree_digest(entries: dict[str, Entry]) -> str:
    return sha256_digest(manifest_bytes(entries))


def _parts(rel: str) -> tuple[str, ...]:
    return tuple(rel.split("/"))


def _create(rel: str, e: Entry) -> Change:
    if e.kind == "file":
        return Change("write", rel, e.mode)
    if e.kind == "dir":
        return Change("mkdir", rel, e.mode)
    return Change(e.kind, rel, None)  # "symlink" / "special": refused when applied


def diff(before: dict[str, Entry], after: dict[str, Entry]) -> list[Change]:
    """Changes that turn ``before`` into ``after``, in an order that can be applied.

    All deletions come first, children before parents; then creations and modifications,
    parents before children. A path whose kind changed is deleted and created again.
    """
    deletes: list[Change] = []
    creates: list[Change] = []
    for rel, old in before.items():
        new = after.get(rel)
        if new is None or new.kind != old.kind:
            deletes.append(Change("delete", rel, None))
    for rel, new in after.items():
        prev = before.get(rel)
        if prev is None or prev.kind != new.kind:
            creates.append(_create(rel, new))
            continue
        old = prev
        if new.kind == "file":
            if (new.digest, new.size) != (old.digest, old.size):
                creates.append(Change("write", rel, new.mode if new.mode != old.mode else None))
            elif new.mode != old.mode:
                creates.append(Change("chmod", rel, new.mode))
        elif new.kind == "dir":
            if new.mode != old.mode:
                creates.append(Change("chmod", rel, new.mode))
        elif new.kind == "symlink":
            if new.target != old.target:
                creates.append(Change("symlink", rel, None))
        elif new.kind == "special" and (new.mode, new.size) != (old.mode, old.size):
            creates.append(Change("special", rel, None))
    deletes.sort(key=lambda c: _parts(c.rel), reverse=True)
    creates.sort(key=lambda c: _parts(c.rel))
    return deletes + creates


def _copy_fd(src: int, dst: int) -> None:
    while True:
        try:
            n = os.copy_file_range(src, dst, _CHUNK)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            break
        if n == 0:
            return
    while True:  # fallback: plain read/write from wherever copy_file_range stopped
        b = os.read(src, _CHUNK)
        if not b:
            return
        view = memoryview(b)
        while view:
            view = view[os.write(dst, view):]


def clone_tree(src: Path, dst: Path, *, exclude: Sequence[str], uid: int, gid: int) -> None:
    """Copy ``src`` into the new directory ``dst`` for a command to work in.

    Regular files (content, permission bits), directories and symlinks (as symlinks, never
    followed) are copied; special files and ``exclude``d paths are skipped. Everything is owned
    by ``uid``/``gid`` when running as root. ``dst`` must not exist or be an empty directory.
    """
    chown = os.geteuid() == 0
    try:
        os.mkdir(dst, 0o700)
    except FileExistsError:
        if os.listdir(dst):
            raise OSError(errno.ENOTEMPTY, f"{dst}: not empty") from None
    dstroot = os.open(dst, _DIR_OPEN)
    srcroot = _open_root(src)
    try:
        st = os.fstat(srcroot)
        if chown:
            os.fchown(dstroot, uid, gid)
        os.fchmod(dstroot, stat.S_IMODE(st.st_mode) & 0o777)
        _clone(srcroot, dstroot, "", exclude, uid, gid, chown)
    finally:
        os.close(srcroot)
        os.close(dstroot)


def remove_tree(top: Path) -> None:
    """Remove a directory tree that may hold read-only directories (a command's copy of the
    workspace, a replayed tree): the owner gets rwx on every directory first, top-down, never
    through a symlink, then the tree goes. Only for trees nothing else writes any more (the
    command, or the kernel that made it, has ended). Root needs no modes; an ordinary user
    does. Errors are ignored: what cannot be removed stays."""
    with contextlib.suppress(OSError):
        if not os.path.islink(top):
            os.chmod(top, 0o700)
    for root, dirs, _files in os.walk(top):  # top-down: a directory is listed after its chmod
        for d in dirs:
            full = os.path.join(root, d)
            if not os.path.islink(full):
                with contextlib.suppress(OSError):
                    os.chmod(full, 0o700)
    shutil.rmtree(top, ignore_errors=True)


def _clone(sfd: int, dfd: int, base: str, exclude: Sequence[str], uid: int, gid: int,
           chown: bool) -> None:
    for name, rel, st in _entries(sfd, base, exclude):
        m = st.st_mode
        perm = stat.S_IMODE(m) & 0o777
        if stat.S_ISDIR(m):
            sub = _open_same(sfd, name, _DIR_OPEN, st)
            if sub is None:
                continue
            try:
                os.mkdir(name, 0o700, dir_fd=dfd)
                dsub = os.open(name, _DIR_OPEN, dir_fd=dfd)
                try:
                    if chown:
                        os.fchown(dsub, uid, gid)
                    _clone(sub, dsub, rel, exclude, uid, gid, chown)
                    os.fchmod(dsub, perm)
                finally:
                    os.close(dsub)
            finally:
                os.close(sub)
        elif stat.S_ISLNK(m):
            try:
                target = os.readlink(name, dir_fd=sfd)
            except OSError:
                continue
            os.symlink(target, name, dir_fd=dfd)
            if chown:
                os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
        elif stat.S_ISREG(m):
            sf = _open_same(sfd, name, _FILE_OPEN, st)
            if sf is None:
                continue
            try:
                df = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600, dir_fd=dfd)
                try:
                    _copy_fd(sf, df)
                    if chown:
                        os.fchown(df, uid, gid)
                    os.fchmod(df, perm)
                finally:
                    os.close(df)
            finally:
                os.close(sf)
        # special files are skipped


def _entries(dirfd: int, base: str,
             exclude: Sequence[str]) -> Iterator[tuple[str, str, os.stat_result]]:
    for name in sorted(os.listdir(dirfd)):
        rel = _join(base, name)
        if _excluded(rel, exclude):
            continue
        try:
            yield name, rel, os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            continue
