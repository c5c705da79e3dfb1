"""The kernel SIGKILLed mid-run: the folder is incomplete (never corrupt), `kernel recover` seals
it as aborted, nothing the agent was told succeeded is lost, no workspace file is torn, and the
recovered run replays identically.

The agent writes numbered files and prints ``ACK <path>`` after each answer it gets (its stdout is
relayed by the kernel to a file the test reads afterwards). The kernel is killed either at an
injected failpoint around a durable step (``KERNEL_FAILPOINT``, kernel/failpoints.py) or at a
random moment.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from kernel.failpoints import POINTS
from tests.kernel_helpers import kernel_cmd, make_workspace, skip_unless_available, start_exec

N_WRITES = 60

AGENT = """
import sys
import tempfile
from syscalls.client import Kernel
k = Kernel.from_env()
for i in range({n}):
    path = f"out/f{{i:03d}}.txt"
    data = (f"file {{i}} " * (200 + i)).encode()
    if i == 0:
        k.mkdir("out")
    if i % 4 == 3:
        k.write(path, data[:100])
        k.append(path, data[100:])
    else:
        k.write(path, data)
    print("ACK " + path, flush=True)
print("DONE", flush=True)
"""


def expected_content(i: int) -> bytes:
    return (f"file {i} " * (200 + i)).encode()


def start_kernel(tmp_path: Path, env_extra: dict[str, str]) -> tuple[subprocess.Popen[bytes],
                                                                      Path, Path, Path]:
    ws = make_workspace(tmp_path, {"README.md": "crash test\n"})
    (ws / "agent.py").write_text(textwrap.dedent(AGENT.format(n=N_WRITES)))
    runs = tmp_path / "runs"
    out = tmp_path / "agent.out"
    proc = start_exec(ws, runs, tmp_path / "home", out, env_extra)
    return proc, ws, runs, out


def check_recovery(tmp_path: Path, ws: Path, runs: Path, out: Path) -> str:
    """Verify -> recover -> verify -> replay, and the acknowledged-writes promise."""
    home = tmp_path / "home"
    trust = ["--trust", str(home / "keys" / "kernel.pub")]
    acked = [line.split()[1] for line in out.read_text().splitlines()
             if line.startswith("ACK ")]
    folders = list(runs.iterdir()) if runs.exists() else []
    if not folders:
        assert not acked, "the agent was answered but no run folder exists"
        return "no-folder"
    (run_dir,) = folders
    v1 = kernel_cmd(["verify", str(run_dir), *trust, "--json"], home=home)
    first = json.loads(v1.stdout)
    assert first["status"] in ("incomplete", "intact"), first
    if first["status"] == "incomplete":
        assert v1.returncode == 6
        shown = kernel_cmd(["show", str(run_dir), *trust], home=home)
        assert shown.returncode == 0 and "(incomplete)" in shown.stdout.splitlines()[0]
        ended = run_dir.joinpath("log", "events.jsonl").read_bytes().rstrip(b"\n").rsplit(
            b"\n", 1)[-1].find(b'"type":"run.end"') >= 0
        assert ("status (not ended)" in shown.stdout) != ended
        r = kernel_cmd(["recover", str(run_dir), "--json"], home=home)
        assert r.returncode == 0, r.stderr
        v2 = json.loads(kernel_cmd(["verify", str(run_dir), *trust, "--json"],
                                   home=home).stdout)
        assert v2["status"] == "intact", v2
        assert v2["seal_status"] == "aborted", v2
    # Nothing the agent was told succeeded is lost: on disk and in the sealed record.
    events = [json.loads(line) for line in
              (run_dir / "log" / "events.jsonl").read_text().splitlines()]
    recorded_ok = {e["body"]["result"]["path"] for e in events
                   if e["type"] == "syscall.result" and e["body"].get("ok")}
    for path in acked:
        i = int(path[len("out/f"):-len(".txt")])
        assert (ws / path).read_bytes() == expected_content(i), path
        assert path in recorded_ok, path
    # No torn file: every file is the initial one, the agent, or a complete (or, for an
    # append cut between its two requests, a complete first-part) write; no temp file left.
    for p in ws.rglob("*"):
        assert not p.name.startswith(".kernel-tmp-"), p
        if p.is_file() and p.parent.name == "out":
            i = int(p.name[1:4])
            data = p.read_bytes()
            assert data in (expected_content(i), expected_content(i)[:100]), p
    rp = kernel_cmd(["replay", str(run_dir), *trust, "--json"], home=home)
    rep = json.loads(rp.stdout)
    if "snapshot.initial" not in {e["type"] for e in events}:
        # killed before the initial content was recorded (and so before the agent started)
        assert rp.returncode == 11, rep
        if not (run_dir / "initial" / "tree.json").exists():
            assert "no initial or final manifest" in rep["problem"], rep
            return first["status"]
        # the workspace is still the initial one, which replay then needs
        assert "not stored" in rep["problem"], rep
        rp = kernel_cmd(["replay", str(run_dir), *trust, "--json", "--workspace", str(ws)],
                        home=home)
        rep = json.loads(rp.stdout)
    assert rp.returncode == 0 and rep["status"] == "identical", rep
    return first["status"]


@pytest.fixture(autouse=True)
def _native() -> None:
    skip_unless_available("native")


@pytest.mark.parametrize(("point", "count"), [
    ("log.before_write", 1), ("log.before_write", 9), ("log.before_write", 17),
    ("log.after_write", 10), ("log.after_write", 20),
    ("log.after_sync", 11), ("log.after_sync", 22),
    ("ws.tmp_written", 4), ("ws.renamed", 7),
    ("ws.log_durable_applied", 5), ("ws.checkpoint.synced", 1), ("ws.checkpoint.synced", 3),
    ("answer.before_send", 5), ("answer.before_send", 9),
])
def test_kernel_killed_at_a_failpoint_is_recovered(tmp_path: Path, point: str,
                                                   count: int) -> None:
    assert point in POINTS
    proc, ws, runs, out = start_kernel(tmp_path, {"KERNEL_FAILPOINT": f"{point}:{count}"})
    rc = proc.wait(timeout=120)
    assert rc == -signal.SIGKILL, f"the failpoint {point}:{count} was never reached (exit {rc})"
    assert "DONE" not in out.read_text()
    assert check_recovery(tmp_path, ws, runs, out) == "incomplete"


def test_torn_workspace_temp_file_is_removed_and_kept(tmp_path: Path) -> None:
    proc, ws, runs, _ = start_kernel(tmp_path, {"KERNEL_FAILPOINT": "ws.tmp_written:3"})
    assert proc.wait(timeout=120) == -signal.SIGKILL
    strays = [p for p in ws.rglob(".kernel-tmp-*")]
    assert len(strays) == 1  # the complete, fsync'ed temp file of the write that was cut
    (run_dir,) = runs.iterdir()
    home = tmp_path / "home"
    r = kernel_cmd(["recover", str(run_dir), "--json"], home=home)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["stray_removed"] == [strays[0].relative_to(ws).as_posix()]
    assert len(rep["unfinished"]) == 1  # allowed, effect unknown until the final tree decides
    assert not strays[0].exists()
    again = kernel_cmd(["recover", str(run_dir)], home=home)
    assert again.returncode == 11 and "already sealed" in again.stderr


@pytest.mark.parametrize("seed", range(6))
def test_kernel_killed_at_a_random_moment_is_recovered(tmp_path: Path, seed: int) -> None:
    """The moment is random but always mid-run: once the agent has reported a random number of
    acknowledged writes (seed 0: while the kernel is still starting), plus a random delay of up
    to 3 ms, so the kill lands anywhere in the request/decision/effect/answer cycle."""
    rng = random.Random(seed)
    target = 0 if seed == 0 else rng.randrange(1, N_WRITES - 5)
    proc, ws, runs, out = start_kernel(tmp_path, {})
    if target == 0:
        time.sleep(rng.uniform(0.05, 0.2))
    else:
        deadline = time.monotonic() + 60
        while out.read_text().count("ACK ") < target:
            assert proc.poll() is None, "the run ended before the kill: nothing was tested"
            assert time.monotonic() < deadline
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.003))
    assert proc.poll() is None, "the run ended before the kill: nothing was tested"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    check_recovery(tmp_path, ws, runs, out)


EXEC_AGENT = """
from syscalls.client import Kernel
k = Kernel.from_env()
k.write("before.txt", b"x" * 1000)
print("ACK before.txt", flush=True)
r = k.exec(["python3", "-c",
            "[open(f'gen{i}.txt', 'w').write(str(i) * 5000) for i in range(6)]"])
