"""firejail-specific checks: the generated profile, refusals, and the guarantees firejail alone
does not give (host filesystem, io_uring, user namespaces, environment, uid, kill).

The profile and refusal tests run anywhere. The sandbox tests need root and a setuid firejail;
they skip with the probe's reason otherwise (CI runs as root with firejail installed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from kernel.errors import SandboxError
from kernel.policy import Limits
from sandbox.base import SandboxSpec
from sandbox.firejail import (
    EXTRA_SECCOMP,
    FirejailBackend,
    HostLayout,
    check_env,
    make_plan,
)
from tests.sandbox_helpers import AGENTS, MIB, make_spec, run, wait_gone

pytestmark = [pytest.mark.firejail]
sandbox = pytest.mark.sandbox
adversarial = pytest.mark.adversarial

PYTHON = "/usr/bin/python3"
ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}


def _spec(ws: Path, **kw: Any) -> SandboxSpec:
    base: dict[str, Any] = {
        "argv": (PYTHON, "-c", "pass"), "workspace": ws, "workspace_view": ws,
        "workspace_writable": False, "cwd": ws, "env": dict(ENV),
        "limits": Limits(wall_seconds=60, cpu_seconds=30, memory_mb=256, processes=32,
                         open_files=128, file_size_mb=8),
        "scratch_bytes": 8 * MIB, "hidden": (ws / "runs",),
        "read_paths": (Path("/opt/toolchain"), Path("/usr/share/zoneinfo")),
        "wall_seconds": 60.0,
    }
    base.update(kw)
    return SandboxSpec(**base)


LAYOUT = HostLayout(root_entries=("bin", "boot", "dev", "etc", "home", "lib", "opt", "proc",
                                  "root", "run", "srv", "sys", "tmp", "usr", "var", "work"),
                    etc_entries=("group", "ld.so.cache", "passwd"))


# --- the generated profile (no root needed) -------------------------------------------------


def test_profile_for_a_workspace_outside_tmp() -> None:
    ws = Path("/work/project")
    plan = make_plan(_spec(ws), LAYOUT, memory_cgroup=False, pids_cgroup=True)
    lines = plan.profile.splitlines()
    for must in ("quiet", "noroot", "nonewprivs", "caps.drop all", "nogroups", "net none",
                 "protocol unix", "ipc-namespace", "private-dev", "seccomp.block-secondary",
                 "restrict-namespaces", "deterministic-shutdown", "deterministic-exit-code",
                 "seccomp " + ",".join(EXTRA_SECCOMP), "whitelist /etc/passwd",
                 "read-only /etc/passwd", "whitelist /etc/ld.so.cache", "keep-var-tmp",
                 "whitelist /work/project", "read-only /work/project",
                 "whitelist /opt/toolchain", "read-only /opt/toolchain",
                 "blacklist /work/project/runs", "blacklist /dev/shm", "blacklist /dev/tty",
                 "blacklist /sys", "blacklist /home", "blacklist /root", "blacklist /var",
                 "blacklist /boot", "blacklist /srv",
                 "rlimit-nofile 128", "rlimit-nproc 34", f"rlimit-fsize {8 * MIB}",
                 f"rlimit-as {256 * MIB}", "private-cwd /work/project"):
        assert must in lines, must
    assert "io_uring_setup" in EXTRA_SECCOMP
    # kept: the system dirs, /proc, /etc (private-etc), /dev (private-dev), /tmp (the
    # launcher's scratch), /run (the launcher's tmpfs), whitelisted tops (/work, /opt)
    for kept in ("/usr", "/bin", "/lib", "/proc", "/etc", "/dev", "/tmp", "/run", "/work",
                 "/opt"):
        assert f"blacklist {kept}" not in lines, kept
    # /usr/share/zoneinfo is visible already: not whitelisted (that would hide the rest of
    # /usr/share behind a tmpfs)
    assert not any("zoneinfo" in ln for ln in lines)
    # the launcher binds nothing when the workspace is outside /tmp and not a copy
    assert plan.binds == ()
    assert "timeout" not in plan.profile  # wall time: pid 1 of the launcher, not firejail
    assert not any(ln.startswith("rlimit-cpu") for ln in lines)  # set by the launcher


def test_profile_for_a_workspace_under_tmp_and_a_private_copy() -> None:
    ws = Path("/tmp/pytest-x/ws")
    copy = Path("/tmp/agent-kernel-1/exec-2/ws")
    plan = make_plan(_spec(copy, workspace_view=ws, workspace_writable=True, cwd=ws,
                           read_paths=(Path("/tmp/agent-kernel-1/bundle"),)),
                     LAYOUT, memory_cgroup=True, pids_cgroup=True)
    lines = plan.profile.splitlines()
    # under /tmp nothing is whitelisted (firejail would cover the sized scratch with its own
    # unlimited tmpfs); the launcher binds instead and firejail marks read-only
    assert not any(ln.startswith("whitelist /tmp") for ln in lines)
    assert "read-only /tmp/agent-kernel-1/bundle" in lines
    assert "read-only /tmp/pytest-x/ws" not in lines  # the copy is writable
    assert [(b.source, b.target, b.read_only) for b in plan.binds] == [
        (str(copy), str(ws), False),
        ("/tmp/agent-kernel-1/bundle", "/tmp/agent-kernel-1/bundle", True),
    ]
    assert not any(ln.startswith("rlimit-as") for ln in lines)  # memory cgroup instead


@pytest.mark.parametrize("bad", ["/work/a*b", "/work/a,b", "/work/a\nb", "/work/${HOME}",
                                 "/work/a/../b", "relative/ws", "/work/a b "])
def test_paths_a_profile_cannot_express_are_refused(bad: str) -> None:
    with pytest.raises(SandboxError) as e:
        make_plan(_spec(Path("/work/ok"), workspace=Path(bad), workspace_view=Path(bad),
                        cwd=Path("/work/ok")),
                  LAYOUT, memory_cgroup=False, pids_cgroup=False)
    assert "firejail backend" in e.value.message


@pytest.mark.parametrize("view", ["/", "/etc/x", "/usr/lib/x", "/proc/1", "/run/user"])
def test_workspace_in_a_system_place_is_refused(view: str) -> None:
    with pytest.raises(SandboxError, match="system directory"):
        make_plan(_spec(Path(view), cwd=Path(view)), LAYOUT, memory_cgroup=False,
                  pids_cgroup=False)


@pytest.mark.parametrize("name", ["LD_PRELOAD", "LD_LIBRARY_PATH", "TMPDIR", "GCONV_PATH",
                                  "container", "PROMPT_COMMAND"])
def test_variables_that_cannot_pass_through_firejail_are_refused(name: str) -> None:
    with pytest.raises(SandboxError, match=name):
        check_env({"PATH": "/usr/bin", name: "/x"})


def test_probe_refuses_when_firejail_is_not_on_the_path(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    backend = FirejailBackend(search_path=str(empty))
    av = backend.probe()
    assert not av.available
    assert any("firejail binary not found on PATH" in m for m in av.missing), av.missing
    assert backend.probe() is av  # cached
    with pytest.raises(SandboxError, match="firejail binary not found"):
        backend.start(_spec(tmp_path))


# --- real sandboxes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend() -> FirejailBackend:
    if os.geteuid() != 0:
        pytest.skip("the firejail backend needs the kernel to run as root")
    b = FirejailBackend()
    av = b.probe()
    if not av.available:
        pytest.skip("firejail backend unavailable here: " + "; ".join(av.missing))
    assert av.facts["firejail_version"]
    return b


def py(backend: FirejailBackend, ws: Path, code: str, **kw: Any) -> dict[str, Any]:
    spec = make_spec(ws, [PYTHON, "-c", textwrap.dedent(code)], **kw)
    res = run(backend, spec, timeout=60)
    out = res.json()
    out["_status"] = res.status
    out["_enforced"] = res.enforced
    return out


@sandbox
@adversarial
def test_host_filesystem_is_not_visible(backend: FirejailBackend, workspace: Path,
                                        tmp_path: Path) -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    host_tmp = Path("/tmp") / canary
    host_tmp.write_text(canary)
    shm = Path("/dev/shm") / canary
    try:
        shm.write_text(canary)
        shm_made = True
    except OSError:
        shm_made = False
    try:
        out = py(backend, workspace, f"""
            import json, os
            out = {{}}
            for p in ["/root", "/home", "/var", "/run", "/tmp", "/dev/shm", "/sys", "/srv",
                      "/opt", "/mnt", "/boot", "/etc"]:
                try:
                    out[p] = sorted(os.listdir(p))
                except OSError as e:
                    out[p] = "errno %d" % e.errno
            for p in [{str(host_tmp)!r}, "/dev/shm/{canary}", "/etc/shadow",
                      "/run/firejail/firejail-run.lock"]:
                try:
                    out[p] = open(p).read()
                except OSError as e:
                    out[p] = "errno %d" % e.errno
            print(json.dumps(out))
        """)
    finally:
        host_tmp.unlink()
        if shm_made:
            shm.unlink()
    for p in ("/root", "/home", "/var", "/run", "/dev/shm", "/sys", "/srv", "/opt", "/mnt",
              "/boot"):
        assert out[p] == [] or str(out[p]).startswith("errno"), (p, out[p])
    assert str(out[str(host_tmp)]).startswith("errno"), out[str(host_tmp)]
    assert str(out[f"/dev/shm/{canary}"]).startswith("errno")
    assert str(out["/run/firejail/firejail-run.lock"]).startswith("errno")
    # /tmp is the private scratch: only the mount points of the visible paths under /tmp in it
    # (the workspace, and the test agents' read-only dir when the checkout lies under /tmp)
    mountpoints = {p.parts[2] for p in (workspace, AGENTS) if p.parts[1] == "tmp"}
    assert set(out["/tmp"]) <= mountpoints, out["/tmp"]
    assert "shadow" not in out["/etc"] and "passwd" in out["/etc"]
    assert str(out["/etc/shadow"]).startswith("errno")


@sandbox
@adversarial
def test_io_uring_and_new_user_namespaces_fail(backend: FirejailBackend,
                                               workspace: Path) -> None:
    out = py(backend, workspace, """
        import ctypes, json, os
        libc = ctypes.CDLL(None, use_errno=True)
        params = ctypes.create_string_buffer(120)
        r = libc.syscall(425, 8, params)  # io_uring_setup
        uring = "errno %d" % ctypes.get_errno() if r < 0 else "fd %d" % r
        r = libc.unshare(0x10000000)  # CLONE_NEWUSER
        userns = "errno %d" % ctypes.get_errno() if r != 0 else "created"
        r = libc.unshare(0x00020000)  # CLONE_NEWNS
        mntns = "errno %d" % ctypes.get_errno() if r != 0 else "created"
        print(json.dumps({"io_uring": uring, "userns": userns, "mntns": mntns}))
    """)
    assert out["io_uring"].startswith("errno"), out
    assert out["userns"].startswith("errno"), out
    assert out["mntns"].startswith("errno"), out


@sandbox
@adversarial
def test_environment_is_exactly_the_spec(backend: FirejailBackend, workspace: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOST_ONLY_SECRET", "s3cr3t")
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "MINE": "yes",
           "SHELL": "/bin/sh"}
    out = py(backend, workspace, """
        import json, os
        print(json.dumps({"env": dict(os.environ)}))
    """, env=env)
    seen = out["env"]
    seen.pop("LC_CTYPE", None)  # set by Python itself (PEP 538 locale coercion)
    assert seen == env
    assert out["_enforced"]["firejail_added_env_removed"]


@sandbox
def test_agent_uid_is_not_root_and_matches_agent_ids(backend: FirejailBackend,
                                                     workspace: Path) -> None:
    out = py(backend, workspace, """
        import json, os
        st = open("/proc/self/status").read()
        print(json.dumps({"ids": [os.getuid(), os.geteuid(), os.getgid(), os.getgroups()],
                          "uid_map": open("/proc/self/uid_map").read().split()}))
    """)
    uid, gid = backend.agent_ids()
    assert uid != 0 and gid != 0
    assert out["ids"] == [uid, uid, gid, [gid]] or out["ids"] == [uid, uid, gid, []]
    assert out["uid_map"] == [str(uid), str(uid), "1"]  # firejail's user namespace


@sandbox
@adversarial
def test_kill_leaves_no_process_of_the_agent_uid(backend: FirejailBackend,
                                                 workspace: Path) -> None:
    uid, _ = backend.agent_ids()
    before = _live_pids_of(uid)
    marker = f"fjkill-{uuid.uuid4().hex}"
    code = f"""
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(300)  # {marker}
    os._exit(0)
