"""Hostile agent programs against the sandbox guarantees of SPEC §4, on every backend.

Each test starts a real sandbox through the contract of ``sandbox/base.py`` only (so the same
test runs on ``native`` and ``firejail``), runs a program from ``agents/`` that really tries to
break one guarantee, and checks evidence on the host side: the file on the host, the listener
that received nothing, the processes left in /proc, the terminal that got no input.
"""

from __future__ import annotations

import errno
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import tty
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.policy import Limits
from sandbox.base import Backend
from tests.sandbox_helpers import (
    AGENTS,
    BACKENDS,
    DEFAULT_ENV,
    MIB,
    agent_argv,
    backend_or_skip,
    make_spec,
    pids_with_marker,
    run,
    wait_gone,
)

pytestmark = [pytest.mark.sandbox, pytest.mark.adversarial]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    return backend_or_skip(str(request.param))


def failed(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("errno", "socket: errno"))


# --- filesystem ---------------------------------------------------------------------------


def test_agent_cannot_change_the_workspace(backend: Backend, workspace: Path) -> None:
    target = workspace / "README.md"
    before = sorted(p.name for p in workspace.iterdir())
    res = run(backend, make_spec(workspace, agent_argv("write_workspace.py", str(target))))
    out = res.json()
    assert target.read_text() == "the workspace\n"
    assert sorted(p.name for p in workspace.iterdir()) == before
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    assert all(failed(v) for v in out.values()), out


def test_agent_cannot_write_outside_the_workspace(backend: Backend, workspace: Path,
                                                  tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o777)
    outside.chmod(0o777)  # even a world-writable host dir must stay untouched
    tag = uuid.uuid4().hex
    canaries = [outside / f"canary-{tag}", Path(f"/tmp/canary-{tag}"),
                Path(f"/var/tmp/canary-{tag}"), Path(f"/dev/shm/canary-{tag}")]
    res = run(backend, make_spec(workspace, agent_argv("write_outside.py",
                                                       *map(str, canaries))))
    res.json()
    for c in canaries:
        assert not c.exists(), f"{c} appeared on the host"


def test_secret_outside_the_read_set_stays_unreadable(backend: Backend, workspace: Path,
                                                      tmp_path: Path) -> None:
    secret_value = f"TOPSECRET-{uuid.uuid4().hex}"
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    secret_dir.chmod(0o755)
    readable = secret_dir / "token.txt"
    readable.write_text(secret_value)
    readable.chmod(0o644)  # readable by anyone on the host: only the view protects it
    paths = [readable]
    root_secret = Path(f"/root/.agent-kernel-test-{uuid.uuid4().hex}")
    if os.geteuid() == 0:
        root_secret.write_text(secret_value)
        paths.append(root_secret)
    try:
        res = run(backend, make_spec(workspace, agent_argv("read_secrets.py",
                                                           *map(str, paths))))
        out = res.json()
    finally:
        if os.geteuid() == 0:
            root_secret.unlink(missing_ok=True)
    assert secret_value not in res.text
    assert all(failed(out[str(p)]) for p in paths), out


def test_host_directories_are_not_visible(backend: Backend, workspace: Path) -> None:
    tag = uuid.uuid4().hex
    markers = [Path(f"/tmp/marker-{tag}"), Path(f"/dev/shm/marker-{tag}")]
    for m in markers:
        m.write_text("host")
    try:
        res = run(backend, make_spec(workspace, agent_argv("list_host_dirs.py")))
        out = res.json()
    finally:
        for m in markers:
            m.unlink(missing_ok=True)
    assert tag not in res.text
    for d in ("/run", "/var", "/home", "/root", "/dev/shm", "/sys"):
        # only the way down to the agent program's read path (the checkout may be anywhere)
        way = [AGENTS.relative_to(d).parts[0]] if AGENTS.is_relative_to(d) else []
        assert failed(out[d]) or out[d] in ([], way), (d, out[d])
    host_users = {line.split(":")[0] for line in Path("/etc/passwd").read_text().splitlines()}
    seen_users = {line.split(":")[0] for line in out["passwd"].splitlines()} \
        if not failed(out["passwd"]) else set()
    assert not (seen_users - {"root", "agent", "nobody"}) & host_users - {"root", "nobody"}
    assert out["shadow"] is False


def test_hidden_path_inside_the_workspace_is_invisible(backend: Backend,
                                                       workspace: Path) -> None:
    runs = workspace / "runs"
    runs.mkdir()
    runs.chmod(0o755)
    secret_value = f"RUNSECRET-{uuid.uuid4().hex}"
    (runs / "events.jsonl").write_text(secret_value)
    (runs / "events.jsonl").chmod(0o644)
    spec = make_spec(workspace, agent_argv("read_secrets.py", str(runs / "events.jsonl")),
                     hidden=(runs,))
    res = run(backend, spec)
    out = res.json()
    assert secret_value not in res.text
    assert failed(out[str(runs / "events.jsonl")])
    listing = out[str(runs) + " (listing)"]
    assert failed(listing) or "events.jsonl" not in listing


