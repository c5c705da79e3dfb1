"""The one path normalizer, and resolution beneath the workspace root by file descriptor.

Two steps, kept apart on purpose:

1. :func:`normalize` is a pure string check. It rejects control bytes, empty and over-long
   paths, absolute paths outside the agent's view of the workspace and ``..`` that would leave
   the root, and resolves ``.``, empty components and inner ``..`` lexically.
2. :class:`Workspace` turns a normalized path into facts and file descriptors with ``openat2``
   (``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV``) from a
   descriptor of the root, and looks at the final component with ``*at`` calls that never
   follow it.

Resolving ``..`` lexically in step 1 is only sound because step 2 never traverses a symlink:
``a/link/../b`` names ``a/b`` lexically, and the kernel refuses ``a/link`` outright rather than
deciding what it points to. No string path is ever handed to a syscall that would resolve it from
``/``; every effect starts at the root descriptor.

This is the only module allowed to normalize path strings (ruff bans ``os.path.normpath``
elsewhere).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from kernel.decide import PathFacts
from kernel.policy import WritePolicy

Violation = tuple[str, str, int]

# openat2(2): struct open_how and the RESOLVE_* flags (linux/openat2.h).
SYS_OPENAT2 = 437  # the same number on every architecture (unified syscall table)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
STRICT_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
"""Every workspace path is resolved with all four: never leave the root, never traverse a
symlink (inside or out), never a /proc magic link, never cross a mount."""

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
"""How a directory beneath the root is opened (readable, so it can be fsync'ed)."""


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64))


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class PathViolation(OSError):
    """An ``OSError`` that also names the rule it breaks (``path.special``, ``path.hardlink``)."""

    def __init__(self, rule: str, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.rule = rule

    @property
    def violation(self) -> Violation:
        return (self.rule, str(self.strerror), self.errno or errno.EIO)


def openat2(dirfd: int, path: str, flags: int, *, mode: int = 0,
            resolve: int = STRICT_RESOLVE) -> int:
    """``openat2(dirfd, path, {flags, mode, resolve})``; raises ``OSError`` with its errno."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = _syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd),
                  ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                  ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{os.strerror(code)}: {path!r}")
    return int(fd)


# ---------------------------------------------------------------------------------------------
# Pure normalization


def _bad_char(c: str) -> bool:
    o = ord(c)
    return o < 0x20 or 0x7F <= o <= 0x9F or 0xD800 <= o <= 0xDFFF


_BAD_CHAR_RE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
"""The characters :func:`_bad_char` refuses, found in one scan instead of a call per character."""


def normalize(raw: str, *, view_root: str, limits: WritePolicy) -> str | Violation:
    """The normalized relative POSIX path of ``raw`` (``""`` is the root), or a violation.

    A violation is ``(rule_id, reason, errno)``. Pure: no filesystem access.
    """
    bad = _BAD_CHAR_RE.search(raw)
    if bad is not None:
        i, c = bad.start(), bad.group()
        what = "NUL" if c == "\x00" else f"control or undecodable character {ord(c):#x}"
        return ("path.bad_bytes", f"path contains {what} at index {i}", errno.EINVAL)
    if raw == "":
        return ("path.empty", "path is empty", errno.EINVAL)
    nbytes = len(raw.encode("utf-8"))
    if nbytes > limits.max_path_bytes:
        return ("path.too_long",
                f"path is {nbytes} bytes, over the {limits.max_path_bytes}-byte limit",
                errno.ENAMETOOLONG)
    parts = raw.split("/")
    for part in parts:
        plen = len(part.encode("utf-8"))
        if plen > limits.max_component_bytes:
            return ("path.too_long",
                    f"path component {part[:40]!r}... is {plen} bytes, over the "
                    f"{limits.max_component_bytes}-byte limit", errno.ENAMETOOLONG)
    if raw.startswith("/"):
        root_parts = [p for p in view_root.split("/") if p not in ("", ".")]
        given = [p for p in parts if p not in ("", ".")]
        if given[: len(root_parts)] != root_parts or ".." in root_parts:
            return ("path.outside",
                    f"absolute path {raw!r} is not under the workspace root {view_root!r}",
                    errno.EXDEV)
        parts = given[len(root_parts):]
    stack: list[str] = []
    for part in parts:
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return ("path.outside", f"{raw!r}: '..' leaves the workspace root", errno.EXDEV)
            stack.pop()
            continue
        stack.append(part)
    return "/".join(stack)


def split_parent(rel: str) -> tuple[str, str]:
    """``"a/b/c"`` -> ``("a/b", "c")``; ``"c"`` -> ``("", "c")``."""
    parent, _, name = rel.rpartition("/")
    return parent, name


# ---------------------------------------------------------------------------------------------
# Resolution by file descriptor


def _resolve_error(rel: str, e: OSError) -> Violation:
    code = e.errno or errno.EIO
    if code == errno.ELOOP:
        return ("path.symlink",
                f"{rel}: a path component is a symlink; symlinks are never traversed",
                errno.ELOOP)
    if code == errno.ENOTDIR:
        return ("path.not_dir", f"{rel}: a path component is not a directory", errno.ENOTDIR)
    if code == errno.EXDEV:
        return ("path.xdev", f"{rel}: the path crosses a mount point", errno.EXDEV)
    return ("path.unresolvable", f"{rel}: cannot be resolved: {os.strerror(code)}", code)


def open_dir_beneath(rootfd: int, rel: str) -> int:
    """A readable directory fd for ``rel`` beneath ``rootfd`` (``""`` = the root itself)."""
    return openat2(rootfd, rel or ".", DIR_FLAGS)


def read_regular(rootfd: int, rel: str, max_bytes: int) -> bytes:
    """Read a regular, singly-linked file beneath ``rootfd``, never blocking, never following.

    The file is first opened ``O_PATH`` (no side effect, whatever it is) and checked with
    ``fstat``; only a regular file is then re-opened for reading, through its own descriptor,
    so a swap between check and read cannot substitute a FIFO or a device.
    """
    pfd = openat2(rootfd, rel, os.O_PATH | os.O_NOFOLLOW)
    try:
        st = os.fstat(pfd)
        check_regular(rel, st, max_bytes)
        # Re-open the very inode checked above through its descriptor (a /proc magic link,
        # deliberately followed: it cannot be redirected by renaming anything).
        fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    finally:
        os.close(pfd)
    try:
        st2 = os.fstat(fd)
        if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):  # pragma: no cover - defensive
            raise PathViolation("path.raced", errno.EAGAIN, f"{rel}: changed while opened")
        check_regular(rel, st2, max_bytes)
        chunks: list[bytes] = []
        left = max_bytes + 1
        while left > 0:
            b = os.read(fd, min(left, 1 << 20))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise PathViolation("write.max_file_bytes", errno.EFBIG,
                            f"{rel}: grew past the {max_bytes}-byte limit while read")
    return data


def check_regular(rel: str, st: os.stat_result, max_bytes: int | None = None) -> None:
    """Raise :class:`PathViolation` unless ``st`` is a regular file with one link (and small)."""
    if stat.S_ISLNK(st.st_mode):
        raise PathViolation("path.symlink", errno.ELOOP, f"{rel}: is a symlink")
    if stat.S_ISDIR(st.st_mode):
        raise PathViolation("path.is_dir", errno.EISDIR, f"{rel}: is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise PathViolation("path.special", errno.EPERM,
                            f"{rel}: is a special file (device, fifo or socket)")
    if st.st_nlink > 1:
        raise PathViolation("path.hardlink", errno.EPERM,
                            f"{rel}: has {st.st_nlink} hard links; a file linked elsewhere "
                            "could be outside the workspace")
    if max_bytes is not None and st.st_size > max_bytes:
        raise PathViolation("write.max_file_bytes", errno.EFBIG,
                            f"{rel}: {st.st_size} bytes exceeds the {max_bytes}-byte limit")


class Workspace:
    """The workspace root, held open as an ``O_PATH`` descriptor; everything starts from it."""

    def __init__(self, root: Path, fd: int, view_root: str, hidden: tuple[str, ...],
                 dev: int) -> None:
        self.root = root
        self.fd = fd
        self.view_root = view_root
        self.hidden = hidden
        self.dev = dev

    @classmethod
    def open(cls, root: Path, *, view_root: str, hidden: Sequence[str] = ()) -> Workspace:
        """Open ``root`` (a real directory, not a symlink) and check ``openat2`` works here."""
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISDIR(st.st_mode):  # pragma: no cover - O_DIRECTORY guarantees it
                raise NotADirectoryError(errno.ENOTDIR, f"{root}: not a directory")
            probe = openat2(fd, ".", os.O_PATH | os.O_DIRECTORY)
            os.close(probe)
        except BaseException:
            os.close(fd)
            raise
        for h in hidden:
            if h == "" or h.startswith("/") or any(p in ("", ".", "..") for p in h.split("/")):
                os.close(fd)
                raise ValueError(f"hidden path {h!r} must be a normalized relative path")
        return cls(root, fd, view_root, tuple(hidden), st.st_dev)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def hidden_violation(self, rel: str) -> Violation | None:
        for h in self.hidden:
            if rel == h or rel.startswith(h + "/"):
                return ("path.hidden", f"{rel}: is reserved for the kernel", errno.EACCES)
        return None

    def open_parent(self, rel: str) -> tuple[int, str]:
        """A readable fd of the directory holding ``rel``, and the final name."""
        parent, name = split_parent(rel)
        return open_dir_beneath(self.fd, parent), name

    def facts(self, rel: str) -> PathFacts:
        """What ``rel`` is, found by fd without following anything. Never raises for the path."""
        if rel == "":
            return PathFacts(rel="", exists=True, kind="dir")
        hid = self.hidden_violation(rel)
        if hid is not None:
            return PathFacts(rel=rel, violation=hid)
        parent, name = split_parent(rel)
        try:
            pfd = openat2(self.fd, parent or ".", os.O_PATH | os.O_DIRECTORY)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return PathFacts(rel=rel)
            return PathFacts(rel=rel, violation=_resolve_error(rel, e))
        try:
            pst = os.fstat(pfd)
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return PathFacts(rel=rel)
        except OSError as e:
            return PathFacts(rel=rel, violation=_resolve_error(rel, e))
        finally:
            os.close(pfd)
        return facts_from_stat(rel, st, pst.st_dev)

    def read_file(self, rel: str, max_bytes: int) -> bytes:
        """Contents of a regular, singly-linked workspace file of at most ``max_bytes``."""
        hid = self.hidden_violation(rel)
        if hid is not None:
            raise PathViolation(hid[0], hid[2], hid[1])
        return read_regular(self.fd, rel, max_bytes)


def facts_from_stat(rel: str, st: os.stat_result, parent_dev: int) -> PathFacts:
    """Classify an ``lstat`` result of the final component."""
    m = st.st_mode
    if stat.S_ISLNK(m):
        return PathFacts(rel=rel, exists=True, kind="symlink", size=st.st_size)
    if st.st_dev != parent_dev:
        return PathFacts(rel=rel, exists=True, kind="dir" if stat.S_ISDIR(m) else "file",
                         violation=("path.xdev", f"{rel}: is a mount point", errno.EXDEV))
    if stat.S_ISDIR(m):
        return PathFacts(rel=rel, exists=True, kind="dir")
    if stat.S_ISREG(m):
        if st.st_nlink > 1:
            return PathFacts(rel=rel, exists=True, kind="file", size=st.st_size,
                             violation=("path.hardlink",
                                        f"{rel}: has {st.st_nlink} hard links; a file linked "
                                        "elsewhere could be outside the workspace",
                                        errno.EPERM))
        return PathFacts(rel=rel, exists=True, kind="file", size=st.st_size)
    return PathFacts(rel=rel, exists=True, kind="special",
                     violation=("path.special",
                                f"{rel}: is a special file (device, fifo or socket)",
                                errno.EPERM))