print("ready", flush=True)
time.sleep(300)
"""
    r, w = os.pipe()
    sb = backend.start(make_spec(workspace, [PYTHON, "-c", code, marker], stdout=w))
    os.close(w)
    try:
        assert os.read(r, 100).startswith(b"ready")
        deadline = time.monotonic() + 10
        while len(_live_pids_of(uid) - before) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _live_pids_of(uid) - before, "the agent's processes never appeared"
        sb.kill()
        assert sb.wait(10) is not None
        assert wait_gone(marker, 5.0) == []
        deadline = time.monotonic() + 5
        while _live_pids_of(uid) - before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _live_pids_of(uid) - before == set()
        assert sb.breach() is None
    finally:
        sb.kill()
        sb.cleanup()
        os.close(r)


def _live_pids_of(uid: int) -> set[int]:
    """Host pids owned by ``uid`` that are not zombies."""
    found = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{d}")
            with open(f"/proc/{d}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if st.st_uid == uid and state != b"Z":
            found.add(int(d))
    return found


@sandbox
def test_private_copy_is_writable_at_the_view_and_the_workspace_is_untouched(
        backend: FirejailBackend, workspace: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "a.txt").write_text("copy\n")
    uid, gid = backend.agent_ids()
    os.chown(copy, uid, gid)
    os.chown(copy / "a.txt", uid, gid)
    out = py(backend, copy, """
        import json, os
        seen = open("a.txt").read()
        open("new.txt", "w").write("made")
        print(json.dumps({"seen": seen, "cwd": os.getcwd()}))
    """, writable=True, view=workspace)
    assert out["seen"] == "copy\n" and out["cwd"] == str(workspace)
    assert (copy / "new.txt").read_text() == "made"
    assert not (workspace / "new.txt").exists()
    assert (workspace / "a.txt").read_text() == "a\n"


@sandbox
def test_scratch_is_size_limited_and_the_workspace_read_only(backend: FirejailBackend,
                                                              workspace: Path) -> None:
    out = py(backend, workspace, """
        import json, os
        res = {}
        try:
            open("a.txt", "w").write("x")
            res["ws"] = "written"
        except OSError as e:
            res["ws"] = "errno %d" % e.errno
        n = 0
        try:
            with open("/tmp/fill", "wb") as f:
                for _ in range(64):
                    f.write(b"x" * (1 << 20)); f.flush(); n += 1
        except OSError as e:
            res["fill"] = "errno %d" % e.errno
        res["mb"] = n
        print(json.dumps(res))
    """, scratch_bytes=4 * MIB,
        limits=Limits(wall_seconds=60, cpu_seconds=30, memory_mb=512, processes=64,
                      open_files=256, file_size_mb=64))
    assert out["ws"].startswith("errno")
    assert out["mb"] <= 4 and out["fill"] == "errno 28", out  # ENOSPC


@sandbox
def test_concurrent_sandboxes_do_not_collide(backend: FirejailBackend,
                                             workspace: Path) -> None:
    """Every sandbox's firejail is pid 2 of its own namespace; its run files must be private."""
    rs = []
    sbs = []
    for i in range(3):
        r, w = os.pipe()
        code = f"import time; time.sleep(1); print('done {i}')"
        sbs.append(backend.start(make_spec(workspace, [PYTHON, "-c", code], stdout=w)))
        os.close(w)
        rs.append(r)
    try:
        for i, (sb, r) in enumerate(zip(sbs, rs, strict=True)):
            assert sb.wait(30) == 0
            assert os.read(r, 100).strip() == f"done {i}".encode()
    finally:
        for sb, r in zip(sbs, rs, strict=True):
            sb.kill()
            sb.cleanup()
            os.close(r)