def test_scratch_is_writable_but_size_limited(backend: Backend, workspace: Path) -> None:
    scratch = 2 * MIB
    tag = uuid.uuid4().hex
    res = run(backend, make_spec(workspace, agent_argv("fill_scratch.py", str(scratch)),
                                 scratch_bytes=scratch, env={**DEFAULT_ENV, "TAG": tag}))
    out = res.json()
    assert out["small"] == "written"
    assert out["fill"] == f"errno {errno.ENOSPC}", out
    assert out["written"] <= scratch + 65536
    assert not Path("/tmp/fill").exists() or Path("/tmp/fill").stat().st_size == 0


# --- network ------------------------------------------------------------------------------


class Listener:
    """Host-side listeners that record anything that reaches them."""

    def __init__(self, tmp: Path) -> None:
        self.received: list[str] = []
        self.socks: list[socket.socket] = []
        self.tcp = self._add(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 0), "tcp4")
        self.tcp6: socket.socket | None = None
        try:
            self.tcp6 = self._add(socket.AF_INET6, socket.SOCK_STREAM, ("::1", 0), "tcp6")
        except OSError:
            pass
        self.udp = self._add(socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", 0), "udp4")
        self.abstract_name = f"agent-kernel-test-{uuid.uuid4().hex}"
        self._add(socket.AF_UNIX, socket.SOCK_STREAM, "\0" + self.abstract_name, "abstract")
        sock_dir = tmp / "host-sockets"
        sock_dir.mkdir()
        sock_dir.chmod(0o777)
        self.unix_path = str(sock_dir / "daemon.sock")
        self._add(socket.AF_UNIX, socket.SOCK_STREAM, self.unix_path, "path")
        os.chmod(self.unix_path, 0o777)
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _add(self, fam: int, kind: int, addr: tuple[str, int] | str,
             label: str) -> socket.socket:
        s = socket.socket(fam, kind)
        s.bind(addr)
        if kind == socket.SOCK_STREAM:
            s.listen(8)
        s.setblocking(False)
        self.socks.append(s)
        self._labels = getattr(self, "_labels", {})
        self._labels[s.fileno()] = label
        return s

    def port(self, s: socket.socket | None) -> int:
        return int(s.getsockname()[1]) if s is not None else 9

    def _serve(self) -> None:
        while not self._stop:
            r, _, _ = select.select(self.socks, [], [], 0.05)
            for s in r:
                label = self._labels[s.fileno()]
                try:
                    if s.type == socket.SOCK_STREAM:
                        conn, _ = s.accept()
                        conn.settimeout(1)
                        data = conn.recv(100)
                        conn.close()
                        self.received.append(f"{label}: connection {data!r}")
                    else:
                        data = s.recv(100)
                        self.received.append(f"{label}: datagram {data!r}")
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        for s in self.socks:
            s.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    lst = Listener(tmp_path)
    yield lst
    lst.close()


def test_no_network_reaches_host_listeners(backend: Backend, workspace: Path,
                                           listener: Listener) -> None:
    argv = agent_argv("net_attempts.py", str(listener.port(listener.tcp)),
                      str(listener.port(listener.tcp6)), str(listener.port(listener.udp)),
                      listener.abstract_name, listener.unix_path)
    res = run(backend, make_spec(workspace, argv))
    out = res.json()
    time.sleep(0.3)  # let the listener thread see anything in flight
    assert listener.received == []
    for key in ("tcp4", "tcp6", "abstract_unix", "path_unix"):
        assert failed(out[key]), (key, out[key])
    # a datagram "sent" into an empty network namespace goes nowhere; the listener decides
    assert not listener.received


def test_host_interfaces_are_invisible(backend: Backend, workspace: Path) -> None:
    with open("/proc/net/dev") as f:
        host_ifaces = {line.split(":")[0].strip() for line in f.read().splitlines()[2:]}
    res = run(backend, make_spec(workspace, agent_argv("interfaces.py")))
    out = res.json()
    for key, value in out.items():
        if isinstance(value, list):
            assert set(value) <= {"lo"}, (key, value, host_ifaces)
    for name in host_ifaces - {"lo"}:
        assert f'"{name}"' not in res.stdout.decode(), name


# --- identity and privilege ---------------------------------------------------------------


def test_agent_runs_as_an_unprivileged_uid(backend: Backend, workspace: Path) -> None:
    res = run(backend, make_spec(workspace, agent_argv("identity.py")))
    out = res.json()
    assert out["uid"] != 0 and out["euid"] != 0
    for name in ("setuid0", "setgid0", "setgroups"):
        assert failed(out[name]), (name, out[name])
    # host-side: a file the agent creates in a writable workspace is owned by agent_ids()
    workspace.chmod(0o777)
    argv = [sys_python(), "-c", "open('made-by-agent', 'w').write('x')"]
    res = run(backend, make_spec(workspace, argv, writable=True))
    made = workspace / "made-by-agent"
    assert made.exists(), res.text
    uid, _ = backend.agent_ids()
    assert made.stat().st_uid == uid
    if os.geteuid() == 0:
        assert uid != 0


def sys_python() -> str:
    return "/usr/bin/python3"


def test_no_capabilities_and_no_new_privs(backend: Backend, workspace: Path) -> None:
    res = run(backend, make_spec(workspace, agent_argv("identity.py")))
    out = res.json()
    assert int(out["CapEff"], 16) == 0
    assert int(out["CapPrm"], 16) == 0
    assert int(out["CapAmb"], 16) == 0
    assert out["NoNewPrivs"] == "1"


def test_inherited_descriptors_do_not_reach_the_agent(backend: Backend, workspace: Path,
                                                      tmp_path: Path) -> None:
    secret_value = f"FDSECRET-{uuid.uuid4().hex}"
    host_file = tmp_path / "kernel-private.txt"
    host_file.write_text(secret_value)
    fd = os.open(host_file, os.O_RDWR)  # deliberately inheritable, not close-on-exec
    os.set_inheritable(fd, True)
    try:
        spec = make_spec(workspace, agent_argv("inherited_fd.py"),
                         env={**DEFAULT_ENV, "LEAKED_FD": str(fd)})
        res = run(backend, spec)
        out = res.json()
    finally:
        os.close(fd)
    assert secret_value not in res.text
    assert host_file.read_text() == secret_value
    assert failed(out["read"]) and failed(out["write"]) and failed(out["reopen"])


def test_privileged_syscalls_fail(backend: Backend, workspace: Path) -> None:
    mounts_before = Path("/proc/self/mountinfo").read_text()
    res = run(backend, make_spec(workspace, agent_argv("privileged_syscalls.py")))
    out = res.json()
    for name, value in out.items():
        assert failed(value), f"{name}: {value}"
    assert Path("/proc/self/mountinfo").read_text() == mounts_before


def test_terminal_injection_is_refused(backend: Backend, workspace: Path) -> None:
    master, slave = pty.openpty()
    tty.setraw(slave)  # no echo, no line buffering: injected bytes would be readable at once
    err_r, err_w = os.pipe()
    try:
        spec = make_spec(workspace, agent_argv("tiocsti.py"), stdin=slave, stdout=slave,
                         stderr=err_w)
        sb = backend.start(spec)
        os.close(err_w)
        err_w = -1
        status = sb.wait(30)
        report = b""
        while True:
            r, _, _ = select.select([err_r], [], [], 0.5)
            if not r:
                break
            chunk = os.read(err_r, 65536)
            if not chunk:
                break
            report += chunk
        sb.kill()
        sb.cleanup()
        injected = b""
        for fd in (slave, master):
            os.set_blocking(fd, False)
            try:
                injected += os.read(fd, 1024)
            except (BlockingIOError, OSError):
                pass
    finally:
        for fd in (master, slave, err_r, err_w):
            if fd >= 0:
                os.close(fd)
    assert status is not None
    out = json.loads(report.decode().strip().splitlines()[-1])
    assert b"id" not in injected and injected == b"", injected
    for key, value in out.items():
        if key.startswith(("TIOCSTI", "TIOCLINUX")):
            assert failed(value), (key, value)


# --- resources ----------------------------------------------------------------------------


def assert_no_agent_processes(marker: str) -> None:
    assert wait_gone(marker, 5.0) == []


def test_fork_bomb_is_contained(backend: Backend, workspace: Path) -> None:
    limit = 16
    limits = Limits(wall_seconds=60, cpu_seconds=30, memory_mb=512, processes=limit,
                    open_files=256, file_size_mb=64)
    marker = f"forkbomb-{uuid.uuid4().hex}"
    res = run(backend, make_spec(workspace, agent_argv("fork_bomb.py", marker),
                                 limits=limits), timeout=60)
    assert not res.timed_out
    if res.breach != "processes":
        out = res.json()
        assert out["children"] <= limit, out
        assert out["error"] == f"errno {errno.EAGAIN}", out
    assert_no_agent_processes(marker)
    # the host can still fork
    assert subprocess.run(["/bin/true"], check=False).returncode == 0


def test_memory_bomb_is_stopped(backend: Backend, workspace: Path) -> None:
    limits = Limits(wall_seconds=60, cpu_seconds=60, memory_mb=128, processes=64,
                    open_files=256, file_size_mb=64)
    marker = f"membomb-{uuid.uuid4().hex}"
    res = run(backend, make_spec(workspace, agent_argv("memory_bomb.py", marker),
                                 limits=limits), timeout=120)
    assert not res.timed_out
    assert res.status != 0
    progress = [json.loads(line) for line in res.stdout.decode().splitlines()
                if line.startswith("{")]
    top = max((p["allocated_mb"] for p in progress), default=0)
    assert top <= 128, top
    if res.breach != "memory":
        # contained by RLIMIT_AS: the interpreter got MemoryError and said so
        assert progress and progress[-1].get("error") == "MemoryError", res.text
    assert_no_agent_processes(marker)


def test_cpu_time_limit_kills(backend: Backend, workspace: Path) -> None:
    limits = Limits(wall_seconds=60, cpu_seconds=1, memory_mb=512, processes=64,
                    open_files=256, file_size_mb=64)
    t0 = time.monotonic()
    res = run(backend, make_spec(workspace, agent_argv("cpu_burn.py"), limits=limits),
              timeout=30)
    assert not res.timed_out
    assert time.monotonic() - t0 < 15
    assert res.status in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU)
    assert res.breach == "cpu_seconds"


