"""The ``native`` isolation backend: namespaces, a fresh mount tree, Landlock, seccomp, rlimits
and cgroups, built by this project from Linux primitives.

The launch is a visible checklist in the order of nsjail's ``containProc`` (isolation notes
§6). The kernel process forks once; no new interpreter starts until the agent's own ``execve``.
Each step says why it is safe.

**Stage A**, the *waiter*: a child of the kernel, the pid the kernel waits for.

A1. Join the sandbox's cgroups (fds opened by the kernel). *Before anything else runs, so every
    later process is counted and limited; nothing can leave a cgroup without privilege.*
A2. ``setsid``. *No controlling terminal: TIOCSTI on a terminal that is not the caller's
    controlling tty needs CAP_SYS_ADMIN (seccomp filters it as well, B9).*
A3. ``PR_SET_PDEATHSIG(SIGKILL)``, then check the parent is still the kernel. *If the kernel
    dies, the waiter dies; the init follows (B1), and the whole pid namespace with it.*
A4. Default signal dispositions, empty mask, RLIMIT_CORE=0. *No handler of the kernel's runs
    here, and no core file of this process can be written anywhere.*
A5. The spec's stdin/stdout/stderr (or /dev/null) onto 0/1/2; close every other descriptor but
    ``pass_fds``. *Nothing the kernel had open reaches the sandbox (runc CVE-2024-21626).*
A6. Switch to the dedicated agent uid/gid (kernel running as root). *The agent never is, or
    maps to, host root; per-user limits bite; it owns nothing of the host.*
A7. New user namespace mapping only that uid/gid (``setgroups`` denied), then new mount, pid,
    net, ipc, uts and cgroup namespaces. *The capabilities needed to build the tree exist only
    over namespaces the sandbox owns; an empty net namespace has no route anywhere; abstract
    unix sockets and SysV IPC are per namespace.*
A8. Fork B (pid 1 of the new pid namespace); then only wait and mirror the agent's status.
    *A runs no agent code and keeps no descriptor of the agent's. A and B are copies of the
    kernel's memory: both are non-dumpable, so the agent (same uid) cannot read their
    /proc/<pid>/mem or environ, and hidepid makes B invisible to it.*

**Stage B**, pid 1 of the sandbox (its init): confines itself, then starts the agent.

B1. ``PR_SET_PDEATHSIG(SIGKILL)`` and check A still lives. *The chain kernel -> A -> B is
    unbroken: killing any link kills the namespace.*
B2. Build the mount tree from scratch (``sandbox/mounts.py``), ``pivot_root`` into it, detach
    the host's tree, make the new root read-only. *Only what is listed is reachable by any
    path; sources were taken before anything could hide or swap them.*
B3. Hostname ``sandbox``; close the descriptors used to build the tree. *No handle on a host
    mount survives into the agent.*
B4. rlimits: CPU, NOFILE, NPROC, FSIZE, CORE=0 (AS, only without a memory cgroup, in B10).
    *Per-process resource caps that need no privilege to enforce.*
B5. Drop every capability: bounding set, ambient, effective/permitted/inheritable. *The
    capabilities B held over its own namespaces are gone before anything untrusted runs.*
B6. ``PR_SET_NO_NEW_PRIVS``. *No setuid/setgid/file-capability gain across exec, ever.*
B7. Landlock: read+execute in the view, write only in scratch (and a writable workspace), no
    device/socket/FIFO creation, no device ioctl, no TCP, abstract unix sockets and signals
    scoped. *A second, path-based wall that holds even if a mount is wrong.*
B8. ``chdir(spec.cwd)``.
B9. seccomp (``sandbox/seccomp_filter.py``, compiled once, loaded raw). *Kernel attack
    surface and every way back out of the namespaces are refused by number and argument.*
B10. ``posix_spawn`` the agent with exactly ``spec.env`` and default signal dispositions (with
     an AS limit: fork, set it in the child, execve, since this fork of the kernel may already
     be larger than the limit); then close everything, reap orphans, report the agent's status
     to A. *The agent inherits all of
     the above; it is not pid 1, so the kernel's SIGXCPU/SIGXFSZ do end it.*

A failing step is written (step, errno) to a close-on-exec pipe and the process exits 127
before anything of the agent ran; the parent raises :class:`SandboxError` naming the step.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import os
import platform
import resource
import select
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

from kernel.errors import SandboxError
from sandbox import cgroups, landlock, mounts, seccomp_filter
from sandbox.base import Availability, SandboxSpec

try:  # everything the child uses is imported here: after pivot_root nothing else can be
    import prctl
except ImportError:  # pragma: no cover - reported by probe()
    prctl = None

AGENT_UID = 64000
"""Host uid the agent runs as when the kernel is root (override: ``KERNEL_AGENT_UID``)."""
AGENT_GID = 64000
"""Host gid, likewise (override: ``KERNEL_AGENT_GID``)."""

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACES = ("user", "mount", "pid", "net", "ipc", "uts", "cgroup")

PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

SETUP_TIMEOUT_S = 10.0
MIB = 1024 * 1024

_libc = ctypes.CDLL(None, use_errno=True)


def _readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` becomes readable within ``timeout`` seconds (poll(2): unlike select(2),
    any descriptor number works, so a kernel serving many agents is not limited to fd 1023)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(max(timeout, 0.0) * 1000))


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32))


class _StepError(Exception):
    def __init__(self, step: str, err: int, detail: str = "") -> None:
        super().__init__(step)
        self.step = step
        self.err = err
        self.detail = detail


@contextlib.contextmanager
def _step(name: str) -> Iterator[None]:
    """Name the checklist step that is running, for the report to the parent on failure."""
    try:
        yield
    except _StepError:
        raise
    except mounts.MountError as e:
        raise _StepError(f"{name}: {e.step}", e.errno or errno.EIO) from None
    except OSError as e:
        raise _StepError(name, e.errno or errno.EIO, str(e)) from None
    except Exception as e:
        raise _StepError(name, errno.EINVAL, repr(e)) from None


def _ids() -> tuple[int, int]:
    """The agent's host (uid, gid): the dedicated ids when the kernel is root, else its own."""
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    ids = []
    for var, default in (("KERNEL_AGENT_UID", AGENT_UID), ("KERNEL_AGENT_GID", AGENT_GID)):
        raw = os.environ.get(var, str(default))
        if not raw.isdigit() or not 0 < int(raw) < 0xFFFFFFFF:
            raise SandboxError(f"{var}={raw!r} is not a usable id",
                               hint="a positive integer other than 0 (root) and 4294967295")
        ids.append(int(raw))
    return ids[0], ids[1]


