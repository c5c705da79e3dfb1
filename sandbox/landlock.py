"""Landlock through ctypes: ABI negotiation, and a ruleset applied in the final sandbox child.

Landlock is unprivileged, inherited across fork and exec, and path based (it follows the real
inode, so symlinks and hard links do not get around it). It restricts only the thread that calls
``landlock_restrict_self`` (before ABI 8), so it is applied in the single-threaded child just
before ``execve``.

Everything that allocates or decides is done in the parent (:func:`plan`); the child only opens
the rule paths and makes three system calls (:func:`apply`).
"""

from __future__ import annotations

import ctypes
import os
import stat
from dataclasses import dataclass
from typing import Any

# x86_64 system call numbers (the same on every architecture that has Landlock).
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446

CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1

# Filesystem rights (ABI 1 unless noted).
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5

NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1  # ABI 4

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

RESTRICT_SELF_LOG_NEW_EXEC_ON = 1 << 1  # ABI 7

# Rights that may be granted on a regular or device file (others need a directory).
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV

READ_EXEC = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
# Writing in scratch and a writable workspace: everything but device nodes, sockets and FIFOs
# (and never ioctl on devices).
WRITE = (FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_DIR | FS_MAKE_REG
         | FS_MAKE_SYM | FS_REFER | FS_TRUNCATE)
DEVICE_WRITE = FS_WRITE_FILE | FS_TRUNCATE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _RulesetAttr(ctypes.Structure):
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


def abi_version() -> int:
    """The Landlock ABI this kernel offers; 0 when Landlock is absent or disabled."""
    r = int(_libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                          ctypes.c_uint32(CREATE_RULESET_VERSION)))
    return max(r, 0)


def handled_fs(abi: int) -> int:
    """Every filesystem right this ABI knows: all of them are handled (denied unless granted)."""
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


@dataclass(frozen=True)
class Plan:
    """A ruleset, decided in the parent, applied in the child by :func:`apply`."""

    abi: int
    handled_fs: int
    handled_net: int
    scoped: int
    rules: tuple[tuple[str, int], ...]
    """(path inside the sandbox view, granted rights); rights are masked to the ABI."""
    restrict_flags: int

    def summary(self) -> dict[str, Any]:
        """What is enforced, for the record (no floats, no raw masks without names)."""
        def names(mask: int, table: dict[int, str]) -> list[str]:
            return [n for bit, n in table.items() if mask & bit]

        return {
            "abi": self.abi,
            "rules": {p: names(r, _FS_NAMES) for p, r in self.rules},
            "handled_fs": names(self.handled_fs, _FS_NAMES),
            "tcp": "bind and connect denied" if self.handled_net else "not restricted (ABI < 4)",
            "scopes": names(self.scoped, {SCOPE_ABSTRACT_UNIX_SOCKET: "abstract_unix_socket",
                                          SCOPE_SIGNAL: "signal"}),
            "log_new_exec": bool(self.restrict_flags & RESTRICT_SELF_LOG_NEW_EXEC_ON),
        }


_FS_NAMES = {
    FS_EXECUTE: "execute", FS_WRITE_FILE: "write_file", FS_READ_FILE: "read_file",
    FS_READ_DIR: "read_dir", FS_REMOVE_DIR: "remove_dir", FS_REMOVE_FILE: "remove_file",
    FS_MAKE_CHAR: "make_char", FS_MAKE_DIR: "make_dir", FS_MAKE_REG: "make_reg",
    FS_MAKE_SOCK: "make_sock", FS_MAKE_FIFO: "make_fifo", FS_MAKE_BLOCK: "make_block",
    FS_MAKE_SYM: "make_sym", FS_REFER: "refer", FS_TRUNCATE: "truncate",
    FS_IOCTL_DEV: "ioctl_dev",
}


def plan(abi: int, *, writable_dirs: list[str], writable_devices: list[str]) -> Plan:
    """Read and execute everywhere in the view; write only in ``writable_dirs``; write (not
    ioctl) on the listed device files; no TCP; abstract unix sockets and signals scoped."""
    fs = handled_fs(abi)
    rules: list[tuple[str, int]] = [("/", READ_EXEC & fs)]
    rules += [(d, (READ_EXEC | WRITE) & fs) for d in writable_dirs]
    rules += [(d, DEVICE_WRITE & fs) for d in writable_devices]
    return Plan(
        abi=abi,
        handled_fs=fs,
        handled_net=(NET_BIND_TCP | NET_CONNECT_TCP) if abi >= 4 else 0,
        scoped=(SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if abi >= 6 else 0,
        rules=tuple(rules),
        restrict_flags=RESTRICT_SELF_LOG_NEW_EXEC_ON if abi >= 7 else 0,
    )


def _check(r: int, what: str) -> int:
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return r


def apply(p: Plan) -> None:
    """Create the ruleset, add the rules, restrict this thread. Needs ``no_new_privs`` set."""
    attr = _RulesetAttr(p.handled_fs, p.handled_net, p.scoped)
    # Before ABI 4 the kernel knows only the first field; extra zero bytes are accepted.
    fd = _check(int(_libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(attr),
                                  ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))),
                "landlock_create_ruleset")
    try:
        for path, rights in p.rules:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                if not stat.S_ISDIR(os.fstat(pfd).st_mode):  # files take only file rights
                    rights &= FILE_RIGHTS
                rule = _PathBeneathAttr(rights, pfd)
                _check(int(_libc.syscall(ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ctypes.c_int(fd),
                                         ctypes.c_int(RULE_PATH_BENEATH), ctypes.byref(rule),
                                         ctypes.c_uint32(0))),
                       f"landlock_add_rule {path}")
            finally:
                os.close(pfd)
        _check(int(_libc.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(fd),
                                 ctypes.c_uint32(p.restrict_flags))),
               "landlock_restrict_self")
    finally:
        os.close(fd)