@sandbox
def test_enforced_records_profile_and_layers(backend: FirejailBackend, workspace: Path) -> None:
    out = py(backend, workspace, "import json; print(json.dumps({}))")
    enf = out["_enforced"]
    assert enf["backend"] == "firejail" and enf["firejail_version"]
    assert enf["profile_sha256"] == "sha256:" + hashlib.sha256(
        enf["profile"].encode()).hexdigest()
    assert enf["agent_uid"] == backend.agent_ids()[0]
    assert any("seccomp filter" in layer for layer in enf["layers"])
    assert any(a.startswith("--profile=") for a in enf["argv"])

    def no_floats(v: object) -> None:
        assert not isinstance(v, float), v
        if isinstance(v, dict):
            for k, x in v.items():
                assert isinstance(k, str)
                no_floats(x)
        elif isinstance(v, list):
            for x in v:
                no_floats(x)
        else:
            assert v is None or isinstance(v, str | int | bool), v

    no_floats(enf)
    json.dumps(enf)


@sandbox
def test_wall_time_is_enforced_by_the_sandbox_itself(backend: FirejailBackend,
                                                     workspace: Path) -> None:
    import dataclasses

    spec = dataclasses.replace(make_spec(workspace, [PYTHON, "-c", "import time; "
                                                     "time.sleep(60)"]), wall_seconds=1.0)
    t0 = time.monotonic()
    res = run(backend, spec, timeout=30)
    assert not res.timed_out and time.monotonic() - t0 < 10
    assert res.status is not None and res.status != 0