def test_file_size_limit(backend: Backend, workspace: Path) -> None:
    limits = Limits(wall_seconds=60, cpu_seconds=30, memory_mb=512, processes=64,
                    open_files=256, file_size_mb=1)
    argv = ["/usr/bin/dd", "if=/dev/zero", "of=/tmp/big", "bs=65536", "count=64"]
    res = run(backend, make_spec(workspace, argv, limits=limits, scratch_bytes=16 * MIB))
    assert res.status == -signal.SIGXFSZ, res.text
    assert res.breach == "file_size"


def test_open_files_limit(backend: Backend, workspace: Path) -> None:
    limits = Limits(wall_seconds=60, cpu_seconds=30, memory_mb=512, processes=64,
                    open_files=32, file_size_mb=64)
    res = run(backend, make_spec(workspace, agent_argv("open_files.py"), limits=limits))
    out = res.json()
    assert out["opened"] <= 32 and out["error"] == f"errno {errno.EMFILE}", out


def test_kill_ends_the_whole_tree(backend: Backend, workspace: Path) -> None:
    marker = f"survivor-{uuid.uuid4().hex}"
    out_r, out_w = os.pipe()
    spec = make_spec(workspace, agent_argv("survivor.py", marker), stdout=out_w)
    sb = backend.start(spec)
    os.close(out_w)
    try:
        r, _, _ = select.select([out_r], [], [], 30)
        assert r and os.read(out_r, 100).startswith(b"ready")
        assert pids_with_marker(marker), "the detached process never appeared"
        sb.kill()
        sb.kill()  # idempotent
        status = sb.wait(10)
        assert status is not None
        assert_no_agent_processes(marker)
        assert sb.poll() == status
    finally:
        sb.kill()
        sb.cleanup()
        os.close(out_r)


