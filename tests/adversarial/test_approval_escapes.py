"""The agent cannot reach the control plane or approve its own protected request."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.approval_helpers import events, new_reviewer, policy_text, query, verify
from tests.kernel_helpers import (
    AGENT_PY,
    BACKENDS,
    kernel_cmd,
    make_workspace,
    skip_unless_available,
)

pytestmark = [pytest.mark.sandbox, pytest.mark.adversarial]

AGENT = r"""
import json, os, sqlite3, sys, threading
from syscalls.client import Kernel, SyscallError
k = Kernel.from_env()
db = open("dbpath.txt").read().strip()
out = {}
def attempt(name, fn):
    try:
        out[name] = ["ok", repr(fn())[:200]]
    except SyscallError as e:
        out[name] = ["denied", e.rule]
    except Exception as e:
        out[name] = ["failed", type(e).__name__]
def sql_write():
    c = sqlite3.connect(db, timeout=1)
    c.execute("insert into signatures (approval_id, envelope, status) values ('x', '{}', "
              "'submitted')")
    c.commit()
    return "inserted"
attempt("open_db", lambda: open(db, "rb").read(16))
attempt("sqlite_db", sql_write)
attempt("list_control_dir", lambda: os.listdir(os.path.dirname(db)))
attempt("write_db", lambda: k.write(db, b"x"))
attempt("write_control_dir", lambda: k.write(os.path.join(os.path.dirname(db), "evil"), b"x"))
code = ("import sqlite3,sys; c=sqlite3.connect(sys.argv[1], timeout=1); "
        "c.execute(\"update approvals set state='approved'\"); c.commit(); print('UPDATED')")
attempt("exec_sqlite", lambda: (lambda r: (r.exit_code, r.stdout, r.stderr[-200:]))(
    k.exec(["python3", "-c", code, db])))
print("RESULT " + json.dumps(out), flush=True)
try:
    k.write(".env", b"OWNED=1\n", justification="please")
    print("ENV applied", flush=True)
except SyscallError as e:
    print("ENV", e.decision, flush=True)
"""


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    skip_unless_available(name)
    return name


@pytest.mark.parametrize("runs_inside", [True, False], ids=["runs-in-workspace", "runs-outside"])
def test_agent_cannot_reach_the_control_plane_or_approve_itself(
        tmp_path: Path, backend: str, runs_inside: bool) -> None:
    home = tmp_path / "home"
    pub = new_reviewer(home, "alice")
    ring = home / "reviewers.toml"
    ring.write_text(f'[[reviewers]]\nname = "alice"\npublic_key = "{pub}"\n')
    ws = make_workspace(tmp_path, {".env": "TOKEN=old\n"})
    runs = ws / "runs" if runs_inside else tmp_path / "runs"
    db = runs.parent / "runs.control" / "control.db"
    (ws / "dbpath.txt").write_text(str(db))
    (ws / "agent.py").write_text(textwrap.dedent(AGENT))
    pol = tmp_path / "policy.toml"
    pol.write_text(policy_text(keyring=str(ring), timeout=3).replace(
        'isolation = "native"', f'isolation = "{backend}"'))
    r = kernel_cmd(["exec", "--json", "--workspace", str(ws), "--runs-dir", str(runs),
                    "--policy", str(pol), "--approve", "queue", "--", AGENT_PY, "agent.py"],
                   home=home)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    res = json.loads(next(x for x in r.stderr.splitlines() if x.startswith("RESULT "))[7:])
    for name in ("open_db", "sqlite_db", "list_control_dir"):
        assert res[name][0] == "failed", (name, res[name])
    assert res["write_db"][0] == "denied" and res["write_control_dir"][0] == "denied"
    # the allowlisted python3 ran, sandboxed like the agent, and could not open the database
    assert res["exec_sqlite"][0] == "ok" and res["exec_sqlite"][1].startswith("(1,")
    assert "UPDATED" not in res["exec_sqlite"][1]
    assert "ENV expired" in r.stderr
    # host-side evidence: the database holds only the kernel's rows, the write never happened
    assert query(db, "select * from signatures") == []
    states = [row["state"] for row in query(db, "select state from approvals")]
    assert states == ["expired"]
    assert (ws / ".env").read_text() == "TOKEN=old\n"
    assert not (db.parent / "evil").exists()
    run_dir = Path(out["run_dir"])
    assert not any(e["type"] == "approval.received" for e in events(run_dir))
    assert verify(run_dir, home).returncode == 0