@sandbox
def test_exit_status_and_signals_are_mirrored(backend: FirejailBackend,
                                              workspace: Path) -> None:
    assert run(backend, make_spec(workspace, [PYTHON, "-c", "raise SystemExit(7)"])).status == 7
    res = run(backend, make_spec(workspace, [PYTHON, "-c",
                                             "import os; os.kill(os.getpid(), 15)"]))
    assert res.status == -signal.SIGTERM


@sandbox
def test_pass_fds_reach_the_agent_at_the_same_number(backend: FirejailBackend,
                                                     workspace: Path) -> None:
    kernel_end, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = agent_end.fileno()
    try:
        code = f"import os; os.write({fd}, b'hello from the agent')"
        res = run(backend, make_spec(workspace, [PYTHON, "-c", code], pass_fds=(fd,)))
        assert res.status == 0, res.text
        kernel_end.settimeout(5)
        assert kernel_end.recv(100) == b"hello from the agent"
    finally:
        kernel_end.close()
        agent_end.close()


@sandbox
@adversarial
def test_foreign_syscall_abi_kills_the_process(backend: FirejailBackend,
                                               workspace: Path) -> None:
    code = ("import ctypes, mmap\n"
            "m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
            "m.write(bytes([0xb8, 20, 0, 0, 0, 0xcd, 0x80, 0xc3]))\n"
            "addr = ctypes.addressof(ctypes.c_char.from_buffer(m))\n"
            "print('before', flush=True)\n"
            "ctypes.CFUNCTYPE(ctypes.c_int)(addr)()\n"
            "print('survived', flush=True)\n")
    res = run(backend, make_spec(workspace, [PYTHON, "-c", code]))
    assert res.status == -signal.SIGSYS, res.text
    assert "survived" not in res.text