def _unshare(flags: int) -> None:
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _prctl(option: int, arg: int, what: str) -> None:
    if _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0),
                   ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


@cache
def _cap_last() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 63


@cache
def _probe_userns() -> str:
    """'' if a user namespace (with the other namespaces) can be created here, else why not."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            if os.geteuid() == 0:
                uid, gid = _ids()
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
            _unshare(CLONE_NEWUSER)
            _unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
            os._exit(0)
        except OSError as e:
            os._exit(min(e.errno or 1, 120))
        finally:
            os._exit(121)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return ""
    why = f"cannot create user/mount/pid/net namespaces: {os.strerror(code)}"
    if code in (errno.EPERM, errno.EACCES, errno.ENOSPC, errno.EINVAL, errno.ENOSYS):
        why += (" (this host forbids or limits user namespaces: see the sysctls "
                "user.max_user_namespaces and kernel.unprivileged_userns_clone, an AppArmor "
                "userns restriction, or a container's seccomp profile; the native backend needs "
                "them, even as root)")
    return why


@dataclass
class _Launch:
    """Everything the child needs, prepared in the parent (the child allocates little)."""

    spec: SandboxSpec
    uid: int
    gid: int
    as_root: bool
    kernel_pid: int
    mount_plan: mounts.Plan
    ll_plan: landlock.Plan
    seccomp: seccomp_filter.Loader
    group: cgroups.Group | None
    rlimits: list[tuple[int, int, int]]
    devnull: int
    err_w: int
    report_w: int


def _report(fd: int, e: _StepError) -> None:
    msg = f"error\t{e.step}\t{e.err}\t{e.detail}\n".encode(errors="replace")
    with contextlib.suppress(OSError):
        os.write(fd, msg)


def _stage_a(L: _Launch) -> None:
    """The waiter. Runs in the fresh child of the kernel; never returns."""
    spec = L.spec
    _cap_last()  # read now: after pivot_root there is no /proc/sys
    with _step("A1 join cgroups"):
        if L.group is not None:
            L.group.join_self()
            L.group.close_fds()
    with _step("A2 setsid"):
        os.setsid()
    with _step("A3 parent-death signal"):
        prctl.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != L.kernel_pid:
            raise _StepError("A3 parent-death signal", errno.ESRCH, "the kernel already exited")
    with _step("A4 signals"):
        for sig in signal.valid_signals():
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                with contextlib.suppress(OSError, ValueError):
                    signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with _step("A5 descriptors"):
        sources = [spec.stdin, spec.stdout, spec.stderr]
        tmp = [os.dup(L.devnull if s is None else s) for s in sources]  # dups are CLOEXEC
        for i, t in enumerate(tmp):
            os.dup2(t, i, inheritable=True)
        keep = {0, 1, 2, L.err_w, L.report_w, *spec.pass_fds, *L.mount_plan.fds}
        _close_all_but(keep)
        for fd in spec.pass_fds:
            os.set_inheritable(fd, True)
    if L.as_root:
        with _step("A6 agent uid/gid"):
            os.setgroups([])
            os.setresgid(L.gid, L.gid, L.gid)
            os.setresuid(L.uid, L.uid, L.uid)
            prctl.set_pdeathsig(signal.SIGKILL)  # a uid change clears it
            if os.getppid() != L.kernel_pid:
                raise _StepError("A6 agent uid/gid", errno.ESRCH, "the kernel already exited")
    with _step("A7 namespaces"):
        # A credential change leaves the process non-dumpable, and /proc/self/uid_map then
        # belongs to root: make it ours for the three writes below.
        prctl.set_dumpable(1)
        _unshare(CLONE_NEWUSER)
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{L.uid} {L.uid} 1\n")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{L.gid} {L.gid} 1\n")
        # A (and B, forked from it) is a copy of the kernel's memory and environment: not
        # dumpable, so no process of the agent's uid may read /proc/<pid>/{mem,environ} of it.
        prctl.set_dumpable(0)
        _unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
                 | CLONE_NEWCGROUP)
    with _step("A8 fork the sandbox init"):
        life_r, life_w = os.pipe()
        st_r, st_w = os.pipe()
        child = os.fork()
    if child == 0:
        for fd in (life_w, st_r, L.report_w):
            os.close(fd)
        try:
            _stage_b(L, life_r, st_w)
        except _StepError as e:
            _report(L.err_w, e)
        except BaseException as e:  # pragma: no cover - a bug in the checklist itself
            _report(L.err_w, _StepError("B", errno.EINVAL, repr(e)))
        os._exit(127)
    # A from here on: keep only the report pipe, the init's status pipe and the life pipe
    # (its end in the init closes when A dies); wait for the init; mirror the agent's status.
    os.write(L.report_w, f"pid\t{child}\n".encode())
    _close_all_but({L.report_w, life_w, st_r})
    while True:
        try:
            _, status, ru = os.wait4(child, 0)
            break
        except ChildProcessError:  # pragma: no cover
            os._exit(126)
    cpu_ms = int((ru.ru_utime + ru.ru_stime) * 1000)
    with contextlib.suppress(OSError):
        parts = os.read(st_r, 256).decode().split()
        if len(parts) == 3 and parts[0] == "agent":  # the init saw the agent end
            status, cpu_ms = int(parts[1]), int(parts[2])
    with contextlib.suppress(OSError):
        os.write(L.report_w, f"exit\t{status}\t{cpu_ms}\n".encode())
    if os.WIFSIGNALED(status):
        termsig = os.WTERMSIG(status)
        with contextlib.suppress(OSError, ValueError):
            signal.signal(termsig, signal.SIG_DFL)
        with contextlib.suppress(OSError):
            os.kill(os.getpid(), termsig)
        os._exit(128 + termsig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 125)


def _close_all_but(keep: set[int]) -> None:
    """close_range over the gaps between the descriptors to keep."""
    lo = 0
    for k in sorted(keep):
        if k > lo:
            os.closerange(lo, k)
        lo = max(lo, k + 1)
    os.closerange(lo, 1 << 20)


def _stage_b(L: _Launch, life_r: int, st_w: int) -> None:
    """pid 1 of the sandbox. Builds the rest of the cage (which then holds it too), starts the
    agent as its child, reaps orphans, and reports the agent's status to the waiter.

    The agent is not pid 1 itself: a pid-namespace init ignores signals it has no handler for,
    even the kernel's SIGXCPU and SIGXFSZ, so limits would not bite as documented."""
    spec = L.spec
    with _step("B1 parent-death signal"):
        prctl.set_pdeathsig(signal.SIGKILL)
        if _readable(life_r, 0):  # EOF: the waiter (and so the kernel's child) is gone
            raise _StepError("B1 parent-death signal", errno.ESRCH, "the waiter exited")
        os.close(life_r)
    with _step("B2 mount tree"):
        proc_status = mounts.build(L.mount_plan)
        os.write(L.err_w, f"note\tproc\t{proc_status}\n".encode())
    with _step("B3 hostname and descriptors"):
        socket.sethostname("sandbox")
        _close_all_but({0, 1, 2, L.err_w, st_w, *spec.pass_fds})
    # RLIMIT_AS (set only without a memory cgroup) is applied in the agent's own process just
    # before its execve: this init is a fork of the kernel, whose address space may already be
    # larger than the limit, and spawning from it needs to map memory.
    as_limit = [rl for rl in L.rlimits if rl[0] == resource.RLIMIT_AS]
    with _step("B4 rlimits"):
        for res, soft, hard in L.rlimits:
            if res != resource.RLIMIT_AS:
                resource.setrlimit(res, (soft, hard))
    with _step("B5 drop capabilities"):
        # python-prctl knows only the capabilities of its build; drop every one the running
        # kernel has (cap_last_cap) through prctl(2) itself.
        for cap in range(_cap_last() + 1):
            _prctl(PR_CAPBSET_DROP, cap, "PR_CAPBSET_DROP")
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "PR_CAP_AMBIENT_CLEAR_ALL")
        hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        if _libc.capset(ctypes.byref(hdr), data) != 0:
            raise OSError(ctypes.get_errno(), "capset")
    with _step("B6 no_new_privs"):
        prctl.set_no_new_privs(1)
    with _step("B7 landlock"):
        landlock.apply(L.ll_plan)
    with _step("B8 cwd"):
        os.chdir(spec.cwd)
    with _step("B9 seccomp"):
        L.seccomp.load()
    with _step("B10 execve"):
        # posix_spawn (vfork+exec) rather than a fork of this interpreter: cheaper. The
        # agent starts with default dispositions (SIG_IGN would survive exec) and no mask.
        defaults = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGXCPU)
        if not as_limit:
            agent = os.posix_spawn(spec.argv[0], list(spec.argv), dict(spec.env),
                                   setsigdef=defaults, setsigmask=())
        else:
            agent = _spawn_with_as_limit(spec, as_limit[0], defaults, L.err_w)
    # The init: hold nothing of the agent's (its pipes must see EOF when the agent ends),
    # reap every orphan, end when the agent ends (the kernel then kills the namespace).
    _close_all_but({st_w})
    while True:
        try:
            pid, status, ru = os.wait4(-1, 0)
        except ChildProcessError:  # pragma: no cover - the agent is always our child
            os._exit(126)
        if pid == agent:
            cpu_ms = int((ru.ru_utime + ru.ru_stime) * 1000)
            with contextlib.suppress(OSError):
                os.write(st_w, f"agent {status} {cpu_ms}".encode())
            os._exit(0)


