"""The sandbox's mount tree: planned in the kernel process, built in the sandbox child.

The tree is built from scratch, never inherited: a small tmpfs becomes the new root and only
what is listed here appears in it. Every bind source is taken *before* anything is mounted, so
the tmpfs over ``/tmp`` (where the new root is assembled, and where a workspace often lies)
cannot hide or swap one:

* kernel running as root: the parent clones each source with
  ``open_tree(OPEN_TREE_CLONE | AT_RECURSIVE)`` (with root's right to traverse, e.g. a
  0700 ``/tmp/pytest-of-root``), makes the detached copy read-only, nosuid, nodev and private
  with ``mount_setattr`` *before the child ever holds it*, and the child attaches it with
  ``move_mount``;
* kernel not root: the child opens each source (``O_PATH``, with the kernel user's own rights)
  as its first step in its new mount namespace and binds from ``/proc/self/fd/N``.

The view (see ``sandbox/base.py``):

========================  =====================================================================
``/usr /bin /sbin /lib*``  read-only binds (Debian's merged-usr symlinks are recreated as links)
``/etc``                   curated: a few host files bound read-only + synthetic passwd, group,
                           hosts naming only root and the agent user
``/dev``                   null, zero, full, random, urandom bound from the host; fd links
``/proc``                  fresh, for the sandbox's pid namespace (``subset=pid``), or absent
``/tmp``                   size-limited tmpfs, mode 1777: the scratch dir
workspace view             bind of ``spec.workspace`` (read-only unless writable)
``spec.read_paths``        read-only binds at their host paths
``spec.hidden``            an empty read-only tmpfs (or empty file) over each, where visible
========================  =====================================================================
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

SYS_PIVOT_ROOT = 155
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = 0o2000000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4

# Where the new root is assembled (a tmpfs mounted over it, in the sandbox's own mount
# namespace only), as bubblewrap and nsjail do.
STAGING = "/tmp"  # noqa: S108 (inside the sandbox's own mount namespace)

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
ETC_ENTRIES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf",
               "alternatives")
DEVICES = ("null", "zero", "full", "random", "urandom")
WRITABLE_DEVICES = ("/dev/null", "/dev/zero", "/dev/full")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = (("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64))


class MountError(OSError):
    """A step of the tree failed; ``step`` names it for the report to the parent."""

    def __init__(self, err: int, step: str) -> None:
        super().__init__(err, f"{step}: {os.strerror(err)}")
        self.step = step


def _fail(step: str) -> MountError:
    return MountError(ctypes.get_errno() or errno.EIO, step)


def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None,
          step: str) -> None:
    r = _libc.mount(src.encode() if src else None, target.encode(),
                    fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                    data.encode() if data else None)
    if r != 0:
        raise _fail(step)


def set_attr(target: str, attrs: int, *, recursive: bool, step: str, dirfd: int = AT_FDCWD,
             propagation: int = 0) -> None:
    """mount_setattr(2): add flags to a mount (and, recursively, to the mounts below it).
    With ``dirfd`` and an empty ``target``: the (detached) mount ``dirfd`` refers to."""
    ma = _MountAttr(attrs, 0, propagation, 0)
    flags = (AT_RECURSIVE if recursive else 0) | (AT_EMPTY_PATH if not target else 0)
    r = _libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(dirfd),
                      target.encode(), ctypes.c_uint(flags),
                      ctypes.byref(ma), ctypes.c_size_t(ctypes.sizeof(ma)))
    if r != 0:
        raise _fail(step)


def mount_api_available() -> bool:
    """open_tree/move_mount (5.2) and mount_setattr (5.12): the tree is built with them."""
    r = _libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(-1), b"", ctypes.c_uint(0),
                      None, ctypes.c_size_t(0))
    return not (r < 0 and ctypes.get_errno() == errno.ENOSYS)


def clone_tree(path: str, attrs: int) -> int:
    """A detached, private copy of the mount tree at ``path`` with ``attrs`` added (parent,
    root only). The copy shares nothing with the host's mounts but the files themselves."""
    fd = int(_libc.syscall(ctypes.c_long(SYS_OPEN_TREE), ctypes.c_int(AT_FDCWD), path.encode(),
                           ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE)))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"open_tree {path}: {os.strerror(e)}")
    try:
        set_attr("", attrs, recursive=True, step=f"restrict {path}", dirfd=fd,
                 propagation=MS_PRIVATE)
    except OSError:
        os.close(fd)
        raise
    return fd


def move_tree(fd: int, target: str, step: str) -> None:
    r = _libc.syscall(ctypes.c_long(SYS_MOVE_MOUNT), ctypes.c_int(fd), b"",
                      ctypes.c_int(AT_FDCWD), target.encode(),
                      ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH))
    if r != 0:
        raise _fail(step)