@sandbox
def test_workspace_view_under_tmp_need_not_exist_on_the_host(backend: FirejailBackend,
                                                             workspace: Path) -> None:
    view = Path("/tmp") / f"agent-kernel-view-{uuid.uuid4().hex}" / "ws"
    res = run(backend, make_spec(workspace, [PYTHON, "-c", "import os; print(os.listdir('.'))"],
                                 view=view))
    assert "a.txt" in res.stdout.decode(), res.text
    assert not view.parent.exists()


@sandbox
def test_hidden_file_inside_the_workspace_is_unreadable(backend: FirejailBackend,
                                                        workspace: Path) -> None:
    key = workspace / "signing.key"
    key.write_text("PRIVATE-KEY-MATERIAL")
    key.chmod(0o644)
    res = run(backend, make_spec(workspace, [PYTHON, "-c", "print(open('signing.key').read())"],
                                 hidden=(key,)))
    assert "PRIVATE-KEY-MATERIAL" not in res.text
    assert res.status != 0


@sandbox
def test_workspace_outside_tmp_is_whitelisted_read_only(backend: FirejailBackend) -> None:
    base = Path(tempfile.mkdtemp(prefix="agent-kernel-fjtest-", dir="/var/tmp"))
    try:
        ws = base / "ws"
        ws.mkdir()
        (ws / "f.txt").write_text("f")
        for p in (base, ws):
            p.chmod(0o755)
        out = py(backend, ws, """
            import json, os
            res = {"ls": os.listdir("."), "var": os.listdir("/var"),
                   "var_tmp": os.listdir("/var/tmp")}
            try:
                open("g", "w")
                res["write"] = "written"
            except OSError as e:
                res["write"] = "errno %d" % e.errno
            print(json.dumps(res))
        """)
        assert out["ls"] == ["f.txt"] and out["var"] == ["tmp"]
        assert out["var_tmp"] == [base.name]  # nothing else of the host's /var/tmp
        assert out["write"] == "errno 30"
        assert f"whitelist {ws}" in out["_enforced"]["profile"].splitlines()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@sandbox
