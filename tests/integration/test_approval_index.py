"""The runs index and `kernel reconcile`: the folder wins over an edited index."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.approval_helpers import new_reviewer, policy_text, query, start_run
from tests.kernel_helpers import kernel_cmd, skip_unless_available

pytestmark = pytest.mark.sandbox

AGENT = """
import sys
from syscalls.client import Kernel, SyscallError
try:
    Kernel.from_env().write(".env", b"x\\n")
except SyscallError:
    sys.exit(3)
"""


@pytest.mark.root  # it tampers with a sealed (read-only) run folder, which only root may write
def test_runs_index_and_reconcile_after_index_tampering(tmp_path: Path) -> None:
    skip_unless_available("native")
    home = tmp_path / "home"
    pub = new_reviewer(home, "alice")
    ring = home / "reviewers.toml"
    ring.write_text(f'[[reviewers]]\nname = "alice"\npublic_key = "{pub}"\n')
    runs = tmp_path / "ws" / "runs"
    # run 1: denied at once (--approve deny), the agent exits 3: status failed
    first = start_run(tmp_path, AGENT, policy_text(keyring=str(ring)), home=home,
                      extra=["--approve", "deny"])
    out1 = first.finish()
    assert out1["status"] == "failed"
    # run 2, same runs dir: approved, passes
    shutil.rmtree(tmp_path / "ws" / "ws")
    (tmp_path / "ws").rename(tmp_path / "first")
    second = start_run(tmp_path, AGENT, policy_text(keyring=str(ring)), home=home)
    (row,) = second.wait_pending()
    assert second.kernel(["approve", row["id"]]).returncode == 0
    out2 = second.finish()
    assert out2["status"] == "passed"
    runs = second.runs
    shutil.move(str(tmp_path / "first" / "runs" / out1["run_id"]), str(runs / out1["run_id"]))
    db = runs.parent / "runs.control" / "control.db"

    listed = kernel_cmd(["runs", "--json", "--runs-dir", str(runs)], home=home)
    ids = [r["run_id"] for r in json.loads(listed.stdout)]
    assert ids == [out2["run_id"]]  # run 1 was indexed in the other control plane
    r = kernel_cmd(["reconcile", "--runs-dir", str(runs)], home=home)
    assert r.returncode == 0, r.stderr
    assert f"run {out1['run_id']}: missing from the index" in r.stdout
    assert f"approval {out1['run_id']}." in r.stdout
    clean = kernel_cmd(["reconcile", "--runs-dir", str(runs), "--json"], home=home)
    assert json.loads(clean.stdout)["mismatches"] == [], clean.stdout

    # tamper with the index: a failed run said to pass, a decision flipped, a row removed,
    # a run that never existed
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("update runs set status = 'passed', exit_code = 0 where run_id = ?",
                     (out1["run_id"],))
        conn.execute("update approvals set state = 'approved' where run_id = ?",
                     (out1["run_id"],))
        conn.execute("delete from approvals where run_id = ?", (out2["run_id"],))
        conn.execute("insert into runs (run_id, status) values ('20990101T000000Z-ffffffff', "
                     "'passed')")
    conn.close()
    r = kernel_cmd(["reconcile", "--runs-dir", str(runs)], home=home)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert (f"run {out1['run_id']}: status: index says 'passed', folder says 'failed' "
            "(corrected)") in text
    assert f"run {out1['run_id']}: exit_code: index says 0, folder says 3" in text
    assert "state: index says 'approved', folder says 'denied'" in text
    assert f"approval {row['id']}: missing from the index (added)" in text
    assert "run 20990101T000000Z-ffffffff: in the index but its folder is gone" in text
    got = {x["run_id"]: x for x in query(db, "select * from runs")}
    assert got[out1["run_id"]]["status"] == "failed" and got[out1["run_id"]]["exit_code"] == 3
    assert "20990101T000000Z-ffffffff" not in got
    assert query(db, "select state from approvals where id = ?", (row["id"],)) == \
        [{"state": "approved"}]
    again = kernel_cmd(["reconcile", "--runs-dir", str(runs), "--json"], home=home)
    assert json.loads(again.stdout)["mismatches"] == []

    show = kernel_cmd(["runs", "show", out2["run_id"], "--runs-dir", str(runs)], home=home)
    assert "passed" in show.stdout and row["id"] in show.stdout

    # a folder edited after sealing is indexed as corrupt
    log = runs / out2["run_id"] / "log" / "events.jsonl"
    log.chmod(0o644)
    data = bytearray(log.read_bytes())
    data[10] ^= 1
    log.write_bytes(bytes(data))
    r = kernel_cmd(["reconcile", "--runs-dir", str(runs)], home=home)
    assert f"run {out2['run_id']}: status: index says 'passed', folder says 'corrupt'" in r.stdout
