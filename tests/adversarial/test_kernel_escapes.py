"""Agents that really try to break SPEC §4-§5 through `kernel exec`, on both backends.

Each test checks host-side evidence (a canary file, a listener, a process, the output) that the
attack failed, and the decision the run folder recorded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from kernel.errors import ExitCode
from tests.kernel_helpers import (
    AGENT_PY,
    BACKENDS,
    CLIENT_PRELUDE,
    ROOT,
    make_workspace,
    open_up,
    results,
    run_agent,
    skip_unless_available,
)
from tests.sandbox_helpers import pids_with_marker

pytestmark = [pytest.mark.sandbox, pytest.mark.adversarial]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    skip_unless_available(name)
    return name


def _rule_of(run_results: dict[str, dict[str, object]], name: str) -> object:
    return run_results[name].get("rule")


def test_direct_write_to_the_workspace_fails(tmp_path: Path, backend: str) -> None:
    run = run_agent(tmp_path, """
import os
for name, fn in [("create", lambda: open("direct.txt", "w").write("x")),
                 ("overwrite", lambda: open("keep.txt", "w").write("changed")),
                 ("unlink", lambda: os.unlink("keep.txt")),
                 ("mkdir", lambda: os.mkdir("newdir")),
                 ("chmod", lambda: os.chmod("keep.txt", 0o777))]:
    try:
        fn(); print(name, "SUCCEEDED")
    except OSError as e:
        print(name, "failed", e.errno)
""", backend=backend, files={"keep.txt": "original"})
    assert "SUCCEEDED" not in run.agent_output
    assert not (run.workspace / "direct.txt").exists()
    assert not (run.workspace / "newdir").exists()
    assert (run.workspace / "keep.txt").read_text() == "original"
    assert (run.workspace / "keep.txt").stat().st_mode & 0o777 != 0o777


def test_write_escapes_are_denied_with_their_rule(tmp_path: Path, backend: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("untouched")
    ws = make_workspace(tmp_path, {"real/file.txt": "f"})
    os.symlink(outside, ws / "link_out")
    os.symlink(ws / "real", ws / "link_in")
    os.link(victim, ws / "hardlink.txt")
    canary = tmp_path / "canary.txt"
    run = run_agent(tmp_path, CLIENT_PRELUDE + f"""
attempt("dotdot", lambda: k.write("../canary.txt", b"x"))
attempt("deep_dotdot", lambda: k.write("real/../../canary.txt", b"x"))
attempt("absolute", lambda: k.write({str(canary)!r}, b"x"))
attempt("symlink_out", lambda: k.write("link_out/victim.txt", b"x"))
attempt("symlink_in", lambda: k.write("link_in/file.txt", b"x"))
attempt("final_symlink", lambda: k.write("link_out", b"x"))
attempt("hardlink_append", lambda: k.append("hardlink.txt", b"x"))
attempt("hardlink_chmod", lambda: k.chmod("hardlink.txt", 0o777))
attempt("nul", lambda: k.write("a\\x00b", b"x"))
attempt("control", lambda: k.write("a\\x1bb", b"x"))
attempt("long", lambda: k.write("a" * 300, b"x"))
attempt("rename_out", lambda: k.rename("real/file.txt", "../canary.txt"))
attempt("mode_bits", lambda: k.chmod("real/file.txt", 0o4755))
""", backend=backend, workspace=ws)
    r = results(run)
    assert not any(v["ok"] for v in r.values()), r
    assert _rule_of(r, "dotdot") == "path.outside"
    assert _rule_of(r, "deep_dotdot") == "path.outside"
    assert _rule_of(r, "absolute") == "path.outside"
    assert _rule_of(r, "symlink_out") == "path.symlink"
    assert _rule_of(r, "symlink_in") == "path.symlink"
    assert _rule_of(r, "hardlink_append") == "path.hardlink"
    assert _rule_of(r, "hardlink_chmod") == "path.hardlink"
    assert _rule_of(r, "nul") == "path.bad_bytes"
    assert _rule_of(r, "long") == "path.too_long"
    assert _rule_of(r, "rename_out") == "path.outside"
    assert _rule_of(r, "mode_bits") == "write.mode"
    # host-side evidence
    assert not canary.exists()
    assert victim.read_text() == "untouched"
    assert victim.stat().st_mode & 0o777 != 0o777
    assert os.path.islink(ws / "link_out")
    assert (ws / "real" / "file.txt").read_text() == "f"
    # the record: every request denied, with the same rules
    denied = [d for d in run.decisions() if d["decision"] == "denied"]
    assert len(denied) == len(r)
    assert run.verify().returncode == 0


def test_protected_paths_are_refused_and_untouched(tmp_path: Path, backend: str) -> None:
    run = run_agent(tmp_path, CLIENT_PRELUDE + """