@dataclass(frozen=True)
class Op:
    """One step of the tree. ``target`` is a path inside the view."""

    kind: str
    """``bind`` (a tree ``fd`` cloned by the parent, or host path ``source`` opened by the
    child), ``symlink`` (to ``data``), ``file`` (content ``data``), ``tmpfs`` (options
    ``data``), ``proc``, ``hide``."""
    target: str
    fd: int = -1
    source: str = ""
    is_dir: bool = True
    writable: bool = False
    data: str = ""


@dataclass
class Plan:
    ops: list[Op] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    visible: list[str] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)
    method: str = ""

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


def _depth(p: str) -> int:
    return len([c for c in p.split("/") if c])


RO = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV


def plan(*, workspace: Path, workspace_view: Path, workspace_writable: bool,
         read_paths: tuple[Path, ...], hidden: tuple[Path, ...], scratch_bytes: int,
         uid: int, gid: int, clone: bool) -> Plan:
    """List the steps (and, with ``clone``, take every source now). Runs in the kernel
    process; raises OSError when a source is missing (the caller makes it a SandboxError)."""
    p = Plan(method="open_tree clones taken by the kernel" if clone
             else "binds of sources opened by the sandbox child")
    try:
        _fill(p, workspace=workspace, workspace_view=workspace_view,
              workspace_writable=workspace_writable, read_paths=read_paths, hidden=hidden,
              scratch_bytes=scratch_bytes, uid=uid, gid=gid, clone=clone)
    except BaseException:
        p.close()
        raise
    return p


