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
import tempfile
from functools import cache
from typing import Any

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


@cache
def _compiled() -> tuple[bytes, tuple[str, ...]]:
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
