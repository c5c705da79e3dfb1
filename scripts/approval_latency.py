"""Approval round trip: request -> applied write, with a reviewer who acts at once.

Runs N real `kernel exec` runs (native sandbox) whose agent writes a protected file; a reviewer
process polls the control plane and runs `kernel approve` as soon as the request appears. The
agent measures its own `write` call (request sent to answer received: the write is applied and
recorded before the answer). Also shown: how much of that is the `kernel approve` command itself.

    .venv/bin/python scripts/approval_latency.py [N]
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AGENT = """
import time
from syscalls.client import Kernel
k = Kernel.from_env()
t = time.monotonic()
k.write(".env", b"TOKEN=new\\n")
print("ELAPSED", time.monotonic() - t, flush=True)
"""


def kernel(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kernel._cli", *args], cwd=ROOT, text=True,
                          capture_output=True,
                          env={"PATH": "/usr/bin:/bin", "KERNEL_HOME": str(home)})


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    tmp = Path(tempfile.mkdtemp(prefix="approval-latency-"))
    os.chmod(tmp, 0o755)  # noqa: S103 - the agent uid reads the workspaces
    home = tmp / "home"
    kernel(["keys", "new", "--reviewer", "alice"], home)
    pub = (home / "reviewers" / "alice.pub").read_text().strip()
    (home / "reviewers.toml").write_text(
        f'[[reviewers]]\nname = "alice"\npublic_key = "{pub}"\n')
    totals, approve_cmd = [], []
    for i in range(n):
        ws = tmp / f"ws{i}"
        ws.mkdir()
        (ws / ".env").write_text("TOKEN=old\n")
        (ws / "agent.py").write_text(AGENT)
        for p in (ws, ws / ".env", ws / "agent.py"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        runs = tmp / f"runs{i}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "kernel._cli", "exec", "--json", "--workspace", str(ws),
             "--runs-dir", str(runs), "--approve", "queue", "--", "/usr/bin/python3",
             "agent.py"], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin", "KERNEL_HOME": str(home)})
        db = tmp / f"runs{i}.control" / "control.db"
        ident = None
        while ident is None:
            try:
                conn = sqlite3.connect(db, timeout=5)
                row = conn.execute("select id from approvals where state = 'pending'").fetchone()
                conn.close()
                ident = row[0] if row else None
            except sqlite3.Error:
                pass
            if ident is None:
                time.sleep(0.005)
        t = time.monotonic()
        r = kernel(["approve", ident, "--runs-dir", str(runs)], home)
        approve_cmd.append(time.monotonic() - t)
        assert r.returncode == 0, r.stderr
        _, err = proc.communicate(timeout=120)
        totals.append(float(next(x for x in err.splitlines()
                                 if x.startswith("ELAPSED")).split()[1]))
    out = {"n": n, "round_trip_median_s": round(statistics.median(totals), 3),
           "round_trip_min_s": round(min(totals), 3), "round_trip_max_s": round(max(totals), 3),
           "approve_command_median_s": round(statistics.median(approve_cmd), 3)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
