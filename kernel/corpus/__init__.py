"""The adversarial corpus: hostile agent programs, each checked by evidence on the host.

:data:`ATTACKS` is the catalog: one row per distinct attack (id, category, what it tries, the
host-side evidence that it failed, the denial expected inside the sandbox). Every attack is a
function of ``hostile_agent.py`` (shipped in this package, so an installed kernel can run it),
run by the system Python inside a real sandbox built through the contract of
``sandbox/base.py``. :func:`run_attack` sets up the host-side bait (canary paths, a secret file,
listeners, a victim process, a pty...), runs the attack, and decides whether the guarantee held
from what the host observes, never from the agent's say-so alone.

The test suite (tests/adversarial/test_corpus.py) runs every attack on every backend;
``kernel selftest`` runs them on the operator's host and reports which guarantees hold there.
tests/adversarial/test_corpus_under_kernel.py runs each as the agent of a real ``kernel exec``
run, with the same bait (:func:`bait`) and the same judgement (:func:`judge`), and checks that
the run folder shows it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernel.policy import Limits
from sandbox.base import Backend, SandboxSpec

AGENT = Path(__file__).resolve().parent / "hostile_agent.py"
PYTHON = "/usr/bin/python3"
MIB = 1024 * 1024
CATEGORIES = ("filesystem", "network", "processes", "kernel surface", "terminal", "resources",
              "leaks")
_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
LIMITS = Limits(wall_seconds=30, cpu_seconds=3, memory_mb=256, processes=32, open_files=128,
                 file_size_mb=64)
SCRATCH_BYTES = 4 * MIB


@dataclass(frozen=True)
class Attack:
    id: str
    category: str
    tries: str
    evidence: str
    denial: str
    checks: tuple[str, ...]
    """Host-side checks (see :func:`_check`), all of which must pass."""


def _a(id: str, category: str, tries: str, evidence: str, denial: str,
       *checks: str) -> Attack:
    return Attack(id, category, tries, evidence, denial, checks)


FS, NET, PROC, KER, TERM, RES, LEAK = CATEGORIES
ATTACKS: tuple[Attack, ...] = (
    _a("fs.traversal", FS, "create a host file through ../../ from the workspace",
       "the canary path does not exist on the host", "EROFS/EACCES/ENOENT", "canary"),
    _a("fs.absolute-write", FS, "create a file in a world-writable host directory",
       "the canary path does not exist on the host", "ENOENT/EACCES", "canary"),
    _a("fs.symlink-out", FS, "symlink from scratch to a host directory, write through it",
       "the canary path does not exist on the host", "ENOENT", "canary"),
    _a("fs.symlink-in-workspace", FS, "plant a symlink to /etc/passwd in the workspace",
       "the workspace is unchanged", "EROFS/EACCES", "workspace"),
    _a("fs.hardlink-workspace", FS, "hardlink a workspace file into scratch and write it",
       "the workspace file is unchanged", "EXDEV/EROFS", "workspace"),
    _a("fs.hardlink-secret", FS, "hardlink a host secret into scratch and read it",
       "the secret is not in the agent's output", "ENOENT", "secret"),
    _a("fs.proc-self-root", FS, "write a host path through /proc/self/root",
       "the canary path does not exist on the host", "ENOENT", "canary"),
    _a("fs.proc-pid-cwd", FS, "read a host secret through /proc/PID/cwd and /proc/PID/root",
       "the secret is not in the agent's output", "ENOENT/EACCES", "secret"),
    _a("fs.proc-root-of-init", FS, "read a host secret through /proc/1/root",
       "the secret is not in the agent's output", "ENOENT/EACCES", "secret"),
    _a("fs.open-by-handle", FS, "open_by_handle_at with a forged root handle (shocker)",
       "the call fails", "EPERM (seccomp) / no CAP_DAC_READ_SEARCH", "denied"),
    _a("fs.dev-shm", FS, "create a file in /dev/shm",
       "no such file in the host's /dev/shm", "ENOENT/EROFS", "canary_shm"),
    _a("fs.mknod", FS, "create /dev/mem and a disk device node in scratch and read them",
       "the calls fail", "EPERM", "denied"),
    _a("fs.disk-fill", FS, "fill the scratch directory",
       "the write stops at the scratch cap, nothing lands on the host", "ENOSPC/EFBIG",
       "disk_fill"),
    _a("fs.sparse", FS, "a 1 TiB sparse file and a 16 GiB fallocate in scratch",
       "the writes stop at the file-size or scratch cap", "EFBIG/ENOSPC", "sparse"),
    _a("fs.workspace-write", FS, "overwrite a workspace file directly",
       "the workspace file is unchanged", "EROFS/EACCES", "workspace"),
    _a("fs.workspace-metadata", FS, "chmod, utime, rename, unlink a workspace file",
       "the workspace is unchanged (content, mode, names)", "EROFS/EACCES/EPERM", "workspace"),
    _a("fs.read-secret", FS, "read a world-readable host file outside the read set",
       "the secret is not in the agent's output", "ENOENT", "secret"),
    _a("fs.hidden-runs", FS, "read and list a hidden directory inside the workspace",
       "the hidden file's secret is not in the agent's output", "ENOENT/EACCES",
       "hidden_secret"),
    _a("fs.host-listing", FS, "list host /tmp, /dev/shm, /run, /var/tmp, /home, /root",
       "the host marker file name is not in the agent's output", "ENOENT or empty",
       "host_marker"),
    _a("net.tcp4", NET, "connect to a host TCP listener on 127.0.0.1",
       "the host listener accepted nothing", "ENETUNREACH/ECONNREFUSED", "listener"),
    _a("net.tcp6", NET, "connect to a host TCP listener on ::1",
       "the host listener accepted nothing", "ENETUNREACH/EADDRNOTAVAIL", "listener"),
    _a("net.udp4", NET, "send a datagram to a host UDP socket on 127.0.0.1",
       "the host socket received nothing", "ENETUNREACH / lost", "listener"),
    _a("net.udp6", NET, "send a datagram to a host UDP socket on ::1",
       "the host socket received nothing", "ENETUNREACH / lost", "listener"),
    _a("net.raw", NET, "a raw IP socket sending a forged UDP packet to the host",
       "the host socket received nothing", "EPERM/EAFNOSUPPORT", "listener"),
    _a("net.packet", NET, "open an AF_PACKET socket", "the call fails",
       "EPERM/EAFNOSUPPORT", "denied"),
    _a("net.abstract-unix", NET, "connect to a host abstract Unix socket",
       "the host listener accepted nothing", "ECONNREFUSED (other netns)", "listener"),
    _a("net.pathname-unix", NET, "connect to a host Unix socket by path (mode 0777)",
       "the host listener accepted nothing", "ENOENT", "listener"),
    _a("net.bind-port", NET, "listen on 0.0.0.0:PORT and wait for a host connection",
       "the host cannot connect to that port while the agent listens", "isolated netns",
       "no_inbound"),
    _a("net.external", NET, "connect to 1.1.1.1:53", "the call fails", "ENETUNREACH",
       "denied"),
    _a("net.interfaces", NET, "list network interfaces", "only loopback (or none) is visible",
       "no host interface", "interfaces"),
    _a("proc.kill-host", PROC, "SIGKILL a host process by pid",
       "the host victim is still alive", "ESRCH", "victim"),
    _a("proc.kill-all", PROC, "kill(-1, SIGKILL)", "the host victim is still alive",
       "only the sandbox's own processes", "victim"),
    _a("proc.kill-parent", PROC, "SIGKILL its parent and the kernel's pid",
       "the kernel (this process) is alive", "ESRCH", "victim"),
    _a("proc.ptrace", PROC, "PTRACE_ATTACH and PTRACE_SEIZE a host process",
       "the host victim has no tracer", "ESRCH/EPERM", "victim"),
    _a("proc.vm-readv", PROC, "process_vm_readv from a host process", "the call fails",
       "ESRCH/EPERM", "denied"),
    _a("proc.mem", PROC, "open /proc/PID/mem and read /proc/PID/environ of a host process",
       "the victim's secret is not in the output", "ENOENT", "secret", "victim"),
    _a("proc.pidfd-getfd", PROC, "pidfd_open + pidfd_getfd on a host process",
       "the calls fail", "ESRCH/EPERM", "denied"),
    _a("proc.prlimit", PROC, "prlimit(RLIMIT_NOFILE=1) on a host process",
       "the victim's limits are unchanged", "ESRCH/EPERM", "victim"),
    _a("proc.setpriority", PROC, "renice a host process", "the victim's nice is unchanged",
       "ESRCH", "victim"),
    _a("proc.setsid", PROC, "survive the run: setsid + a child that sleeps",
       "no process of the agent is left on the host", "the whole tree is killed",
       "no_survivor"),
    _a("proc.double-fork", PROC, "survive the run: double fork, setsid, ignore SIGHUP",
       "no process of the agent is left on the host", "the whole tree is killed",
       "no_survivor"),
    _a("kernel.unshare-user", KER, "unshare(CLONE_NEWUSER)", "the call fails", "EPERM",
       "denied"),
    _a("kernel.unshare-mount", KER, "unshare(CLONE_NEWNS)", "the call fails", "EPERM",
       "denied"),
    _a("kernel.unshare-net", KER, "unshare(CLONE_NEWNET)", "the call fails", "EPERM",
       "denied"),
    _a("kernel.clone-newuser", KER, "clone(CLONE_NEWUSER)", "the call fails", "EPERM",
       "denied"),
    _a("kernel.clone3-newuser", KER, "clone3 with CLONE_NEWUSER in clone_args",
       "the call fails", "EPERM/ENOSYS", "denied"),
    _a("kernel.io-uring", KER, "io_uring_setup", "the call fails", "EPERM/ENOSYS", "denied"),
    _a("kernel.bpf", KER, "bpf(BPF_MAP_CREATE)", "the call fails", "EPERM", "denied"),
    _a("kernel.perf-event-open", KER, "perf_event_open on itself", "the call fails",
       "EPERM/EACCES", "denied"),
    _a("kernel.userfaultfd", KER, "userfaultfd (user-mode only)", "the call fails",
       "EPERM", "denied"),
    _a("kernel.keyctl", KER, "keyctl and add_key on the session keyring", "the calls fail",
       "EPERM", "denied"),
    _a("kernel.personality", KER, "personality(ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC)",
       "the calls fail", "EPERM", "denied"),
    _a("kernel.int80", KER, "a system call through the 32-bit entry (int 0x80)",
       "the call fails or the process is killed", "SIGSYS/ENOSYS", "denied"),
    _a("kernel.mount", KER, "mount tmpfs, remount the workspace read-write",
       "the calls fail and the workspace is unchanged", "EPERM", "denied", "workspace"),
    _a("kernel.module", KER, "init_module, finit_module, delete_module", "the calls fail",
       "EPERM", "denied"),
    _a("kernel.kexec", KER, "kexec_load", "the call fails", "EPERM", "denied"),
    _a("kernel.cgroupfs", KER, "create a cgroup, move itself to the root cgroup",
       "no such cgroup on the host", "ENOENT/EROFS", "cgroup"),
    _a("kernel.setns", KER, "setns into a namespace", "the call fails", "EPERM", "denied"),
    _a("kernel.chroot", KER, "chroot and pivot_root", "the calls fail", "EPERM", "denied"),
    _a("kernel.syslog", KER, "read the kernel log (syslog)", "the call fails", "EPERM",
       "denied"),
    _a("kernel.setuid-root", KER, "setuid(0), setgid(0)", "the calls fail", "EPERM",
       "denied"),
    _a("term.tiocsti", TERM, "push 'id\\n' into the terminal's input with TIOCSTI",
       "nothing arrives in the host terminal's input", "ENOTTY/EPERM/EIO", "terminal"),
    _a("term.tioclinux", TERM, "paste the console selection with TIOCLINUX",
       "nothing arrives in the host terminal's input", "ENOTTY/EPERM/EINVAL", "terminal"),
    _a("res.fork-bomb", RES, "fork until something stops it",
       "the count stops at the process limit and none survive", "EAGAIN",
       "fork_bomb", "no_survivor"),
    _a("res.memory-bomb", RES, "allocate 16 MiB blocks until something stops it",
       "allocation stops near the memory limit", "MemoryError/OOM kill", "memory_bomb"),
    _a("res.fd-exhaustion", RES, "open descriptors until something stops it",
       "the count stops at the descriptor limit", "EMFILE", "fd_bomb"),
    _a("res.cpu-burn", RES, "spin forever", "the sandbox is ended by the CPU limit",
       "SIGXCPU/SIGKILL", "cpu_burn"),
    _a("leak.inherited-fds", LEAK, "read every descriptor it inherited",
       "a host file left open (inheritable) in the kernel is not readable",
       "only 0, 1, 2 (and the channel)", "secret"),
    _a("leak.environment", LEAK, "dump its environment",
       "a secret in the kernel's environment is not in the output", "scrubbed env",
       "secret"),
    _a("leak.host-processes", LEAK, "read every /proc/PID/cmdline it can see",
       "the host victim's command line is not in the output", "own pid namespace", "secret"),
    _a("leak.host-identity", LEAK, "read /etc/shadow, /etc/passwd, /etc/hostname, mountinfo",
       "no host password hash and no host account is visible", "curated /etc",
       "identity"),
    _a("leak.session-sockets", LEAK, "look for SSH agent, D-Bus, X11, Docker sockets",
       "none is reachable", "not in the view", "sockets"),
)
BY_ID = {a.id: a for a in ATTACKS}
MAY_DIE = frozenset({"proc.kill-all", "proc.kill-parent", "res.memory-bomb", "res.cpu-burn",
                      "res.fork-bomb"})
"""Attacks whose agent may be ended before it reports (it killed itself, or a limit did)."""


@dataclass
class Outcome:
    attack: Attack
    backend: str
    held: bool
    evidence: list[str] = field(default_factory=list)
    """What the host observed, one line per check (failures first)."""
    result: Any = None
    """What the agent reported (its ``result`` field), for the report."""
    status: int | None = None
    seconds: float = 0.0


# --- the bait --------------------------------------------------------------------------------


class _Listeners:
    def __init__(self, tmp: Path) -> None:
        self.got: dict[str, list[bytes]] = {}
        self.socks: dict[socket.socket, str] = {}
        self.ports: dict[str, int] = {}
        self._add(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 0), "tcp4")
        self._add(socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", 0), "udp4")
        with contextlib.suppress(OSError):
            self._add(socket.AF_INET6, socket.SOCK_STREAM, ("::1", 0), "tcp6")
        with contextlib.suppress(OSError):
            self._add(socket.AF_INET6, socket.SOCK_DGRAM, ("::1", 0), "udp6")
        self.abstract = f"agent-kernel-selftest-{uuid.uuid4().hex}"
        self._add(socket.AF_UNIX, socket.SOCK_STREAM, "\0" + self.abstract, "abstract")
        d = tmp / "sockets"
        d.mkdir()
        d.chmod(0o777)
        self.unix_path = str(d / "daemon.sock")
        self._add(socket.AF_UNIX, socket.SOCK_STREAM, self.unix_path, "path")
        os.chmod(self.unix_path, 0o777)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()

    def _add(self, fam: int, kind: int, addr: Any, label: str) -> None:
        s = socket.socket(fam, kind)
        s.bind(addr)
        if kind == socket.SOCK_STREAM:
            s.listen(8)
        s.setblocking(False)
        self.socks[s] = label
        if fam in (socket.AF_INET, socket.AF_INET6):
            self.ports[label] = s.getsockname()[1]

    def _serve(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select(list(self.socks), [], [], 0.05)
            for s in r:
                label = self.socks[s]
                try:
                    if s.type == socket.SOCK_STREAM:
                        c, _ = s.accept()
                        c.settimeout(1)
                        try:
                            data = c.recv(256)
                        except OSError:
                            data = b""
                        c.close()
                        self.got.setdefault(label, []).append(b"connection: " + data)
                    else:
                        self.got.setdefault(label, []).append(s.recv(256))
                except OSError:
                    pass

    def close(self) -> None:
        time.sleep(0.2)
        self._stop.set()
        self._t.join(5)
        for s in self.socks:
            s.close()


@dataclass
class Bait:
    tmp: Path
    workspace: Path
    ws_file: Path
    hidden: Path
    canary: Path
    secret: str
    secret_path: Path
    marker: str
    listeners: _Listeners
    victim: subprocess.Popen[bytes]
    victim_limits: str
    victim_nice: int
    free_port: int
    inherited_fd: int
    ws_before: dict[str, tuple[bytes, int]]

    def kernel_environ(self) -> dict[str, str]:
        """What :func:`bait` plants in the environment of the process that runs the agent."""
        return {"AGENT_KERNEL_SELFTEST_SECRET": self.secret,
                "SSH_AUTH_SOCK": self.listeners.unix_path}

    def params(self) -> dict[str, Any]:
        return {
            "workspace": str(self.workspace), "ws_file": str(self.ws_file),
            "hidden_file": str(self.hidden / "events.jsonl"), "canary": str(self.canary),
            "secret_path": str(self.secret_path), "marker": self.marker,
            "tag": self.marker, "victim": self.victim.pid, "kernel_pid": os.getpid(),
            "free_port": self.free_port, "abstract": self.listeners.abstract,
            "unix_path": self.listeners.unix_path, **self.listeners.ports,
        }


def _snapshot(ws: Path, ignore: tuple[str, ...] = ()) -> dict[str, tuple[bytes, int]]:
    out = {}
    for p in sorted(ws.rglob("*")):
        rel = str(p.relative_to(ws))
        if any(rel == i or rel.startswith(i + "/") for i in ignore):
            continue
        st = p.lstat()
        out[rel] = (p.read_bytes() if p.is_file() and not p.is_symlink()
                                       else b"", st.st_mode)
    return out


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


@contextlib.contextmanager
def bait(*, set_environ: bool = True) -> Iterator[Bait]:
    """Fresh bait on the host for one attack, removed afterwards.

    With ``set_environ`` (the default), the secret (and a session socket) is put in this
    process's environment for the sandbox to inherit and scrub; a caller that starts the kernel
    itself passes ``set_environ=False`` and gives the kernel :meth:`Bait.kernel_environ`.
    """
    tmp = Path(tempfile.mkdtemp(prefix="kernel-selftest-bait-"))
    tmp.chmod(0o755)
    secret = f"SELFTEST-SECRET-{uuid.uuid4().hex}"
    marker = f"selftest-marker-{uuid.uuid4().hex}"
    ws = tmp / "ws"
    ws.mkdir(mode=0o755)
    ws.chmod(0o755)
    ws_file = ws / "README.md"
    ws_file.write_text("the workspace\n")
    ws_file.chmod(0o644)
    hidden = ws / "runs"
    hidden.mkdir()
    hidden.chmod(0o755)
    (hidden / "events.jsonl").write_text(secret)
    (hidden / "events.jsonl").chmod(0o644)
    outside = tmp / "outside"
    outside.mkdir()
    outside.chmod(0o777)
    secrets = tmp / "secrets"
    secrets.mkdir()
    secrets.chmod(0o755)
    secret_path = secrets / "token.txt"
    secret_path.write_text(secret)
    secret_path.chmod(0o644)
    host_marker = Path(tempfile.gettempdir()) / marker
    host_marker.write_text("host")
    try:
        listeners = _Listeners(tmp)
    except BaseException:
        host_marker.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        victim = subprocess.Popen(  # a host process holding the secret in its env and argv
            [PYTHON, "-c", "import time; time.sleep(600)", secret],
            env={"PATH": "/usr/bin:/bin", "VICTIM_SECRET": secret}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except BaseException:
        listeners.close()
        host_marker.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fd = os.open(secret_path, os.O_RDONLY)
    os.set_inheritable(fd, True)
    planted = {"AGENT_KERNEL_SELFTEST_SECRET": secret, "SSH_AUTH_SOCK": listeners.unix_path}
    old_env = {k: os.environ.get(k) for k in planted} if set_environ else {}
    if set_environ:
        os.environ.update(planted)
    try:
        time.sleep(0.05)
        yield Bait(tmp, ws, ws_file, hidden, outside / f"canary-{marker}", secret, secret_path,
                    marker, listeners, victim, _read(f"/proc/{victim.pid}/limits"),
                    os.getpriority(os.PRIO_PROCESS, victim.pid), _free_port(), fd,
                    _snapshot(ws))
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.close(fd)
        victim.kill()
        victim.wait()
        listeners.close()
        host_marker.unlink(missing_ok=True)
        Path(f"/dev/shm/canary-{marker}").unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        return f"errno {e.errno}"


# --- running one attack ----------------------------------------------------------------------


def agent_argv(b: Bait, attack: Attack) -> list[str]:
    """The hostile agent's command line for ``attack`` against the bait ``b``."""
    return [PYTHON, str(AGENT), attack.id, json.dumps(b.params())]