print("EXEC", r.exit_code, flush=True)
"""


@pytest.mark.parametrize("point", ["ws.renamed:4", "log.after_write:12"])
def test_kernel_killed_while_applying_changes_captured_from_exec(tmp_path: Path,
                                                                point: str) -> None:
    """An exec's captured changes are applied one by one, each decided and recorded: a crash in
    the middle leaves some applied, none torn, the scratch copy removed by recovery."""
    ws = make_workspace(tmp_path, {"README.md": "x\n"})
    (ws / "agent.py").write_text(textwrap.dedent(EXEC_AGENT))
    home, runs = tmp_path / "home", tmp_path / "runs"
    rc = start_exec(ws, runs, home, tmp_path / "agent.out",
                    {"KERNEL_FAILPOINT": point}).wait(timeout=120)
    assert rc == -signal.SIGKILL
    (run_dir,) = runs.iterdir()
    run_id = run_dir.name
    r = kernel_cmd(["recover", str(run_dir), "--json"], home=home)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert any(run_id in s for s in rep["scratch_removed"]), rep
    assert not list(Path(tempfile.gettempdir()).glob(f"agent-kernel-{run_id}-*"))
    assert (ws / "before.txt").read_bytes() == b"x" * 1000
    made = sorted(p.name for p in ws.glob("gen*.txt"))
    assert 0 < len(made) < 6, made
    for p in ws.glob("gen*.txt"):
        i = int(p.name[3])
        assert p.read_text() == str(i) * 5000  # applied whole, or not at all
    trust = ["--trust", str(home / "keys" / "kernel.pub")]
    v = json.loads(kernel_cmd(["verify", str(run_dir), *trust, "--json"], home=home).stdout)
    assert v["status"] == "intact" and v["seal_status"] == "aborted"
    rp = kernel_cmd(["replay", str(run_dir), *trust, "--json"], home=home)
    assert rp.returncode == 0, rp.stdout


# --- the durable steps of exec, approval and seal -------------------------------------------------


@pytest.mark.parametrize("point", ["seal.before_publish", "seal.published"])
def test_kernel_killed_while_sealing_is_recovered(tmp_path: Path, point: str) -> None:
    """Killed after run.end is durable: before SEAL.json exists (the folder is incomplete and
    `recover` seals it) or after it is durable but before the folder is read-only (intact)."""
    proc, ws, runs, out = start_kernel(tmp_path, {"KERNEL_FAILPOINT": f"{point}:1"})
    assert proc.wait(timeout=120) == -signal.SIGKILL
    assert "DONE" in out.read_text()  # the agent had finished: every write was acknowledged
    (run_dir,) = runs.iterdir()
    assert (run_dir / "SEAL.json").exists() == (point == "seal.published")
    home = tmp_path / "home"
    trust = ["--trust", str(home / "keys" / "kernel.pub")]
    v1 = json.loads(kernel_cmd(["verify", str(run_dir), *trust, "--json"], home=home).stdout)
    if point == "seal.before_publish":
        assert v1["status"] == "incomplete", v1
        # run.end was durable: recovery seals the folder with the status the run ended with
        r = kernel_cmd(["recover", str(run_dir), "--json"], home=home)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["status"] == "passed"
    v2 = json.loads(kernel_cmd(["verify", str(run_dir), *trust, "--json"], home=home).stdout)
    assert v2["status"] == "intact" and v2["seal_status"] == "passed", v2
    for i in range(N_WRITES):
        assert (ws / f"out/f{i:03d}.txt").read_bytes() == expected_content(i)
    rp = kernel_cmd(["replay", str(run_dir), *trust, "--json"], home=home)
    assert rp.returncode == 0, rp.stdout


@pytest.mark.parametrize("point", ["exec.copied", "exec.captured"])
def test_kernel_killed_around_an_exec_applies_nothing_of_it(tmp_path: Path, point: str) -> None:
    """Killed once the private copy exists (before the command) or once the command's changes
    are captured (before any is applied): none of them reaches the workspace, the copy is removed
    by recovery, the write acknowledged before stays."""
    ws = make_workspace(tmp_path, {"README.md": "x\n"})
    (ws / "agent.py").write_text(textwrap.dedent(EXEC_AGENT))
    home, runs = tmp_path / "home", tmp_path / "runs"
    out = tmp_path / "agent.out"
    rc = start_exec(ws, runs, home, out, {"KERNEL_FAILPOINT": f"{point}:1"}).wait(timeout=120)
    assert rc == -signal.SIGKILL
    assert "EXEC" not in out.read_text()
    (run_dir,) = runs.iterdir()
    run_id = run_dir.name
    r = kernel_cmd(["recover", str(run_dir), "--json"], home=home)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert any(run_id in s for s in rep["scratch_removed"]), rep
    assert not list(Path(tempfile.gettempdir()).glob(f"agent-kernel-{run_id}-*"))
    assert (ws / "before.txt").read_bytes() == b"x" * 1000
    assert not list(ws.glob("gen*.txt"))
    trust = ["--trust", str(home / "keys" / "kernel.pub")]
    v = json.loads(kernel_cmd(["verify", str(run_dir), *trust, "--json"], home=home).stdout)
    assert v["status"] == "intact" and v["seal_status"] == "aborted"
    rp = kernel_cmd(["replay", str(run_dir), *trust, "--json"], home=home)
    assert rp.returncode == 0, rp.stdout


@pytest.mark.parametrize("point", ["approval.requested", "approval.received"])
def test_kernel_killed_during_an_approval_is_recovered(tmp_path: Path, point: str) -> None:
    """Killed once the request for approval is durable (before the mailbox row) or once a valid
    approval is recorded (before the final decision): the protected write is not applied, the
    folder recovers to intact/aborted and replays."""
    from tests.approval_helpers import WRITE_ENV_AGENT, new_reviewer, policy_text, start_run

    home = tmp_path / "home"
    pub = new_reviewer(home, "alice")
    ring = home / "reviewers.toml"
    ring.write_text(f'[[reviewers]]\nname = "alice"\npublic_key = "{pub}"\n')
    run = start_run(tmp_path, WRITE_ENV_AGENT, policy_text(keyring=str(ring)), home=home,
                    env_extra={"KERNEL_FAILPOINT": f"{point}:1"})
    if point == "approval.received":
        (row,) = run.wait_pending()
        r = run.kernel(["approve", row["id"], "--reason", "ok"])
        assert r.returncode == 0, r.stderr
    assert run.proc.wait(timeout=120) == -signal.SIGKILL
    run.proc.communicate()
    assert (run.workspace / ".env").read_text() == "TOKEN=old\n"
    (run_dir,) = run.runs.iterdir()
    types = [json.loads(line)["type"] for line in
             (run_dir / "log" / "events.jsonl").read_text().splitlines()]
    assert types[-1] == point  # the last durable record is the step the kill followed
    r = kernel_cmd(["recover", str(run_dir), "--json"], home=home)
    assert r.returncode == 0, r.stderr
    trust = ["--trust", str(home / "keys" / "kernel.pub")]
    v = json.loads(kernel_cmd(["verify", str(run_dir), *trust, "--json"], home=home).stdout)
    assert v["status"] == "intact" and v["seal_status"] == "aborted", v
    rp = kernel_cmd(["replay", str(run_dir), *trust, "--json"], home=home)
    assert rp.returncode == 0, rp.stdout
    assert (run.workspace / ".env").read_text() == "TOKEN=old\n"