def _spawn_with_as_limit(spec: SandboxSpec, limit: tuple[int, int, int],
                         defaults: tuple[signal.Signals, ...], err_w: int) -> int:
    """fork, then in the child: default dispositions, empty mask, RLIMIT_AS, execve. Everything
    the child needs is built before the fork, so nothing is allocated under the limit."""
    path, argv, env = spec.argv[0], list(spec.argv), dict(spec.env)
    res, soft, hard = limit
    pid = os.fork()
    if pid:
        return pid
    try:  # pragma: no cover - the child execs or exits
        for sig in defaults:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        resource.setrlimit(res, (soft, hard))
        os.execve(path, argv, env)  # noqa: S606 - never a shell, argv as given
    except BaseException as e:  # pragma: no cover
        code = e.errno if isinstance(e, OSError) and e.errno else errno.EINVAL
        with contextlib.suppress(BaseException):
            os.write(err_w, f"error\tB10 execve\t{code}\t{e}\n".encode(errors="replace"))
    os._exit(127)


class NativeSandboxed:
    """One running native sandbox, seen from the kernel."""

    def __init__(self, pid: int, init_pid: int, enforced: dict[str, Any],
                 group: cgroups.Group | None, report_r: int, cpu_seconds: int) -> None:
        self.pid = pid
        self.init_pid = init_pid
        self.enforced = enforced
        self._group = group
        self._report_r = report_r
        self._cpu_seconds = cpu_seconds
        self._status: int | None = None
        self._cpu_ms: int | None = None
        self._killed = False
        self._pidfd = os.pidfd_open(pid)
        self._init_pidfd: int | None = None
        with contextlib.suppress(OSError):
            self._init_pidfd = os.pidfd_open(init_pid)
            # The init may already have ended and its pid been reused: trust the pidfd only
            # if the init still has the waiter as its parent.
            with open(f"/proc/{init_pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                os.close(self._init_pidfd)
                self._init_pidfd = None

    def _reaped(self, status: int) -> int:
        self._status = os.waitstatus_to_exitcode(status)
        self._read_report()
        for fd in (self._pidfd, self._init_pidfd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._init_pidfd = None
        return self._status

    def _read_report(self) -> None:
        data = b""
        with contextlib.suppress(OSError):
            os.set_blocking(self._report_r, False)
            while chunk := os.read(self._report_r, 4096):
                data += chunk
        for line in data.decode(errors="replace").splitlines():
            parts = line.split("\t")
            if parts[0] == "exit" and len(parts) == 3:
                self._cpu_ms = int(parts[2])
        with contextlib.suppress(OSError):
            os.close(self._report_r)

    def poll(self) -> int | None:
        if self._status is not None:
            return self._status
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return self._status
        if pid == 0:
            return None
        return self._reaped(status)

    def wait(self, timeout: float | None = None) -> int | None:
        if self._status is not None:
            return self._status
        if timeout is None:
            _, status = os.waitpid(self.pid, 0)
            return self._reaped(status)
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return self.poll()
            _readable(self._pidfd, left)
            st = self.poll()
            if st is not None:
                return st

    def breach(self) -> str | None:
        if self._group is not None:
            cause = self._group.breach()
            if cause:
                return cause
        st = self._status
        if st == -signal.SIGXCPU:
            return "cpu_seconds"
        if st == -signal.SIGXFSZ:
            return "file_size"
        if (st == -signal.SIGKILL and not self._killed and self._cpu_ms is not None
                and self._cpu_ms >= self._cpu_seconds * 1000):
            return "cpu_seconds"  # the hard RLIMIT_CPU after an ignored SIGXCPU
        return None

    def kill(self) -> None:
        """SIGKILL the pid-namespace init (the kernel then kills everything in the namespace),
        the waiter, and every process in the cgroups; wait until the init is gone."""
        self._killed = True
        if self._init_pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._init_pidfd, signal.SIGKILL)
        if self._status is None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        if self._group is not None:
            self._group.kill()
        if self._init_pidfd is not None:
            # Readable once the init has exited, which happens only after every process in
            # its namespace is gone.
            _readable(self._init_pidfd, 5.0)

    def cleanup(self) -> None:
        if self._status is None:
            if self.poll() is None:
                self.kill()
                self.wait(5.0)
        if self._group is not None:
            self._group.kill()
            self._group.remove()


class NativeBackend:
    """Namespaces + fresh mount tree + Landlock + seccomp + rlimits + cgroups."""

    name = "native"

    def agent_ids(self) -> tuple[int, int]:
        return _ids()

    @cache  # noqa: B019 - one backend object per process (registry), probing once is the point
    def probe(self) -> Availability:
        missing: list[str] = []
        facts: dict[str, Any] = {"kernel_release": platform.release()}
        abi = landlock.abi_version()
        facts["landlock_abi"] = abi
        if abi < 1:
            missing.append("Landlock is not available (kernel without it, or disabled at boot)")
        try:
            with open("/proc/self/status") as f:
                if "Seccomp:" not in f.read():
                    missing.append("the kernel has no seccomp support")
        except OSError:
            missing.append("/proc/self/status unreadable: cannot check seccomp")
        facts["cap_last_cap"] = _cap_last()
        if not mounts.mount_api_available():
            missing.append("the kernel lacks mount_setattr(2) (Linux 5.12 or newer is needed)")
        try:
            facts["seccomp_digest"] = seccomp_filter.digest()
            facts["seccomp_program"] = seccomp_filter.origin()
        except Exception as e:
            missing.append(f"pyseccomp/libseccomp unusable: {e}")
        if prctl is None:
            missing.append("python-prctl is not importable")
        try:
            uid, gid = _ids()
        except SandboxError as e:
            missing.append(e.message)
        else:
            why = _probe_userns()
            if why:
                missing.append(why)
            facts["agent_uid"], facts["agent_gid"] = uid, gid
        facts["cgroup_mode"], facts["cgroup"] = cgroups.mode()
        if os.geteuid() != 0:
            facts["cgroup"] = "not used: the kernel is not root (rlimits only)"
        if not missing:
            cgroups.prewarm()  # the sandbox's cgroup join then costs ~0.1 ms instead of ~12
        return Availability(available=not missing, missing=missing, facts=facts)

    def start(self, spec: SandboxSpec) -> NativeSandboxed:
        av = self.probe()
        if not av.available:
            raise SandboxError("native sandbox unavailable: " + "; ".join(av.missing))
        if not spec.argv or not spec.argv[0].startswith("/"):
            raise SandboxError("argv[0] must be an absolute path", hint="the kernel resolves it")
        uid, gid = _ids()
        as_root = os.geteuid() == 0
        lim = spec.limits
        memory_bytes = lim.memory_mb * MIB

        # The waiter (A) and the init (B) are counted too: `processes` is what the agent gets.
        group, why_no_cgroup = cgroups.create(memory_bytes, lim.processes + 2)
        try:
            plan = mounts.plan(
                workspace=spec.workspace, workspace_view=spec.workspace_view,
                workspace_writable=spec.workspace_writable, read_paths=spec.read_paths,
                hidden=spec.hidden, scratch_bytes=spec.scratch_bytes, uid=uid, gid=gid,
                clone=as_root)
        except OSError as e:
            if group is not None:
                group.remove()
            raise SandboxError(f"cannot prepare the sandbox view: {e}") from None

        has_pids_cgroup = group is not None and ("pids" in group.dirs or group.version == "v2")
        nproc = lim.processes + (3 if has_pids_cgroup else 2)
        rl = [
            (resource.RLIMIT_CPU, lim.cpu_seconds, lim.cpu_seconds + 1),
            (resource.RLIMIT_NOFILE, lim.open_files, lim.open_files),
            # One above the pids cgroup where there is one, so that the cgroup (which can
            # tell) is what stops a fork bomb; the rlimit is the backstop without cgroups.
            (resource.RLIMIT_NPROC, nproc, nproc),
            (resource.RLIMIT_FSIZE, lim.file_size_mb * MIB, lim.file_size_mb * MIB),
            (resource.RLIMIT_CORE, 0, 0),
        ]
        has_mem_cgroup = group is not None and ("memory" in group.dirs or group.version == "v2")
        if not has_mem_cgroup:
            rl.append((resource.RLIMIT_AS, memory_bytes, memory_bytes))
        writable = ["/tmp"]  # noqa: S108 (the sandbox's own scratch tmpfs)
        if spec.workspace_writable:
            writable.append(str(spec.workspace_view))
        ll = landlock.plan(landlock.abi_version(), writable_dirs=writable,
                           writable_devices=list(mounts.WRITABLE_DEVICES))
        loader = seccomp_filter.loader()

        err_r, err_w = os.pipe()
        report_r, report_w = os.pipe()
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        launch = _Launch(spec, uid, gid, as_root, os.getpid(), plan, ll, loader, group, rl,
                         devnull, err_w, report_w)
        cgroups.wait_prewarm()  # the kernel forks the sandbox single-threaded
        gc_was_enabled = gc.isenabled()
        gc.disable()  # no finalizer of the kernel's objects may run in the child
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child, reported through err_w
                try:
                    _stage_a(launch)
                except _StepError as e:
                    _report(err_w, e)
                except BaseException as e:
                    _report(err_w, _StepError("A", errno.EINVAL, repr(e)))
                os._exit(127)
        except OSError as e:  # fork itself failed: nothing started
            for fd in (err_r, report_r):
                os.close(fd)
            if group is not None:
                group.remove()
            raise SandboxError(f"cannot fork the sandbox: {e}") from None
        finally:
            if gc_was_enabled:
                gc.enable()
            for fd in (err_w, report_w, devnull):
                os.close(fd)
            plan.close()
            if group is not None:
                group.close_fds()

        notes, errors = _read_setup(err_r)
        init_pid = _read_init_pid(report_r)
        if errors or init_pid is None:
            _abort(pid, init_pid, group)
            os.close(report_r)
            detail = errors[0] if errors else "the sandbox child exited before starting"
            raise SandboxError(f"native sandbox setup failed: {detail}",
                               hint="nothing of the agent ran")

        enforced: dict[str, Any] = {
            "backend": "native",
            "kernel_release": platform.release(),
            "landlock_abi": ll.abi,
            "landlock": ll.summary(),
            "seccomp_digest": seccomp_filter.digest(),
            "seccomp_bpf_instructions": len(seccomp_filter.program()) // 8,
            "seccomp": seccomp_filter.summary(),
            "namespaces": list(NAMESPACES),
            "uid": uid,
            "gid": gid,
            "no_new_privs": True,
            "capabilities": "all dropped (bounding, ambient, effective, permitted, inheritable)",
            "limits": {
                "cpu_seconds": lim.cpu_seconds,
                "open_files": lim.open_files,
                "processes": lim.processes,
                "rlimit_nproc": nproc,
                "file_size_bytes": lim.file_size_mb * MIB,
                "core_bytes": 0,
                "address_space_bytes": memory_bytes if not has_mem_cgroup else "not set: "
                "memory cgroup in use",
                "memory_bytes": memory_bytes,
                "scratch_bytes": spec.scratch_bytes,
                "wall_seconds": "enforced by the kernel",
            },
            "cgroup": group.summary() if group is not None else {"mode": "none",
                                                                  "why": why_no_cgroup},
            "proc": notes.get("proc", "unknown"),
            "mounts": {"method": plan.method, "visible": plan.visible, "hidden": plan.hidden,
                       "scratch": "/tmp",  # noqa: S108 (inside the sandbox)
                       "workspace_view": str(spec.workspace_view),
                       "workspace_writable": spec.workspace_writable},
            "init_pid": init_pid,
        }
        return NativeSandboxed(pid, init_pid, enforced, group, report_r, lim.cpu_seconds)


def _read_setup(err_r: int) -> tuple[dict[str, str], list[str]]:
    """Read the setup pipe to EOF (EOF = the init exec'd or everything exited)."""
    data = b""
    end = time.monotonic() + SETUP_TIMEOUT_S
    try:
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return {}, ["sandbox setup timed out"]
            if not _readable(err_r, left):
                continue
            chunk = os.read(err_r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(err_r)
    notes: dict[str, str] = {}
    errors: list[str] = []
    for line in data.decode(errors="replace").splitlines():
        parts = line.split("\t")
        if parts[0] == "note" and len(parts) == 3:
            notes[parts[1]] = parts[2]
        elif parts[0] == "error" and len(parts) == 4:
            err = int(parts[2]) if parts[2].isdigit() else 0
            errors.append(f"step {parts[1]}: {os.strerror(err)}"
                          + (f" ({parts[3]})" if parts[3] else ""))
    return notes, errors


def _read_init_pid(report_r: int) -> int | None:
    """The waiter writes the init's host pid first; read just that line."""
    buf = b""
    end = time.monotonic() + SETUP_TIMEOUT_S
    while b"\n" not in buf and time.monotonic() < end:
        if not _readable(report_r, max(0.0, end - time.monotonic())):
            break
        chunk = os.read(report_r, 1)
        if not chunk:
            break
        buf += chunk
    parts = buf.decode(errors="replace").strip().split("\t")
    if len(parts) == 2 and parts[0] == "pid" and parts[1].isdigit():
        return int(parts[1])
    return None


def _abort(pid: int, init_pid: int | None, group: cgroups.Group | None) -> None:
    if init_pid is not None:
        with contextlib.suppress(OSError):
            os.kill(init_pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    if group is not None:
        group.kill()
        group.remove()