def test_sandbox_ends_when_the_agent_exits_even_with_children_left(
        backend: FirejailBackend, workspace: Path) -> None:
    marker = f"fjbg-{uuid.uuid4().hex}"
    code = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', "
            "'import time; print(1, flush=True); time.sleep(300)', sys.argv[1]], "
            "stdout=subprocess.PIPE); p.stdout.readline(); print('spawned', flush=True)")
    t0 = time.monotonic()
    res = run(backend, make_spec(workspace, [PYTHON, "-c", code, marker]), timeout=30)
    assert not res.timed_out and time.monotonic() - t0 < 15
    assert res.status == 0 and b"spawned" in res.stdout
    assert wait_gone(marker, 5.0) == []
    assert "deterministic-shutdown" in res.enforced["profile"].splitlines()


@sandbox
def test_private_copy_of_a_workspace_outside_tmp(backend: FirejailBackend,
                                                 tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="agent-kernel-fjtest-", dir="/var/tmp"))
    try:
        base.chmod(0o755)
        ws = base / "ws"
        ws.mkdir(mode=0o755)
        (ws / "a.txt").write_text("real\n")
        copy = tmp_path / "copy"
        copy.mkdir()
        (copy / "a.txt").write_text("copy\n")
        tmp_path.chmod(0o711)
        uid, gid = backend.agent_ids()
        for p in (copy, copy / "a.txt"):
            os.chown(p, uid, gid)
        out = py(backend, copy, """
            import json, os
            open("b.txt", "w").write("made")
            print(json.dumps({"seen": open("a.txt").read(), "cwd": os.getcwd()}))
        """, writable=True, view=ws)
        assert out["seen"] == "copy\n" and out["cwd"] == str(ws)
        assert (copy / "b.txt").read_text() == "made"
        assert sorted(os.listdir(ws)) == ["a.txt"]
        # not owned by the agent: firejail would silently keep it read-only, so: refused
        with pytest.raises(SandboxError, match="not owned by the agent uid"):
            backend.start(make_spec(ws, [PYTHON, "-c", "pass"], writable=True))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_profile_for_a_private_copy_outside_tmp() -> None:
    view = Path("/work/project")
    copy = Path("/tmp/agent-kernel-1/exec-2/ws")
    plan = make_plan(_spec(copy, workspace_view=view, workspace_writable=True, cwd=view),
                     LAYOUT, memory_cgroup=True, pids_cgroup=True)
    lines = plan.profile.splitlines()
    assert "whitelist /work/project" in lines and "read-write /work/project" in lines
    assert "read-only /work/project" not in lines
    assert [(b.source, b.target, b.read_only) for b in plan.binds] == [
        (str(copy), str(view), False)]