def test_kernel_death_ends_the_sandbox(backend: Backend, workspace: Path) -> None:
    marker = f"orphan-{uuid.uuid4().hex}"
    helper = ROOT / "tests" / "adversarial" / "kernel_parent.py"
    proc = subprocess.Popen(
        [sys.executable, str(helper), backend.name, str(workspace)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "SURVIVOR_MARKER": marker},
    )
    try:
        assert proc.stdout is not None
        r, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if r else b""
        assert line.startswith(b"started"), (line, proc.stderr.read() if proc.stderr else b"")
        deadline = time.monotonic() + 15
        while len(pids_with_marker(marker)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pids_with_marker(marker), "the sandboxed processes never appeared"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert_no_agent_processes(marker)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kernel_memory_and_environment_are_not_readable_through_proc(
        backend: Backend, workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sandbox's helper processes (launcher, init) are copies of the kernel's memory: an
    agent with the same uid must not read their /proc/<pid>/environ or mem."""
    secret_value = f"KERNELMEM-{uuid.uuid4().hex}"
    monkeypatch.setenv("KERNEL_SIDE_TOKEN", secret_value)  # in this process's environment
    in_memory = secret_value.encode() * 4  # and in its heap  # noqa: F841
    res = run(backend, make_spec(workspace, agent_argv("proc_snoop.py", secret_value[::-1])),
              timeout=120)
    out = res.json()
    assert out["found"] == [], out
    assert out["mem_opened"] == [], out


def test_only_the_spec_environment_reaches_the_agent(backend: Backend, workspace: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    secret_value = f"ENVSECRET-{uuid.uuid4().hex}"
    monkeypatch.setenv("HOST_API_TOKEN", secret_value)
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "ALLOWED_NAME": "allowed-value"}
    res = run(backend, make_spec(workspace, agent_argv("environment.py"), env=env))
    out = res.json()
    assert secret_value not in res.text
    assert out == env