def _fill(p: Plan, *, workspace: Path, workspace_view: Path, workspace_writable: bool,
          read_paths: tuple[Path, ...], hidden: tuple[Path, ...], scratch_bytes: int,
          uid: int, gid: int, clone: bool) -> None:

    def bind(target: str, source: str, *, writable: bool = False, attrs: int = RO) -> Op:
        st = os.stat(source)
        is_dir = stat.S_ISDIR(st.st_mode)
        if not clone:
            return Op("bind", target, source=source, is_dir=is_dir, writable=writable)
        fd = clone_tree(source, attrs & ~MOUNT_ATTR_RDONLY if writable else attrs)
        p.fds.append(fd)
        return Op("bind", target, fd=fd, is_dir=is_dir, writable=writable)

    if not stat.S_ISDIR(os.stat(workspace).st_mode):  # missing or unreachable: raises
        raise NotADirectoryError(errno.ENOTDIR, "the workspace is not a directory",
                                 str(workspace))
    binds: list[Op] = []
    # (host source, view path) pairs, for mapping hidden host paths into the view.
    sources: list[tuple[Path, Path]] = []

    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            binds.append(Op("symlink", d, data=os.readlink(d)))
        elif os.path.isdir(d):
            binds.append(bind(d, d))
            sources.append((Path(d), Path(d)))

    binds.append(Op("file", "/etc/passwd", data=(
        "root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"agent:x:{uid}:{gid}:sandboxed agent:/tmp:/usr/sbin/nologin\n")))
    binds.append(Op("file", "/etc/group", data=f"root:x:0:\nagent:x:{gid}:\n"))
    binds.append(Op("file", "/etc/hosts", data="127.0.0.1\tlocalhost\n::1\tlocalhost\n"))
    binds.append(Op("file", "/etc/hostname", data="sandbox\n"))
    for name in ETC_ENTRIES:
        host = f"/etc/{name}"
        if os.path.islink(host):
            binds.append(Op("symlink", host, data=os.readlink(host)))
        elif os.path.exists(host):
            binds.append(bind(host, host))

    for name in DEVICES:
        # Device nodes keep working on a read-only mount; "nodev" would break them.
        binds.append(bind(f"/dev/{name}", f"/dev/{name}",
                          attrs=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID))
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        binds.append(Op("symlink", f"/dev/{name}", data=target))

    binds.append(Op("proc", "/proc"))
    binds.append(Op("tmpfs", "/tmp",  # noqa: S108 (the sandbox's private scratch tmpfs)
                    data=f"size={scratch_bytes},mode=1777,nr_inodes=65536"))

    binds.append(bind(str(workspace_view), str(workspace), writable=workspace_writable))
    sources.append((workspace, workspace_view))
    for rp in read_paths:
        binds.append(bind(str(rp), str(rp)))
        sources.append((rp, rp))

    binds.sort(key=lambda op: _depth(op.target))  # parents before what is mounted inside them
    p.ops = binds
    p.visible = sorted({op.target for op in binds if op.kind == "bind"})

    hides: list[Op] = []
    for h in hidden:
        try:
            st = os.lstat(h)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            continue  # only the link text is visible; its target is judged on its own
        for src, view in sources:
            if h == src or h.is_relative_to(src):
                hides.append(Op("hide", str(view / h.relative_to(src)),
                                is_dir=stat.S_ISDIR(st.st_mode)))
    hides.sort(key=lambda op: _depth(op.target))
    p.ops += hides
    p.hidden = sorted({op.target for op in hides})


def _mkdirs(path: str) -> None:
    try:
        os.makedirs(path, mode=0o755, exist_ok=True)
    except OSError as e:
        raise MountError(e.errno or errno.EIO, f"create mountpoint {path}") from None


def _touch(path: str, mode: int = 0o444, content: bytes = b"") -> None:
    parent = path.rsplit("/", 1)[0]
    _mkdirs(parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
        try:
            if content:
                os.write(fd, content)
        finally:
            os.close(fd)
    except OSError as e:
        raise MountError(e.errno or errno.EIO, f"create {path}") from None


def build(p: Plan) -> str:
    """In the sandbox child (pid 1 of the new pid namespace, all capabilities in the new user
    namespace): assemble the tree, pivot into it, detach the host's. Returns the /proc status.
    """
    # Nothing we mount may propagate back to the host (and host mounts stop arriving).
    mount(None, "/", None, MS_REC | MS_PRIVATE, None, "make / rprivate")
    # Sources named by path (kernel not root) are opened now, before anything hides them.
    opened: dict[str, int] = {}
    for op in p.ops:
        if op.kind == "bind" and op.source and op.source not in opened:
            try:
                opened[op.source] = os.open(op.source, os.O_PATH | os.O_CLOEXEC)
            except OSError as e:
                raise MountError(e.errno or errno.EIO, f"open {op.source}") from None
    root = STAGING
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1048576,nr_inodes=4096",
          "tmpfs for the new root")
    empty = f"{root}/.empty"  # the source of "hide" for files; made only when needed
    if any(op.kind == "hide" and not op.is_dir for op in p.ops):
        _touch(empty, 0o000)
    proc_status = "not mounted"
    for op in p.ops:
        t = root + op.target
        if op.kind == "symlink":
            _mkdirs(t.rsplit("/", 1)[0])
            try:
                os.symlink(op.data, t)
            except OSError as e:
                raise MountError(e.errno or errno.EIO, f"symlink {op.target}") from None
        elif op.kind == "file":
            _touch(t, 0o444, op.data.encode())
        elif op.kind == "tmpfs":
            _mkdirs(t)
            mount("tmpfs", t, "tmpfs", MS_NOSUID | MS_NODEV, op.data, f"tmpfs {op.target}")
        elif op.kind == "proc":
            _mkdirs(t)
            try:
                mount("proc", t, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                      "subset=pid,hidepid=invisible", "mount /proc")
                proc_status = "mounted (subset=pid, hidepid=invisible)"
            except MountError as e:
                # Stricter, never weaker: go on without /proc and say so.
                proc_status = f"not mounted: {os.strerror(e.errno or errno.EIO)}"
        elif op.kind == "bind":
            if op.is_dir:
                _mkdirs(t)
            elif not os.path.lexists(t):
                _touch(t)
            if op.fd >= 0:
                move_tree(op.fd, t, f"attach {op.target}")
            else:
                mount(f"/proc/self/fd/{opened[op.source]}", t, None, MS_BIND | MS_REC, None,
                      f"bind {op.target}")
                attrs = RO if not op.target.startswith("/dev/") else (
                    MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
                if op.writable:
                    attrs &= ~MOUNT_ATTR_RDONLY
                set_attr(t, attrs, recursive=True, step=f"restrict {op.target}")
        elif op.kind == "hide":
            if not os.path.lexists(t):
                continue
            if op.is_dir:
                mount("tmpfs", t, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                      "size=4096,nr_inodes=1,mode=000", f"hide {op.target}")
            else:
                mount(empty, t, None, MS_BIND, None, f"hide {op.target}")
                set_attr(t, RO, recursive=False, step=f"hide {op.target}")
    for fd in opened.values():
        os.close(fd)
    # Enter the new tree and drop the host's: pivot_root(".", ".") stacks the old root on
    # top of the new one; detaching it leaves nothing of the host reachable by path.
    os.chdir(root)
    if _libc.syscall(ctypes.c_long(SYS_PIVOT_ROOT), b".", b".") != 0:
        raise _fail("pivot_root")
    if _libc.umount2(b".", ctypes.c_int(MNT_DETACH)) != 0:
        raise _fail("detach the old root")
    os.chdir("/")
    set_attr("/", RO, recursive=False, step="remount / read-only")
    return proc_status
