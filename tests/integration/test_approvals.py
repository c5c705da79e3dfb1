"""Approvals end to end: a real `kernel exec` waits in the background on a real sandboxed agent
while other real processes (other uids too) decide through the real SQLite control plane."""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernel.errors import ExitCode
from tests.approval_helpers import (
    WRITE_ENV_AGENT,
    events,
    new_reviewer,
    policy_text,
    query,
    signed_envelope,
    start_run,
    types,
    verify,
)
from tests.kernel_helpers import BACKENDS, ROOT, kernel_cmd, open_up, skip_unless_available

pytestmark = pytest.mark.sandbox


@pytest.fixture(autouse=True)
def _native() -> None:
    skip_unless_available("native")


def keyring(home: Path, *names: str) -> Path:
    """Reviewer keys in ``home`` and a keyring file trusting them."""
    ring = home / "reviewers.toml"
    text = ""
    for n in names:
        pub = new_reviewer(home, n)
        text += f'[[reviewers]]\nname = "{n}"\npublic_key = "{pub}"\n'
    ring.write_text(text)
    return ring


def final_decision(run_dir: Path) -> dict[str, object]:
    finals = [e["body"] for e in events(run_dir) if e["type"] == "syscall.decision"
              and e["body"].get("approval_id")]
    assert len(finals) == 1
    return finals[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_waiting_run_is_approved_from_another_process_and_the_write_applies(
        tmp_path: Path, backend: str) -> None:
    skip_unless_available(backend)
    home = tmp_path / "home"
    ring = keyring(home, "alice")
    run = start_run(tmp_path, WRITE_ENV_AGENT, policy_text(keyring=str(ring)), home=home,
                    backend=backend)
    (row,) = run.wait_pending()
    assert (run.workspace / ".env").read_text() == "TOKEN=old\n"  # nothing applied yet
    shown = run.kernel(["approvals", "show", row["id"]])
    assert shown.returncode == 0, shown.stderr
    assert "-TOKEN=old" in shown.stdout and "+TOKEN=new" in shown.stdout
    assert "protected:.env*" in shown.stdout and "rotate the token" in shown.stdout
    listed = run.kernel(["approvals"])
    assert row["id"] in listed.stdout and "write .env" in listed.stdout
    r = run.kernel(["approve", row["id"], "--reason", "ok"])
    assert r.returncode == 0, r.stderr
    out = run.finish()
    assert out["status"] == "passed", run.stderr
    assert "RESULT applied" in run.stderr
    assert (run.workspace / ".env").read_text() == "TOKEN=new\n"
    run_dir = Path(out["run_dir"])
    t = types(run_dir)
    assert t.index("approval.requested") < t.index("approval.received") < \
        t.index("syscall.result")
    fd = final_decision(run_dir)
    assert fd["decision"] == "approved" and fd["approval_outcome"] == "approved"
    v = verify(run_dir, home)
    assert v.returncode == 0, v.stdout
    # the index agrees with the folder
    db = run.runs.parent / "runs.control" / "control.db"
    assert query(db, "select state from approvals")[0]["state"] == "approved"
    assert query(db, "select status from runs")[0]["status"] == "passed"
    again = run.kernel(["approve", row["id"]])
    assert again.returncode == ExitCode.APPROVAL_CLOSED and "already approved" in again.stderr


def test_a_denial_from_another_process_refuses_the_write(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ring = keyring(home, "alice")
    run = start_run(tmp_path, WRITE_ENV_AGENT, policy_text(keyring=str(ring)), home=home)
    (row,) = run.wait_pending()
    r = run.kernel(["deny", row["id"], "--reason", "not this token"])
    assert r.returncode == 0, r.stderr
    out = run.finish()
    assert "RESULT refused denied protected:.env*" in run.stderr
    assert "not this token" in run.stderr
    assert (run.workspace / ".env").read_text() == "TOKEN=old\n"
    fd = final_decision(Path(out["run_dir"]))
    assert fd["decision"] == "denied"
    assert verify(Path(out["run_dir"]), home).returncode == 0


def test_deny_needs_a_reason_and_unknown_ids_are_not_found(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ring = keyring(home, "alice")
    run = start_run(tmp_path, WRITE_ENV_AGENT, policy_text(keyring=str(ring), timeout=2),
                    home=home)
    (row,) = run.wait_pending()
    r = run.kernel(["deny", row["id"]])
    assert r.returncode == ExitCode.USAGE and "--reason" in r.stderr
    r = run.kernel(["approve", "no-such-run.7"])
    assert r.returncode == ExitCode.NOT_FOUND and "no approval request" in r.stderr
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key")
    garbage.chmod(0o600)
    r = run.kernel(["approve", row["id"], "--key", str(garbage)])
    assert r.returncode == ExitCode.BAD_KEY and "not a PEM private key" in r.stderr
    loose = tmp_path / "loose.key"
    loose.write_bytes((home / "reviewers" / "alice.key").read_bytes())
    loose.chmod(0o644)
    r = run.kernel(["approve", row["id"], "--key", str(loose)])
    assert r.returncode == ExitCode.BAD_KEY and "readable by others" in r.stderr
    assert "Traceback" not in r.stderr
    out = run.finish()
    assert final_decision(Path(out["run_dir"]))["decision"] == "expired"


def test_expiry_is_a_recorded_denial(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ring = keyring(home, "alice")
    run = start_run(tmp_path, WRITE_ENV_AGENT, policy_text(keyring=str(ring), timeout=1),
                    home=home)
    (row,) = run.wait_pending()
    out = run.finish()
    assert "RESULT refused expired" in run.stderr
    assert (run.workspace / ".env").read_text() == "TOKEN=old\n"
    run_dir = Path(out["run_dir"])
    assert "approval.expired" in types(run_dir)
    assert final_decision(run_dir)["decision"] == "expired"
    assert verify(run_dir, home).returncode == 0
    late = run.kernel(["approve", row["id"]])
    assert late.returncode == ExitCode.APPROVAL_CLOSED, late.stderr
    assert "expired" in late.stderr


def test_approve_mode_deny_refuses_at_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ring = keyring(home, "alice")
    run = start_run(tmp_path, WRITE_ENV_AGENT, policy_text(keyring=str(ring)), home=home,
                    extra=["--approve", "deny"])
    out = run.finish()
    assert "RESULT refused denied" in run.stderr and "--approve deny" in run.stderr
    assert verify(Path(out["run_dir"]), home).returncode == 0


def test_without_trusted_reviewers_a_protected_write_is_refused_at_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run = start_run(tmp_path, WRITE_ENV_AGENT, policy_text(), home=home)
    out = run.finish(timeout=30)
    assert "RESULT refused denied" in run.stderr and "trusts 0 eligible" in run.stderr
    assert "approval.requested" not in types(Path(out["run_dir"]))


def test_concurrent_approve_and_deny_give_exactly_one_decision(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ring = keyring(home, "alice", "bob")
    for i in range(3):
        run = start_run(tmp_path, WRITE_ENV_AGENT, policy_text(keyring=str(ring)), home=home,
                        name=f"ws{i}")
        (row,) = run.wait_pending()
        base = [sys.executable, "-m", "kernel._cli"]
        env = {"PATH": "/usr/bin:/bin", "KERNEL_HOME": str(home)}
        args = [["approve", row["id"], "--key", str(home / "reviewers" / "alice.key")],
                ["deny", row["id"], "--reason", "race", "--key",
                 str(home / "reviewers" / "bob.key")]]
        procs = [subprocess.Popen([*base, *a, "--runs-dir", str(run.runs)], env=env, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for a in args]
        codes = [p.wait(60) for p in procs]
        assert sorted(codes) == [0, ExitCode.APPROVAL_CLOSED], [p.stderr for p in procs]
        out = run.finish()
        fd = final_decision(Path(out["run_dir"]))
        winner = "approved" if codes[0] == 0 else "denied"
        assert fd["decision"] == winner
        applied = (run.workspace / ".env").read_text() == "TOKEN=new\n"
        assert applied == (winner == "approved")
        db = run.runs.parent / "runs.control" / "control.db"
        assert len(query(db, "select * from signatures where status = 'submitted'")) == 1


def test_k_of_n_needs_distinct_keys(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ring = keyring(home, "alice", "bob", "carol")
    run = start_run(tmp_path, WRITE_ENV_AGENT, policy_text(keyring=str(ring), threshold=2),
                    home=home)
    (row,) = run.wait_pending()
    alice = str(home / "reviewers" / "alice.key")
    r1 = run.kernel(["approve", row["id"], "--key", alice])
    assert r1.returncode == 0 and "waiting for more approvals" in r1.stdout
    r2 = run.kernel(["approve", row["id"], "--key", alice])
    assert r2.returncode == ExitCode.APPROVAL_REFUSED and "already decided" in r2.stderr
    assert (run.workspace / ".env").read_text() == "TOKEN=old\n"
    r3 = run.kernel(["approve", row["id"], "--key", str(home / "reviewers" / "carol.key")])
    assert r3.returncode == 0 and "request is approved" in r3.stdout
    out = run.finish()
    assert (run.workspace / ".env").read_text() == "TOKEN=new\n"
    run_dir = Path(out["run_dir"])
    fd = final_decision(run_dir)
    assert fd["decision"] == "approved" and len(fd["approvals"]) == 2  # type: ignore[arg-type]
    assert types(run_dir).count("approval.rejected") == 1  # alice's second try, recorded
    assert verify(run_dir, home).returncode == 0


def test_forged_and_misbound_approvals_are_refused_live_and_recorded(tmp_path: Path) -> None:
    """Each bad envelope, submitted both through `kernel approve --envelope` and written into the
    database directly (bypassing the CLI), is refused; the run records every refusal and the
    write stays unapplied until a good approval arrives."""
    home = tmp_path / "home"
    ring = keyring(home, "alice")
    stranger_home = tmp_path / "stranger"
    new_reviewer(stranger_home, "mallory")
    agent = WRITE_ENV_AGENT.replace('k.write(".env"', 'k.write(".git/config", b"x\\n")\n    '
                                    'k.write(".env"')
    files = {".env": "TOKEN=old\n", ".git/HEAD": "ref: refs/heads/main\n"}
    other = start_run(tmp_path, agent, policy_text(keyring=str(ring)), home=home, name="other",
                      files=files)
    (orow,) = other.wait_pending()
    run = start_run(tmp_path, agent, policy_text(keyring=str(ring)), home=home, files=files)
    (row,) = run.wait_pending()
    b = json.loads(row["binding"])
    ob = json.loads(orow["binding"])
    alice = home / "reviewers" / "alice.key"
    good = signed_envelope(alice, b, reviewer_uid=0)
    flipped = json.loads(json.dumps(good))
    flipped["sig"] = ("0" if flipped["sig"][0] != "0" else "1") + flipped["sig"][1:]
    cases = {
        "signature does not verify": flipped,
        "wrong key": signed_envelope(stranger_home / "reviewers" / "mallory.key", b),
        "request_digest does not match": signed_envelope(
            alice, {**b, "request_digest": "sha256:" + "1" * 64}),
        "copied from another run": signed_envelope(alice, ob),
        "another expiry": signed_envelope(alice, {**b, "expires_ns": b["expires_ns"] + 10**12}),
        "malformed envelope": {"payload": good["payload"]},
    }
    db = run.runs.parent / "runs.control" / "control.db"
    for want, env in cases.items():
        f = tmp_path / "env.json"
        f.write_text(json.dumps(env))
        r = run.kernel(["approve", row["id"], "--envelope", str(f)])
        assert r.returncode == ExitCode.APPROVAL_REFUSED, (want, r.stderr)
        assert want.split()[0] in r.stderr, (want, r.stderr)
        # the same forgery written straight into the database
        conn = sqlite3.connect(db, timeout=30)
        with conn:
            conn.execute("insert into signatures (approval_id, envelope, public_key, reviewer, "
                         "decision, submitted_ns, submitted_uid, status, note) values "
                         "(?, ?, '', 'x', 'approve', 0, 0, 'submitted', '')",
                         (row["id"], json.dumps(env)))
        conn.close()
    time.sleep(0.5)
    assert not (run.workspace / ".git" / "config").exists()
    assert query(db, "select state from approvals where id = ?", (row["id"],))[0]["state"] \
        == "pending"
    # the other run's request is still its own; approve both properly
    assert run.kernel(["approve", row["id"]]).returncode == 0
    (row2,) = run.wait_pending()
    # the first request's envelope, reused for the second request of the same run
    f = tmp_path / "reuse.json"
    f.write_text(json.dumps(good))
    r = run.kernel(["approve", row2["id"], "--envelope", str(f)])
    assert r.returncode == ExitCode.APPROVAL_REFUSED and "does not match" in r.stderr
    assert run.kernel(["deny", row2["id"], "--reason", "enough"]).returncode == 0
    out = run.finish()
    run_dir = Path(out["run_dir"])
    rejected = [e["body"]["reason"] for e in events(run_dir) if e["type"] == "approval.rejected"]
    assert len(rejected) == 2 * len(cases) + 1, rejected
    assert (run.workspace / ".git" / "config").read_text() == "x\n"
    assert (run.workspace / ".env").read_text() == "TOKEN=old\n"
    assert verify(run_dir, home).returncode == 0
    assert other.kernel(["deny", orow["id"], "--reason", "done"]).returncode == 0
    other.finish()  # its first write denied, the agent stops there


def test_self_approval_is_refused_when_the_policy_forbids_it(tmp_path: Path) -> None:
    """The operator (same uid as `kernel exec`, or a key kept in the operator's own home) cannot
    approve; a reviewer on another account can, through the group-shared database."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the reviewer as another user")
    home = tmp_path / "home"
    ring = keyring(home, "opkey")
    rhome = tmp_path / "rhome"
    pub = new_reviewer(rhome, "rita")
    ring.write_text(ring.read_text() + f'[[reviewers]]\nname = "rita"\npublic_key = "{pub}"\n')
    run = start_run(tmp_path, WRITE_ENV_AGENT,
                    policy_text(keyring=str(ring), operator_may_approve=False), home=home)
    (row,) = run.wait_pending()
    r = run.kernel(["approve", row["id"]])
    assert r.returncode == ExitCode.APPROVAL_REFUSED and "self-approval" in r.stderr
    # share the control plane with a reviewers group, as docs/operating.md says
    uid = gid = 64123
    cdir = run.runs.parent / "runs.control"
    for p in (cdir, *cdir.iterdir()):
        os.chown(p, -1, gid)
    open_up(cdir)
    for p in rhome.rglob("*"):
        os.chown(p, uid, gid)
    os.chown(rhome, uid, gid)
    # the test interpreter may live under /root; the reviewer runs the system python3 on the
    # same sources and packages
    site = [p for p in sys.path if p.endswith("site-packages")]
    r = subprocess.run(["/usr/bin/python3", "-m", "kernel._cli", "approve", row["id"],
                        "--runs-dir", str(run.runs), "--reason", "reviewed"],
                       env={"PATH": "/usr/bin:/bin", "KERNEL_HOME": str(rhome),
                            "PYTHONPATH": ":".join([str(ROOT), *site])}, cwd="/",
                       user=uid, group=gid, extra_groups=[gid], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    out = run.finish()
    assert (run.workspace / ".env").read_text() == "TOKEN=new\n"
    run_dir = Path(out["run_dir"])
    rej = [e["body"]["reason"] for e in events(run_dir) if e["type"] == "approval.rejected"]
    assert len(rej) == 1 and "self-approval" in rej[0]
    got = [e["body"] for e in events(run_dir) if e["type"] == "approval.received"]
    assert got[0]["submitted_uid"] == uid and got[0]["reviewer"] == "rita"
    assert verify(run_dir, home).returncode == 0


def test_exec_needing_approval_shows_the_command_and_runs_once_approved(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ring = keyring(home, "alice")
    agent = """
from syscalls.client import Kernel
k = Kernel.from_env()
r = k.exec(["ls", "-a"], justification="look around")
print("RESULT", r.exit_code, r.stdout.decode().split(), flush=True)
"""
    run = start_run(tmp_path, agent, policy_text(keyring=str(ring), exec_approval=True),
                    home=home)
    (row,) = run.wait_pending()
    shown = run.kernel(["approvals", "show", row["id"]])
    assert '["ls", "-a"]' in shown.stdout and "/usr/bin/ls" in shown.stdout
    assert "PATH" in shown.stdout and "cwd:" in shown.stdout
    assert run.kernel(["approve", row["id"]]).returncode == 0
    out = run.finish()
    assert "RESULT 0" in run.stderr and ".env" in run.stderr
    assert verify(Path(out["run_dir"]), home).returncode == 0


def test_a_change_captured_from_exec_waits_for_approval_too(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ring = keyring(home, "alice")
    agent = """
from syscalls.client import Kernel
k = Kernel.from_env()
r = k.exec(["python3", "-c", "open('.env', 'w').write('FROM_EXEC=1\\\\n')"])
print("RESULT", r.exit_code, [(c["path"], c["decision"]) for c in r.changes], flush=True)
"""
    run = start_run(tmp_path, agent, policy_text(keyring=str(ring)), home=home)
    (row,) = run.wait_pending()
    assert row["summary"] == "write .env"
    assert json.loads(row["preview"])["action"]["captured"] is True
    assert run.kernel(["approve", row["id"]]).returncode == 0
    out = run.finish()
    assert "RESULT 0 [('.env', 'approved')]" in run.stderr
    assert (run.workspace / ".env").read_text() == "FROM_EXEC=1\n"
    assert verify(Path(out["run_dir"]), home).returncode == 0


def test_agent_output_is_relayed_and_limits_hold_while_it_waits(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ring = keyring(home, "alice")
    agent = """
import threading, time, sys
from syscalls.client import Kernel
def chatter():
    for i in range(1000):
        print("tick", i, flush=True)
        time.sleep(0.05)
threading.Thread(target=chatter, daemon=True).start()
Kernel.from_env().write(".env", b"x\\n")
"""
    pol = policy_text(keyring=str(ring)).replace("wall_seconds = 120", "wall_seconds = 3")
    run = start_run(tmp_path, agent, pol, home=home)
    run.wait_pending()
    out = run.finish()
    assert out["status"] == "limit" and out["breach"] == "wall_seconds"
    assert "tick 20" in run.stderr  # relayed while the request waited
    run_dir = Path(out["run_dir"])
    assert "approval.cancelled" in types(run_dir)
    assert (run.workspace / ".env").read_text() == "TOKEN=old\n"
    assert verify(run_dir, home).returncode == 0
    db = run.runs.parent / "runs.control" / "control.db"
    assert query(db, "select state from approvals")[0]["state"] == "cancelled"


def test_approval_round_trip_latency(tmp_path: Path) -> None:
    """Request to applied write with the reviewer acting at once; the median is printed."""
    home = tmp_path / "home"
    ring = keyring(home, "alice")
    samples = []
    for i in range(3):
        run = start_run(tmp_path, WRITE_ENV_AGENT, policy_text(keyring=str(ring)), home=home,
                        name=f"lat{i}")
        (row,) = run.wait_pending()
        assert run.kernel(["approve", row["id"]]).returncode == 0
        run.finish()
        line = next(x for x in run.stderr.splitlines() if x.startswith("RESULT applied"))
        samples.append(float(line.split()[2]))
    med = statistics.median(samples)
    sys.stderr.write(f"approval round trip (agent's view, reviewer acting at once): "
                     f"median {med:.3f} s of {samples}\n")
    assert med < 10


def test_bad_keyring_stops_the_run_before_it_starts(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ring = tmp_path / "ring.toml"
    ring.write_text('[[reviewers]]\nname = "x"\npublic_key = "nothex"\n')
    ws = tmp_path / "w"
    ws.mkdir()
    pol = tmp_path / "p.toml"
    pol.write_text(policy_text(keyring=str(ring)))
    r = kernel_cmd(["exec", "--policy", str(pol), "--workspace", str(ws), "--runs-dir",
                    str(tmp_path / "runs"), "--", "true"], home=home)
    assert r.returncode == ExitCode.BAD_KEY and "public_key" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_keys_new_list_export(tmp_path: Path) -> None:
    home = tmp_path / "home"
    pub = new_reviewer(home, "alice")
    key = home / "reviewers" / "alice.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (home / "reviewers").stat().st_mode & 0o777 == 0o700
    again = kernel_cmd(["keys", "new", "--reviewer", "alice"], home=home)
    assert again.returncode == ExitCode.BAD_KEY and "already exists" in again.stderr
    ls = kernel_cmd(["keys", "list", "--json"], home=home)
    assert json.loads(ls.stdout) == [{"name": "alice", "public_key": pub, "path": str(key)}]
    ex = kernel_cmd(["keys", "export", "alice"], home=home)
    assert ex.stdout == f'[[reviewers]]\nname = "alice"\npublic_key = "{pub}"\n'
    key.chmod(0o644)
    r = kernel_cmd(["approve", "x.1", "--key", str(key), "--runs-dir", str(tmp_path / "runs")],
                   home=home)
    assert r.returncode == ExitCode.NOT_FOUND  # no control plane yet: nothing to approve
    bad = kernel_cmd(["keys", "new", "--reviewer", "Bad Name"], home=home)
    assert bad.returncode == ExitCode.USAGE


def test_approvals_without_a_control_plane_is_not_found(tmp_path: Path) -> None:
    r = kernel_cmd(["approvals", "--runs-dir", str(tmp_path / "nowhere")],
                   home=tmp_path / "home")
    assert r.returncode == ExitCode.NOT_FOUND and "control-plane database" in r.stderr



def test_an_attempt_on_a_decided_request_is_refused_and_recorded_in_the_running_run(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    ring = keyring(home, "alice")
    agent = WRITE_ENV_AGENT + """
import os
for _ in range(600):  # keep the run going until the test says so
    if os.path.exists("done.marker"):
        break
    time.sleep(0.05)
"""
    run = start_run(tmp_path, agent, policy_text(keyring=str(ring)), home=home)
    (row,) = run.wait_pending()
    assert run.kernel(["approve", row["id"]]).returncode == 0
    for _ in range(200):
        if (run.workspace / ".env").read_text() == "TOKEN=new\n":
            break
        time.sleep(0.05)
    late = run.kernel(["deny", row["id"], "--reason", "too late"])
    assert late.returncode == ExitCode.APPROVAL_CLOSED and "already approved" in late.stderr
    (run.workspace / "done.marker").write_text("")
    out = run.finish()
    run_dir = Path(out["run_dir"])
    recorded = [e["body"] for e in events(run_dir) if e["type"] == "approval.late"]
    assert len(recorded) == 1 and recorded[0]["decision"] == "deny"
    assert "already approved" in recorded[0]["reason"]
    assert (run.workspace / ".env").read_text() == "TOKEN=new\n"
    assert verify(run_dir, home).returncode == 0