attempt("git", lambda: k.write(".git/config", b"[core]\\n\\tfsmonitor = evil\\n"))
attempt("hook", lambda: k.write(".git/hooks/pre-commit", b"#!/bin/sh\\nevil\\n"))
attempt("ci", lambda: k.write(".ci/run", b"evil"))
attempt("env", lambda: k.write(".env", b"TOKEN=x"))
attempt("pem", lambda: k.write("keys/server.pem", b"x"))
k.write("x.sh", b"evil")
attempt("rename_into", lambda: k.rename("x.sh", ".git/hooks/post-checkout"))
attempt("delete_git", lambda: k.delete(".git/config"))
""", backend=backend, files={".git/config": "[core]\n", ".ci/run": "make test\n"})
    r = results(run)
    assert not any(v["ok"] for v in r.values()), r
    for name in ("git", "hook", "delete_git"):
        assert _rule_of(r, name) == "protected:.git/**"
    assert _rule_of(r, "ci") == "protected:.ci/**"
    assert _rule_of(r, "env") == "protected:.env*"
    assert _rule_of(r, "pem") == "protected:*.pem"
    assert (run.workspace / ".git" / "config").read_text() == "[core]\n"
    assert (run.workspace / ".ci" / "run").read_text() == "make test\n"
    assert not (run.workspace / ".env").exists()
    assert not (run.workspace / ".git" / "hooks").exists()
    assert any("approval" in d["reason"] for d in run.decisions() if d["decision"] == "denied")


def test_exec_command_writing_outside_and_into_protected_paths(
        tmp_path: Path, backend: str) -> None:
    # Two canaries: one beside the workspace (under /tmp, where the sandbox has its private
    # scratch: a write there lands in the discarded scratch, never on the host), one in a host
    # directory the sandbox does not show at all.
    canary = tmp_path / "exec-canary.txt"
    canary2 = Path("/var/tmp") / f"agent-kernel-canary-{uuid.uuid4().hex}"
    open_up(tmp_path)
    script = (
        "import os\n"
        f"for p in [{str(canary)!r}, {str(canary2)!r}]:\n"
        "    try:\n        open(p, 'w').write('x')\n"
        "    except OSError as e:\n        print('outside failed', e.errno)\n"
        "os.makedirs('.git/hooks', exist_ok=True)\n"
        "open('.git/hooks/pre-commit', 'w').write('evil')\n"
        "open('.git/config', 'w').write('changed')\n"
        "open('ok.txt', 'w').write('fine')\n"
        "os.symlink('/etc/shadow', 'shadow-link')\n"
        "try:\n    os.mkfifo('a-fifo')\n"
        "except OSError as e:\n    print('mkfifo refused in the sandbox', e.errno)\n"
    )
    run = run_agent(tmp_path, CLIENT_PRELUDE + f"""
r = k.exec(["python3", "-c", {script!r}])
report("exec", {{"code": r.exit_code, "out": r.stdout.decode(), "err": r.stderr.decode(),
                 "changes": r.changes}})