def _spec(b: Bait, attack: Attack, stdin: int | None, stdout: int, stderr: int) -> SandboxSpec:
    return SandboxSpec(
        argv=tuple(agent_argv(b, attack)),
        workspace=b.workspace, workspace_view=b.workspace, workspace_writable=False,
        cwd=b.workspace, env=dict(_ENV), limits=LIMITS, scratch_bytes=SCRATCH_BYTES,
        stdin=stdin, stdout=stdout, stderr=stderr, hidden=(b.hidden,),
        read_paths=(AGENT.parent,), wall_seconds=None)


def pids_with_marker(marker: str) -> list[int]:
    """Host pids (other than this process) whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmd:
                found.append(int(entry))
    return found


def _failed(v: Any) -> bool:
    """Every attempt in ``v`` failed (an errno, a kill, an exception)."""
    if isinstance(v, dict):
        return all(_failed(x) for x in v.values())
    return isinstance(v, str) and v.startswith(("errno", "killed by signal", "exception"))


def run_attack(backend: Backend, attack: Attack, *, timeout: float = 60.0) -> Outcome:
    """Run one attack in a fresh sandbox with fresh bait; decide from the host's evidence."""
    t0 = time.monotonic()
    with bait() as b:
        master = slave = -1
        if "terminal" in attack.checks:
            master, slave = pty.openpty()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            sb = backend.start(_spec(b, attack, slave if slave >= 0 else None, out_w, err_w))
        finally:
            os.close(out_w)
            os.close(err_w)
        inbound: list[str] = []
        try:
            out, err, _ = collect_output(
                sb, out_r, err_r, timeout,
                _inbound_probe(b, inbound) if "no_inbound" in attack.checks else None)
            status = sb.poll()
            breach = sb.breach()
        finally:
            sb.kill()
            sb.wait(10)
            sb.cleanup()
            os.close(out_r)
            os.close(err_r)
        injected = drain_terminal(master, slave)
        return judge(attack, b, backend.name, out, err, status, breach, injected, inbound,
                     started=t0)


