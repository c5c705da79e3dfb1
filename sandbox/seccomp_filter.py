"""The seccomp-bpf filter of the native sandbox: compiled once with libseccomp, loaded raw.

The filter is a deny-list over a default of ALLOW (the agent runs arbitrary interpreters), built
with pyseccomp once per process, exported as a classic BPF program and loaded in the sandbox
child with ``prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)``: the child never runs
libseccomp, and the SHA-256 of the exact program is recorded.

What it stops (each line is a rule below):

* foreign architectures and the x32 ABI: the whole process is killed (a deny-list without an
  arch check is bypassed through ``int 0x80``);
* ``clone3`` and io_uring return ENOSYS: clone3's flags live in memory a filter cannot read (libc
  falls back to ``clone``), and io_uring performs open/connect/... without those syscalls;
* namespace creation and mounts: ``unshare``, ``setns``, ``clone`` with any ``CLONE_NEW*`` flag,
  ``mount``, ``umount2``, ``pivot_root``, ``chroot`` and the new mount API;
* kernel attack surface and other processes: bpf, perf_event_open, userfaultfd, keyctl, ptrace,
  process_vm_*, kexec, modules, handles, syslog, acct, swap, reboot, clocks, quotactl...;
* ``personality`` except the query (0xffffffff) and PER_LINUX (0): ADDR_NO_RANDOMIZE and
  READ_IMPLIES_EXEC would survive exec;
* terminal injection: ioctl TIOCSTI / TIOCLINUX, comparing only the low 32 bits of the command
  (the kernel ignores the upper half: CVE-2019-10063);
* sockets of any family but AF_UNIX (EAFNOSUPPORT): no network even if a namespace leaked.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from sandbox import hostcache

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

AF_UNIX = 1
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
LOW32 = 0xFFFFFFFF

CLONE_NEW_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}

ENOSYS_CALLS = ("clone3", "io_uring_setup", "io_uring_enter", "io_uring_register")

EPERM_CALLS = (
    # mounts and namespaces
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # kernel attack surface
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "open_by_handle_at", "name_to_handle_at", "syslog", "acct", "swapon", "swapoff",
    "reboot", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "quotactl",
    "quotactl_fd", "iopl", "ioperm", "lookup_dcookie", "vhangup", "uselib",
    # other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    "process_madvise", "move_pages", "migrate_pages",
)


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def program() -> bytes:
    """The compiled BPF program (compiled once per process)."""
    return _compiled()[0]


def summary() -> dict[str, list[str]]:
    """What the program does, by name, for the record."""
    _, eperm = _compiled()
    return {
        "killed": ["any foreign architecture or x32 system call"],
        "enosys": list(ENOSYS_CALLS),
        "eperm": list(eperm),
        "eperm_if": ["clone with any CLONE_NEW* flag",
                     "ioctl TIOCSTI or TIOCLINUX (low 32 bits of the command)",
                     "personality other than 0 and 0xffffffff"],
        "eafnosupport_if": ["socket or socketpair of a family other than AF_UNIX"],
    }


def _import_pyseccomp() -> Any:
    """``import pyseccomp``, without the two ``ldconfig -p`` runs its import makes.

    pyseccomp locates libc and libseccomp with ``ctypes.util.find_library``, which forks
    ``ldconfig -p`` each time (about 9 ms of every ``kernel exec``). The sonames it would find
    are tried first through the dynamic loader (the same search ldconfig's cache serves);
    anything else falls back to the real lookup.
    """
    import ctypes.util

    real = ctypes.util.find_library
    sonames = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}

    def quick(name: str) -> str | None:
        so = sonames.get(name)
        if so is not None:
            try:
                ctypes.CDLL(so)
                return so
            except OSError:
                pass
        return real(name)

    ctypes.util.find_library = quick
    try:
        import pyseccomp
    finally:
        ctypes.util.find_library = real
    return pyseccomp


# --------------------------------------------------------------------------------------------
# Compiled programs, cached per boot
#
# Compiling a filter means importing pyseccomp and running libseccomp (about 8 ms of every
# `kernel exec`). A compiled program is kept in the kernel home, keyed by everything the bytes
# depend on: the boot, the kernel release (libseccomp asks the running kernel which actions it
# supports), the machine and Python, the libseccomp file the dynamic loader maps (path, device,
# inode, size, mtime, ctime, mode, owner), the source of pyseccomp, of this module and of the
# module that defines the rules. Any change to any of those, or a new boot, compiles again; a
# failed or invalid compilation is never cached. As the firejail probe's cache: used only by
# root, in a directory of mode 0700 owned by root, never through a symbolic link, and ignored
# when its permissions are wrong; the program's SHA-256 is stored beside it and checked.

LIBSECCOMP = "libseccomp.so.2"
PROGRAM_CACHE = "cache/seccomp-{name}.json"

_origins: dict[str, str] = {}


def origin(name: str = "native") -> str:
    """How this process got the program ``name``: compiled now, or from the boot's cache."""
    return _origins.get(name, "not compiled yet")


def _file_identity(path: str) -> str:
    st = os.stat(path)
    return (f"{path}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:"
            f"{st.st_mode}:{st.st_uid}")


def _libseccomp_file() -> str | None:
    """The libseccomp file the dynamic loader maps for ``libseccomp.so.2``, or None."""
    try:
        ctypes.CDLL(LIBSECCOMP)
    except OSError:
        return None  # pyseccomp would search with ldconfig: not cached
    found: set[str] = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and os.path.basename(parts[5].strip()).startswith("libseccomp."):
                found.add(parts[5].strip())
    if len(found) != 1:
        return None
    (path,) = found
    return path if path.startswith("/") and not path.endswith(" (deleted)") else None


def cache_key(name: str, sources: Sequence[str]) -> str | None:
    """The cache key of the program ``name`` built by rules in ``sources``; None: no caching."""
    import importlib.util

    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        lib = _libseccomp_file()
        spec = importlib.util.find_spec("pyseccomp")
        if lib is None or not boot or spec is None or not spec.origin:
            return None
        parts = [name, boot, platform.release(), platform.machine(), sys.version,
                 _file_identity(lib), _file_identity(spec.origin)]
        for path in (spec.origin, __file__, *sources):
            with open(path, "rb") as src:
                parts.append(f"{path}:{hashlib.sha256(src.read()).hexdigest()}")
    except (OSError, ValueError, ImportError):
        return None
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _cache_path(name: str) -> Path | None:
    from kernel.keys import kernel_home

    if os.geteuid() != 0:
        return None
    return kernel_home() / PROGRAM_CACHE.format(name=name)


def _valid(bpf: bytes) -> bool:
    return bool(bpf) and len(bpf) % 8 == 0


def cache_get(name: str, key: str) -> tuple[bytes, tuple[str, ...], str] | None:
    """(program, names, when compiled) stored under ``key``, or None."""
    path = _cache_path(name)
    if path is None:
        return None
    raw = hostcache.read_private(path, 1 << 20)
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        if not isinstance(d, dict) or d.get("key") != key:
            return None
        bpf = bytes.fromhex(d["bpf"])
        names = d["names"]
        when = d["compiled_at"]
        if (not _valid(bpf) or d.get("sha256") != hashlib.sha256(bpf).hexdigest()
                or not isinstance(names, list) or not all(isinstance(n, str) for n in names)
                or not isinstance(when, str)):
            return None
    except (ValueError, KeyError, TypeError):
        return None
    return bpf, tuple(names), when


def cache_put(name: str, key: str, bpf: bytes, names: Sequence[str]) -> None:
    path = _cache_path(name)
    if path is None or not _valid(bpf):
        return
    text = json.dumps({"key": key, "bpf": bpf.hex(), "sha256": hashlib.sha256(bpf).hexdigest(),
                       "names": list(names),
                       "compiled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    hostcache.write_private(path, text.encode())


def compile_cached(name: str, build: Callable[[], tuple[bytes, tuple[str, ...]]],
                   sources: Sequence[str]) -> tuple[bytes, tuple[str, ...]]:
    """``build()``'s (program, names), from the boot's cache when the key matches."""
    key = cache_key(name, sources)
    if key is not None:
        hit = cache_get(name, key)
        if hit is not None:
            _origins[name] = f"cached this boot (compiled at {hit[2]})"
            return hit[0], hit[1]
    bpf, names = build()
    if not _valid(bpf):
        raise OSError(errno.EINVAL, "libseccomp exported an empty or truncated BPF program")
    _origins[name] = "compiled"
    if key is not None:
        cache_put(name, key, bpf, names)
    return bpf, names


@cache
def _compiled() -> tuple[bytes, tuple[str, ...]]:
    return compile_cached("native", compile_native, ())


def compile_native() -> tuple[bytes, tuple[str, ...]]:
    """Compile the native sandbox's program with libseccomp (no cache)."""
    sc = _import_pyseccomp()

    f = sc.SyscallFilter(sc.ALLOW)
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    for name in ENOSYS_CALLS:
        f.add_rule(sc.ERRNO(errno.ENOSYS), name)
    eperm: list[str] = []
    for name in EPERM_CALLS:
        try:
            f.add_rule(sc.ERRNO(errno.EPERM), name)
            eperm.append(name)
        except OSError as e:  # a name this libseccomp does not know cannot be called either
            if e.errno != errno.EINVAL:
                raise
    for flag in CLONE_NEW_FLAGS.values():
        f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    for cmd in (TIOCSTI, TIOCLINUX):
        f.add_rule(sc.ERRNO(errno.EPERM), "ioctl", sc.Arg(1, sc.MASKED_EQ, LOW32, cmd))
    for call in ("socket", "socketpair"):
        f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), call, sc.Arg(0, sc.NE, AF_UNIX))
    # personality(p) is allowed for p in {0, 0xffffffff} only (low 32 bits, as the kernel reads
    # them). libseccomp takes one comparison per argument and rule, so "any other value" is
    # written as: some bit i is set while the next bit (i+1 mod 32) is clear. Every 32-bit
    # value except all-zeros and all-ones has such a pair.
    for i in range(32):
        j = (i + 1) % 32
        f.add_rule(sc.ERRNO(errno.EPERM), "personality",
                   sc.Arg(0, sc.MASKED_EQ, (1 << i) | (1 << j), 1 << i))
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        bpf = out.read()
    if not bpf or len(bpf) % 8:
        raise OSError(errno.EINVAL, "libseccomp exported an empty or truncated BPF program")
    return bpf, tuple(eperm)


def digest() -> str:
    return "sha256:" + hashlib.sha256(program()).hexdigest()


class Loader:
    """Holds the program in C memory so that loading it in the child allocates nothing."""

    def __init__(self, bpf: bytes) -> None:
        self._buf = ctypes.create_string_buffer(bpf, len(bpf))
        self._prog = _SockFprog(len(bpf) // 8, ctypes.addressof(self._buf))
        self._libc = ctypes.CDLL(None, use_errno=True)

    def load(self) -> None:
        """Install the filter on this thread. ``no_new_privs`` must be set already."""
        r = self._libc.prctl(ctypes.c_int(PR_SET_SECCOMP), ctypes.c_ulong(SECCOMP_MODE_FILTER),
                             ctypes.byref(self._prog), ctypes.c_ulong(0), ctypes.c_ulong(0))
        if r != 0:
            e = ctypes.get_errno()
            raise OSError(e, "prctl(PR_SET_SECCOMP)")


@cache
def loader() -> Loader:
    return Loader(program())