""", backend=backend, files={".git/config": "original"})
    r = results(run)["exec"]
    assert not canary.exists()
    assert not canary2.exists()
    by_path = {c["path"]: c for c in r["changes"]}
    assert by_path["ok.txt"]["decision"] == "allowed"
    assert by_path[".git/config"]["decision"] == "denied"
    assert by_path[".git/hooks/pre-commit"]["decision"] == "denied"
    assert by_path["shadow-link"]["decision"] == "denied"
    # the native sandbox refuses mkfifo itself (Landlock); if a FIFO is made, it is refused
    assert by_path.get("a-fifo", {"decision": "denied"})["decision"] == "denied"
    assert (run.workspace / "ok.txt").read_text() == "fine"
    assert (run.workspace / ".git" / "config").read_text() == "original"
    assert not (run.workspace / ".git" / "hooks").exists()
    assert not os.path.lexists(run.workspace / "shadow-link")
    assert not os.path.lexists(run.workspace / "a-fifo")
    captured = [d for d in run.decisions() if "captured_from" in d]
    assert {d["change"]["path"] for d in captured} >= {"ok.txt", ".git/config"}
    assert run.verify().returncode == 0


def test_no_network(tmp_path: Path, backend: str) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    got: list[bytes] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            got.append(c.recv(100) or b"<connected>")
            c.close()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    abstract = b"\0agent-kernel-test-" + uuid.uuid4().hex.encode()
    usrv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    usrv.bind(abstract)
    usrv.listen(1)
    try:
        run = run_agent(tmp_path, f"""
import socket
def tryit(name, fam, typ, addr):
    try:
        s = socket.socket(fam, typ)
        s.settimeout(2)
        s.connect(addr)
        s.sendall(b"LEAK")
        print(name, "CONNECTED")
    except OSError as e:
        print(name, "failed", e.errno)