def drain_terminal(master: int, slave: int) -> bytes:
    """What arrived in a pty's input (``-1`` for no pty), and close it."""
    injected = b""
    for fd in (slave, master):
        if fd >= 0:
            os.set_blocking(fd, False)
            with contextlib.suppress(OSError):
                injected += os.read(fd, 1024)
            os.close(fd)
    return injected


def report_of(out: bytes) -> tuple[str | None, Any]:
    """The agent's report line (its last JSON line on stdout) and the ``result`` it holds."""
    for line in reversed(out.decode(errors="replace").splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                return line, json.loads(line).get("result")
    return None, None


def judge(attack: Attack, b: Bait, backend: str, out: bytes, err: bytes, status: int | None,
          breach: str | None, injected: bytes = b"", inbound: list[str] | None = None, *,
          started: float, ignore: tuple[str, ...] = ()) -> Outcome:
    """Decide from the host's evidence whether ``attack`` was stopped, once its agent ended.

    ``out``/``err`` are everything the agent printed, ``status`` how it ended, ``injected``
    what reached the bait terminal's input, ``inbound`` the host's successful connections to
    the agent's port; ``ignore`` names workspace paths the caller's own kernel wrote (its runs
    dir), left out of the workspace comparison. Kills any process of the agent left behind.
    """
    text = (out + err).decode(errors="replace")
    _, result = report_of(out)
    evidence: list[str] = []
    ok = True
    for check in attack.checks:
        good, line = _check(check, b, attack, result, text, status, breach, injected,
                            inbound or [], ignore)
        ok = ok and good
        evidence.append(("held: " if good else "BROKEN: ") + line)
    if result is None and attack.id not in MAY_DIE:
        ok = False
        evidence.append(f"BROKEN: the agent gave no report (status {status}): "
                        f"{text[-300:]!r}")
    for pid in pids_with_marker(b.marker):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return Outcome(attack, backend, ok, evidence, result, status, time.monotonic() - started)


def collect_output(sb: Any, out_r: int, err_r: int, timeout: float,
                   tick: Callable[[], None] | None = None) -> tuple[bytes, bytes, bool]:
    """Read a sandbox's stdout and stderr pipes until EOF and its end, or kill it at the
    deadline; returns ``(out, err, timed_out)``. ``tick`` runs once per turn (the corpus
    probes a listener there). Shared with the tests' sandbox helper."""
    bufs = {out_r: bytearray(), err_r: bytearray()}
    fds = [out_r, err_r]
    deadline = time.monotonic() + timeout
    ended: float | None = None
    timed_out = False
    while True:
        now = time.monotonic()
        if now > deadline:
            timed_out = True
            sb.kill()
            break
        if tick is not None:
            tick()
        if sb.poll() is not None:
            ended = ended or now
            # A straggler might keep a pipe open; the tree is gone once the status is in,
            # so stop shortly after.
            if not fds or now - ended > 2:
                break
        if not fds:
            sb.wait(min(0.05, max(0.0, deadline - now)))
            continue
        r, _, _ = select.select(fds, [], [], 0.05)
        for fd in r:
            chunk = os.read(fd, 65536)
            if chunk:
                bufs[fd] += chunk
            else:
                fds.remove(fd)
    sb.wait(10)
    for fd in fds:  # what is left, without blocking on a writer that survived
        os.set_blocking(fd, False)
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(fd, 65536):
                bufs[fd] += chunk
    return bytes(bufs[out_r]), bytes(bufs[err_r]), timed_out


def _inbound_probe(bait: Bait, inbound: list[str]) -> Callable[[], None]:
    """Each turn: try to connect from the host to the port the agent may have bound."""
    def probe() -> None:
        with contextlib.suppress(OSError), \
                socket.create_connection(("127.0.0.1", bait.free_port), 0.1) as c:
            c.sendall(b"host")
            inbound.append("the host connected to the agent's port")
    return probe


def _check(check: str, b: Bait, attack: Attack, result: Any, text: str, status: int | None,
           breach: str | None, injected: bytes, inbound: list[str],
           ignore: tuple[str, ...] = ()) -> tuple[bool, str]:
    checks: dict[str, Callable[[], tuple[bool, str]]] = {
        "canary": lambda: (not b.canary.exists(), f"{b.canary} absent on the host"),
        "canary_shm": lambda: (not Path(f"/dev/shm/canary-{b.marker}").exists(),
                               f"/dev/shm/canary-{b.marker} absent on the host"),
        "workspace": lambda: (_snapshot(b.workspace, ignore) == b.ws_before,
                              "workspace content, modes and names unchanged"),
        "secret": lambda: (b.secret not in text, "the host secret is not in the output"),
        "hidden_secret": lambda: (b.secret not in text and "events.jsonl" not in text,
                                  "the hidden file is neither read nor listed"),
        "host_marker": lambda: (b.marker not in text, "the host's /tmp marker is not listed"),
        "listener": lambda: (_label(attack) not in b.listeners.got,
                             f"host {_label(attack)} listener received "
                             f"{b.listeners.got.get(_label(attack), [])!r}"),
        "no_inbound": lambda: (not inbound, "the host could not connect to the agent's port"
                               if not inbound else inbound[0]),
        "denied": lambda: (_failed(result), f"every attempt failed: {result!r}"),
        "interfaces": lambda: ((isinstance(result, list) and set(result) <= {"lo"})
                               or _failed(result), f"interfaces seen: {result!r}"),
        "victim": lambda: _victim(b),
        "no_survivor": lambda: _no_survivor(b.marker),
        "disk_fill": lambda: (isinstance(result, dict) and result.get("fill") != "no limit"
                              and int(result.get("written", 0)) <= SCRATCH_BYTES + 65536,
                              f"scratch fill stopped: {result!r}"),
        "sparse": lambda: (isinstance(result, dict) and result.get("fallocate") != "succeeded",
                           f"sparse/fallocate: {result!r}"),
        "cgroup": lambda: (not Path(f"/sys/fs/cgroup/{b.marker}").exists(),
                           f"/sys/fs/cgroup/{b.marker} absent on the host"),
        "terminal": lambda: (injected == b"", f"terminal input received {injected!r}"),
        "fork_bomb": lambda: (status is not None and (
            not isinstance(result, dict) or int(result.get("children", 0)) <=
            LIMITS.processes), f"fork bomb stopped: {result!r}, status {status}"),
        "memory_bomb": lambda: (status is not None and (
            not isinstance(result, dict) or result.get("stopped_by") != "nothing"),
            f"memory bomb stopped: {result!r}, status {status}, breach {breach}"),
        "fd_bomb": lambda: (isinstance(result, dict) and
                            int(result.get("fds", 1 << 30)) <= LIMITS.open_files,
                            f"descriptors stopped: {result!r}"),
        "cpu_burn": lambda: (status is not None and status != 0,
                             f"ended with status {status}, breach {breach}"),
        "identity": lambda: _identity(text),
        "sockets": lambda: (_failed({k: v for k, v in (result or {}).items()
                                     if v not in ("absent", [])})
                            and b.listeners.unix_path not in text,
                            f"session sockets: {result!r}"),
    }
    return checks[check]()


def _label(attack: Attack) -> str:
    return {"net.abstract-unix": "abstract", "net.pathname-unix": "path",
            "net.raw": "udp4"}.get(attack.id, attack.id.split(".")[1])


def _victim(b: Bait) -> tuple[bool, str]:
    if b.victim.poll() is not None:
        return False, f"the host victim died (status {b.victim.returncode})"
    status = _read(f"/proc/{b.victim.pid}/status")
    tracer = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("TracerPid")),
                  "?")
    limits = _read(f"/proc/{b.victim.pid}/limits")
    nice = os.getpriority(os.PRIO_PROCESS, b.victim.pid)
    ok = tracer == "0" and limits == b.victim_limits and nice == b.victim_nice
    return ok, (f"host victim alive, tracer {tracer}, limits "
                f"{'unchanged' if limits == b.victim_limits else 'CHANGED'}, nice {nice}")


def _no_survivor(marker: str) -> tuple[bool, str]:
    end = time.monotonic() + 5
    while (left := pids_with_marker(marker)) and time.monotonic() < end:
        time.sleep(0.05)
    return not left, f"agent processes left on the host: {left}"


def _identity(text: str) -> tuple[bool, str]:
    try:
        shadow = Path("/etc/shadow").read_text()
    except OSError:
        shadow = ""
    hashes = [f.split(":")[1] for f in shadow.splitlines() if f.count(":") > 2
              and len(f.split(":")[1]) > 3]
    users = {ln.split(":")[0] for ln in Path("/etc/passwd").read_text().splitlines() if ln}
    leaked_users = {u for u in users - {"root", "nobody", "agent"}
                    if f"\\n{u}:" in text or f'"{u}:' in text}
    leaked = [h for h in hashes if h in text]
    return (not leaked and not leaked_users,
            f"host password hashes seen: {len(leaked)}, host accounts seen: "
            f"{sorted(leaked_users)}")


def counts() -> dict[str, int]:
    """How many attacks of each category the corpus holds."""
    return {c: sum(a.category == c for a in ATTACKS) for c in CATEGORIES}
