"""The native backend's own behaviour: what it records, how it fails, what it costs.

The guarantees themselves are tested on every backend in
``tests/adversarial/test_native_guarantees.py``; these tests cover what only the native backend
has (the recorded ``enforced`` facts, the seccomp program, its checklist failing closed, its
cgroups), always with real sandboxes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernel.errors import SandboxError
from kernel.policy import Limits
from sandbox import cgroups, seccomp_filter
from sandbox.native import NativeBackend
from tests.sandbox_helpers import (
    PYTHON,
    agent_argv,
    backend_or_skip,
    make_spec,
    run,
)

pytestmark = [pytest.mark.sandbox]


@pytest.fixture
def native() -> NativeBackend:
    b = backend_or_skip("native")
    assert isinstance(b, NativeBackend)
    return b


def py(code: str) -> list[str]:
    return [PYTHON, "-c", code]


def only_ints_strings(value: Any, where: str = "enforced") -> None:
    assert not isinstance(value, float), f"{where} is a float"
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str), where
            only_ints_strings(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            only_ints_strings(v, f"{where}[{i}]")
    else:
        assert isinstance(value, int | str | bool), f"{where}: {type(value).__name__}"


def test_probe_reports_the_host(native: NativeBackend) -> None:
    av = native.probe()
    assert av.available and av.missing == []
    assert isinstance(av.facts["landlock_abi"], int) and av.facts["landlock_abi"] >= 1
    assert av.facts["kernel_release"] == os.uname().release
    assert av.facts["cgroup_mode"] in ("v1", "v2", "none")
    assert native.probe() is av  # cached


def test_agent_ids_are_never_root(native: NativeBackend) -> None:
    uid, gid = native.agent_ids()
    if os.geteuid() == 0:
        assert uid != 0 and gid != 0
    else:
        assert (uid, gid) == (os.geteuid(), os.getegid())


def test_enforced_is_recordable_and_complete(native: NativeBackend, workspace: Path) -> None:
    res = run(native, make_spec(workspace, py("pass")))
    assert res.status == 0, res.text
    e = res.enforced
    only_ints_strings(e)
    json.dumps(e)
    assert e["backend"] == "native"
    assert e["landlock_abi"] == native.probe().facts["landlock_abi"]
    assert set(e["namespaces"]) >= {"user", "mount", "pid", "net", "ipc", "uts"}
    assert (e["uid"], e["gid"]) == native.agent_ids()
    digest = "sha256:" + hashlib.sha256(seccomp_filter.program()).hexdigest()
    assert e["seccomp_digest"] == digest
    assert e["limits"]["core_bytes"] == 0
    assert "cgroup" in e and "proc" in e
    if e["landlock_abi"] >= 4:
        assert e["landlock"]["tcp"] == "bind and connect denied"
    if e["landlock_abi"] >= 6:
        assert set(e["landlock"]["scopes"]) == {"abstract_unix_socket", "signal"}
    for rights in e["landlock"]["rules"].values():
        assert not {"make_char", "make_block", "make_sock", "make_fifo", "ioctl_dev"} & set(rights)


def test_seccomp_program_is_compiled_once(native: NativeBackend) -> None:
    assert seccomp_filter.program() is seccomp_filter.program()
    assert len(seccomp_filter.program()) % 8 == 0


def test_the_agent_sees_the_filter_and_its_own_pid_namespace(native: NativeBackend,
                                                             workspace: Path) -> None:
    code = ("import os, json; s = open('/proc/self/status').read();"
            "f = [l for l in s.splitlines() if l.startswith(('Seccomp', 'NoNewPrivs'))];"
            "print(json.dumps({'status': f, 'pids': sorted(int(p) for p in os.listdir('/proc')"
            " if p.isdigit()), 'me': os.getpid(), 'host': open('/etc/hostname').read()}))")
    res = run(native, make_spec(workspace, py(code)))
    out = res.json()
    assert "Seccomp:\t2" in out["status"]
    if res.enforced["proc"].startswith("mounted"):
        # Only the agent itself: nothing of the host, and the init (a non-dumpable copy of
        # the kernel) is hidden by hidepid.
        assert out["pids"] == [out["me"]]


def test_setup_failure_is_reported_and_nothing_runs(native: NativeBackend,
                                                    workspace: Path) -> None:
    with pytest.raises(SandboxError, match="execve"):
        native.start(make_spec(workspace, ["/nonexistent/program"]))
    with pytest.raises(SandboxError, match="cwd"):
        native.start(make_spec(workspace, py("pass"), cwd=workspace / "missing"))
    with pytest.raises(SandboxError, match="view"):
        native.start(make_spec(workspace / "missing", py("pass")))
    with pytest.raises(SandboxError, match="absolute"):
        native.start(make_spec(workspace, ["python3", "-c", "pass"]))


def test_failed_setup_leaves_no_child_and_no_cgroup(native: NativeBackend, workspace: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[cgroups.Group] = []
    real_create = cgroups.create

    def recording_create(memory_bytes: int, pids_max: int) -> tuple[cgroups.Group | None, str]:
        group, why = real_create(memory_bytes, pids_max)  # the real thing, observed
        if group is not None:
            made.append(group)
        return group, why

    monkeypatch.setattr(cgroups, "create", recording_create)
    with pytest.raises(SandboxError):
        native.start(make_spec(workspace, ["/nonexistent/program"]))
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)
    for group in made:
        for d in group.dirs.values():
            assert not d.exists(), d


def test_no_zombie_and_cgroups_removed(native: NativeBackend, workspace: Path) -> None:
    sb = native.start(make_spec(workspace, py("pass")))
    assert sb.wait(30) == 0
    with pytest.raises(ChildProcessError):
        os.waitpid(sb.pid, os.WNOHANG)
    assert not Path(f"/proc/{sb.pid}").exists()
    sb.cleanup()
    for path in sb.enforced["cgroup"].get("paths", {}).values():
        assert not Path(path).exists(), path


def test_exit_status_and_signals_are_mirrored(native: NativeBackend, workspace: Path) -> None:
    assert run(native, make_spec(workspace, py("raise SystemExit(7)"))).status == 7
    res = run(native, make_spec(workspace, py("import os; os.kill(os.getpid(), 15)")))
    assert res.status == -signal.SIGTERM


def test_read_paths_and_writable_workspace(native: NativeBackend, workspace: Path,
                                           tmp_path: Path) -> None:
    tools = tmp_path / "tools"
    tools.mkdir(mode=0o755)
    (tools / "tool.txt").write_text("tool")
    (tools / "tool.txt").chmod(0o644)
    workspace.chmod(0o777)
    tool = str(tools / "tool.txt")
    code = (f"import json; r = {{'tool': open({tool!r}).read()}}\n"
            f"try:\n open({tool!r}, 'w')\nexcept OSError as e: r['tool_write'] = e.errno\n"
            "open('out.txt', 'w').write('from the agent')\nprint(json.dumps(r))")
    res = run(native, make_spec(workspace, py(code), writable=True, read_paths=(tools,)))
    out = res.json()
    assert out["tool"] == "tool" and out["tool_write"] in (13, 30)
    assert (workspace / "out.txt").read_text() == "from the agent"
    assert (tools / "tool.txt").read_text() == "tool"


def test_workspace_view_may_differ_from_the_host_path(native: NativeBackend, workspace: Path,
                                                      tmp_path: Path) -> None:
    view = Path("/tmp/agent-kernel-view/ws")
    res = run(native, make_spec(workspace, py("import os; print(os.listdir('.'))"), view=view))
    assert "README.md" in res.stdout.decode(), res.text
    assert not view.exists()


def test_hidden_file_inside_the_workspace(native: NativeBackend, workspace: Path) -> None:
    key = workspace / "signing.key"
    key.write_text("PRIVATE-KEY-MATERIAL")
    key.chmod(0o644)
    res = run(native, make_spec(workspace, py("print(repr(open('signing.key').read()))"),
                                hidden=(key,)))
    assert "PRIVATE-KEY-MATERIAL" not in res.text
    assert res.enforced["mounts"]["hidden"] == [str(key)]


def test_landlock_refuses_fifos_and_sockets_even_in_writable_places(
        native: NativeBackend, workspace: Path) -> None:
    workspace.chmod(0o777)
    code = ("import os, socket, json; r = {}\n"
            "for p in ('fifo-in-ws', '/tmp/fifo'):\n"
            " try: os.mkfifo(p); r[p] = 'made'\n"
            " except OSError as e: r[p] = e.errno\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try: s.bind('/tmp/sock'); r['sock'] = 'bound'\n"
            "except OSError as e: r['sock'] = e.errno\n"
            "print(json.dumps(r))")
    res = run(native, make_spec(workspace, py(code), writable=True))
    out = res.json()
    assert out == {"fifo-in-ws": 13, "/tmp/fifo": 13, "sock": 13}, out
    assert not (workspace / "fifo-in-ws").exists()


def test_foreign_syscall_abi_kills_the_process(native: NativeBackend, workspace: Path) -> None:
    # i386 getpid through int 0x80 from a 64-bit process: the arch check must kill it.
    code = ("import ctypes, mmap\n"
            "m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
            "m.write(bytes([0xb8, 20, 0, 0, 0, 0xcd, 0x80, 0xc3]))\n"
            "addr = ctypes.addressof(ctypes.c_char.from_buffer(m))\n"
            "print('before', flush=True)\n"
            "ctypes.CFUNCTYPE(ctypes.c_int)(addr)()\n"
            "print('survived', flush=True)\n")
    res = run(native, make_spec(workspace, py(code)))
    assert res.status == -signal.SIGSYS, res.text
    assert "survived" not in res.text
    # x32 numbering (bit 30 set) is foreign too.
    res = run(native, make_spec(workspace, py(
        "import ctypes; ctypes.CDLL(None).syscall(0x40000000 | 39); print('survived')")))
    assert res.status == -signal.SIGSYS, res.text


def test_personality_query_is_allowed(native: NativeBackend, workspace: Path) -> None:
    code = ("import ctypes, json; c = ctypes.CDLL(None, use_errno=True)\n"
            "q = c.personality(ctypes.c_ulong(0xffffffff)); z = c.personality(ctypes.c_ulong(0))\n"
            "bad = c.personality(ctypes.c_ulong(0x0400000)); e = ctypes.get_errno()\n"
            "print(json.dumps([q, z, bad, e]))")
    out = json.loads(run(native, make_spec(workspace, py(code))).stdout.decode().strip())
    assert out[0] >= 0 and out[1] >= 0 and out[2] == -1 and out[3] == 1


def test_pass_fds_reach_the_agent_at_the_same_number(native: NativeBackend,
                                                     workspace: Path) -> None:
    kernel_end, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = agent_end.fileno()
    try:
        code = f"import os; os.write({fd}, b'hello from the agent')"
        res = run(native, make_spec(workspace, py(code), pass_fds=(fd,)))
        assert res.status == 0, res.text
        kernel_end.settimeout(5)
        assert kernel_end.recv(100) == b"hello from the agent"
    finally:
        kernel_end.close()
        agent_end.close()


def test_rlimit_as_only_without_memory_cgroup(native: NativeBackend, workspace: Path) -> None:
    res = run(native, make_spec(workspace, py("pass")))
    e = res.enforced
    mem_cgroup = "memory" in e["cgroup"].get("paths", {}) or e["cgroup"]["mode"] == "v2"
    assert isinstance(e["limits"]["address_space_bytes"], str) == mem_cgroup


def test_memory_breach_is_named(native: NativeBackend, workspace: Path) -> None:
    limits = Limits(wall_seconds=60, cpu_seconds=60, memory_mb=64, processes=16,
                    open_files=64, file_size_mb=8)
    res = run(native, make_spec(workspace, agent_argv("memory_bomb.py"), limits=limits),
              timeout=120)
    mem_cgroup = "memory" in res.enforced["cgroup"].get("paths", {})
    if not mem_cgroup:
        # RLIMIT_AS instead (an ordinary user's kernel): the bomb's own allocation fails
        assert isinstance(res.enforced["limits"]["address_space_bytes"], int)
        assert res.status == 3, res  # memory_bomb.py exits 3 on MemoryError
        return
    assert res.breach == "memory" and res.status == -signal.SIGKILL


@pytest.fixture
def open_workspace() -> Iterator[Path]:
    """A workspace an unprivileged user can reach (pytest's tmp dirs are root-only)."""
    top = Path(tempfile.mkdtemp(prefix="agent-kernel-test-"))
    top.chmod(0o755)
    ws = top / "ws"
    ws.mkdir(mode=0o755)
    (ws / "README.md").write_text("the workspace\n")
    yield ws
    shutil.rmtree(top)


def test_unprivileged_kernel_gets_its_own_uid_and_no_cgroups(open_workspace: Path) -> None:
    """The kernel not running as root: its own uid, no cgroups (recorded, not refused), rlimits
    only. Run for real in a forked copy of this test process that gave up root."""
    if os.geteuid() != 0:
        pytest.skip("this process is not root: every other test here already runs that way")
    backend_or_skip("native")
    uid = gid = 65533
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the forked, unprivileged "kernel"
        code = 1
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            b = NativeBackend()
            res = run(b, make_spec(open_workspace, agent_argv("identity.py")))
            report = {"ids": list(b.agent_ids()), "out": res.json(), "status": res.status,
                      "cgroup": res.enforced["cgroup"], "limits": res.enforced["limits"],
                      "method": res.enforced["mounts"]["method"]}
            os.write(w, json.dumps(report).encode())
            code = 0
        except BaseException as e:
            os.write(w, json.dumps({"error": repr(e)}).encode())
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    report = json.loads(data)
    assert "error" not in report, report
    assert report["status"] == 0
    assert report["ids"] == [uid, gid]
    assert report["out"]["uid"] == uid and int(report["out"]["CapEff"], 16) == 0
    assert report["cgroup"]["mode"] == "none" and "not root" in report["cgroup"]["why"]
    assert isinstance(report["limits"]["address_space_bytes"], int)
    assert report["method"].startswith("binds of sources opened by the sandbox child")


def test_agent_uid_can_be_chosen_but_never_root(workspace: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    backend_or_skip("native")
    if os.geteuid() != 0:
        pytest.skip("the agent ids are configurable only when the kernel runs as root")
    monkeypatch.setenv("KERNEL_AGENT_UID", "64011")
    monkeypatch.setenv("KERNEL_AGENT_GID", "64012")
    b = NativeBackend()
    assert b.agent_ids() == (64011, 64012)
    out = run(b, make_spec(workspace, agent_argv("identity.py"))).json()
    assert (out["uid"], out["gid"]) == (64011, 64012)
    monkeypatch.setenv("KERNEL_AGENT_UID", "0")
    refused = NativeBackend()
    av = refused.probe()
    assert not av.available and any("KERNEL_AGENT_UID" in m for m in av.missing)
    with pytest.raises(SandboxError):
        refused.start(make_spec(workspace, py("pass")))