tryit("tcp4", socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", {port}))
tryit("tcp6", socket.AF_INET6, socket.SOCK_STREAM, ("::1", {port}))
tryit("udp", socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", {port}))
tryit("abstract", socket.AF_UNIX, socket.SOCK_STREAM, {abstract!r})
try:
    print("ifaces", open("/proc/net/dev").read().count(":"))
except OSError as e:
    print("ifaces unreadable", e.errno)
""", backend=backend)
    finally:
        time.sleep(0.3)
        stop.set()
        t.join(2)
        srv.close()
        usrv.close()
    assert "CONNECTED" not in run.agent_output, run.agent_output
    assert got == []


def test_host_files_outside_the_read_set_stay_unreadable(tmp_path: Path, backend: str) -> None:
    secret_value = "host-secret-" + uuid.uuid4().hex
    secret = tmp_path / "secret.txt"
    secret.write_text(secret_value)
    os.chmod(secret, 0o644)
    open_up(tmp_path)
    run = run_agent(tmp_path, f"""
import os
for p in [{str(secret)!r}, "/root/.bashrc", "/etc/shadow", "/var/log", "/home", "/run",
          "/dev/shm", "/tmp"]:
    try:
        if os.path.isdir(p):
            print(p, "LISTED", os.listdir(p))
        else:
            print(p, "READ", open(p).read()[:200])
    except OSError as e:
        print(p, "denied", e.errno)
""", backend=backend)
    assert secret_value not in run.agent_output
    assert secret_value not in run.proc.stdout
    for line in run.agent_output.splitlines():
        if "LISTED" in line:
            assert line.endswith("[]") or line.startswith("/tmp"), line
    # and never in the run folder
    for f in run.run_dir.rglob("*"):
        if f.is_file():
            assert secret_value.encode() not in f.read_bytes()


def test_secrets_in_the_kernel_environment_never_reach_the_agent_and_are_redacted(
        tmp_path: Path, backend: str) -> None:
    token = "tok-" + uuid.uuid4().hex
    named = "named-" + uuid.uuid4().hex
    policy = tmp_path / "p.toml"
    policy.write_text((ROOT / "policies" / "default.toml").read_text().replace(
        "secrets = []", 'secrets = ["SERVICE_KEY"]'))
    run = run_agent(tmp_path, CLIENT_PRELUDE + """
import os
print("seen-env", sorted(os.environ))
print("service key is", os.environ.get("SERVICE_KEY"))
print("token is", os.environ.get("GITHUB_TOKEN"))
k.write("leak.txt", os.environ.get("SERVICE_KEY", "").encode())
""", backend=backend, policy=str(policy),
        env={"GITHUB_TOKEN": token, "SERVICE_KEY": named})
    assert run.proc.returncode == 0, run.proc.stderr
    assert token not in run.agent_output
    assert "token is None" in run.agent_output
    assert f"service key is {named}" in run.agent_output  # named by the policy: passed
    for f in run.run_dir.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert token.encode() not in data, f
            assert named.encode() not in data, f
    assert run.verify().returncode == 0


def test_runs_dir_inside_the_workspace_is_invisible(tmp_path: Path, backend: str) -> None:
    ws = make_workspace(tmp_path, {"a.txt": "a"})
    runs = ws / "runs"
    run = run_agent(tmp_path, CLIENT_PRELUDE + """
import os
print("listing", sorted(os.listdir(".")))
try:
    print("runs", os.listdir("runs"))
except OSError as e:
    print("runs denied", e.errno)
attempt("write_runs", lambda: k.write("runs/evil.txt", b"x"))
""", backend=backend, workspace=ws, runs_dir=runs)
    r = results(run)
    assert r["write_runs"]["ok"] is False and r["write_runs"]["rule"] == "path.hidden"
    assert not (runs / "evil.txt").exists()
    listing = [ln for ln in run.agent_output.splitlines() if ln.startswith("runs ")]
    assert not listing or listing[0] in ("runs []", "runs denied 2", "runs denied 13")
    assert run.verify().returncode == 0


def test_fork_bomb_is_contained_and_recorded(tmp_path: Path, backend: str) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text((ROOT / "policies" / "default.toml").read_text()
                      .replace("processes = 64", "processes = 16")
                      .replace("wall_seconds = 600", "wall_seconds = 20"))
    run = run_agent(tmp_path, """
import os, time
kids = 0
for _ in range(200):
    try:
        if os.fork() == 0:
            time.sleep(30); os._exit(0)
        kids += 1
    except OSError:
        break
print("forked", kids, flush=True)
time.sleep(60)
""", backend=backend, policy=str(policy), timeout=90)
    assert run.out["status"] == "limit", run.out
    assert run.out["breach"] in ("processes", "wall_seconds")
    if "pids" in _enforced(run).get("cgroup", {}).get("paths", {}):
        # a pids cgroup is in force: the fork bomb itself must be the recorded cause
        assert run.out["breach"] == "processes", run.out
    forked = [ln for ln in run.agent_output.splitlines() if ln.startswith("forked")]
    assert not forked or int(forked[0].split()[1]) < 16
    ends = [e["body"] for e in run.events() if e["type"] == "agent.exit"]
    assert ends and ends[0].get("breach") == run.out["breach"]
    assert run.verify().returncode == 0


def test_memory_bomb_is_killed_and_recorded(tmp_path: Path, backend: str) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text((ROOT / "policies" / "default.toml").read_text()
                      .replace("memory_mb = 1024", "memory_mb = 128")
                      .replace("wall_seconds = 600", "wall_seconds = 30"))
    run = run_agent(tmp_path, """
blocks = []
while True:
    blocks.append(bytearray(16 << 20))
    for i in range(0, len(blocks[-1]), 4096):
        blocks[-1][i] = 1
""", backend=backend, policy=str(policy), timeout=90)
    assert run.out["status"] in ("limit", "failed"), run.out
    assert run.out["exit_code"] != 0
    ends = [e["body"] for e in run.events() if e["type"] == "agent.exit"]
    assert ends
    if _enforced(run).get("cgroup", {}).get("memory_bytes"):
        # a memory cgroup is in force: the sandbox is killed and the cause recorded
        assert (run.out["status"], run.out["breach"]) == ("limit", "memory"), run.out
        assert ends[0].get("breach") == "memory"
    else:
        # RLIMIT_AS only: the agent dies of MemoryError, recorded as a failed run
        assert "MemoryError" in run.agent_output
    assert run.verify().returncode == 0


def _enforced(run: object) -> dict[str, Any]:
    starts = [e["body"] for e in run.events() if e["type"] == "sandbox.start"]  # type: ignore[attr-defined]
    return dict(starts[0]["enforced"])


def test_agent_dies_when_the_kernel_is_killed(tmp_path: Path, backend: str) -> None:
    marker = "marker-" + uuid.uuid4().hex
    ws = make_workspace(tmp_path)
    (ws / "agent.py").write_text(
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(600)\n"
        "    os._exit(0)\n"
        "time.sleep(600)\n")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "KERNEL_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kernel._cli", "exec", "--workspace", str(ws), "--runs-dir",
         str(tmp_path / "runs"), "--isolation", backend, "--", AGENT_PY, "agent.py", marker],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(pids_with_marker(marker)) < 3:
            time.sleep(0.1)
        agents = [p for p in pids_with_marker(marker) if p != proc.pid]
        assert len(agents) >= 2, "the agent did not start"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        survivors = [p for p in pids_with_marker(marker) if p != proc.pid]
        while time.monotonic() < deadline and survivors:
            time.sleep(0.1)
            survivors = [p for p in pids_with_marker(marker) if p != proc.pid]
        assert survivors == []
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in pids_with_marker(marker):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
    # the folder is incomplete, not corrupt
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    from tests.kernel_helpers import kernel_cmd

    v = kernel_cmd(["verify", str(runs[0]), "--trust",
                    str(tmp_path / "home" / "keys" / "kernel.pub")], home=tmp_path / "home")
    assert v.returncode == ExitCode.INCOMPLETE, v.stdout + v.stderr
    assert "incomplete" in v.stdout


def test_sigterm_to_the_kernel_kills_the_agent_and_seals_the_run(
        tmp_path: Path, backend: str) -> None:
    ws = make_workspace(tmp_path)
    (ws / "agent.py").write_text("import time\nprint('up', flush=True)\ntime.sleep(600)\n")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "KERNEL_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kernel._cli", "exec", "--json", "--workspace", str(ws),
         "--runs-dir", str(tmp_path / "runs"), "--isolation", backend, "--", AGENT_PY,
         "agent.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert b"up" in line
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.KILLED
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["status"] == "killed"
    from tests.kernel_helpers import kernel_cmd

    v = kernel_cmd(["verify", result["run_dir"], "--trust",
                    str(tmp_path / "home" / "keys" / "kernel.pub")], home=tmp_path / "home")
    assert v.returncode == 0, v.stdout


@pytest.mark.root
def test_a_full_runs_disk_stops_the_run_cleanly(tmp_path: Path, backend: str) -> None:
    """The agent fills the disk holding the run folder: the kernel stops with one message, the
    agent does not outlive it, and what was recorded stays valid (incomplete, not corrupt)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs for the runs dir")
    runs = tmp_path / "runs"
    runs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(runs)], check=True)
    marker = "marker-" + uuid.uuid4().hex
    try:
        ws = make_workspace(tmp_path)
        (ws / "agent.py").write_text(CLIENT_PRELUDE + """
import time
for i in range(100):
    try:
        k.write(f"f{i}.bin", os.urandom(256 * 1024))
    except Exception as e:
        print("agent saw", type(e).__name__, flush=True)
        break
time.sleep(60)
""")
        from tests.kernel_helpers import kernel_cmd

        proc = kernel_cmd(["exec", "--workspace", str(ws), "--runs-dir", str(runs),
                           "--isolation", backend, "--", AGENT_PY, "agent.py", marker],
                          home=tmp_path / "home", timeout=60)
        assert proc.returncode not in (0, 1), proc.stderr
        assert "Traceback" not in proc.stderr
        assert "no space" in proc.stderr.lower(), proc.stderr
        assert [p for p in pids_with_marker(marker)] == []
        folders = list(runs.iterdir())
        assert len(folders) == 1
        v = kernel_cmd(["verify", str(folders[0]), "--trust",
                        str(tmp_path / "home" / "keys" / "kernel.pub")], home=tmp_path / "home")
        assert v.returncode == ExitCode.INCOMPLETE, v.stdout + v.stderr
    finally:
        for p in pids_with_marker(marker):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        subprocess.run(["umount", "-l", str(runs)], check=False)
