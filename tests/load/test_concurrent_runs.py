"""Load: many concurrent runs, each issuing thousands of syscalls (writes of every op, with an
``exec`` every ``LOAD_EXEC_EVERY`` calls), all at once on one host.

Every run must pass and verify intact; the recorded requests must match, call by call, what the
agent sent; every file the agent was told it wrote must hold exactly what it wrote; and nothing
may be left behind: no process of the agent uid, no exec scratch directory, no descriptor in the
test process. Sizes come from the environment (defaults: 32 runs x 2,000 syscalls, an exec every
100 calls); the test prints how long the whole load took.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from sandbox import registry
from tests.kernel_helpers import AGENT_PY, ROOT, kernel_cmd, make_workspace, skip_unless_available

RUNS = int(os.environ.get("LOAD_RUNS", "32"))
SYSCALLS = int(os.environ.get("LOAD_SYSCALLS", "2000"))
EXEC_EVERY = int(os.environ.get("LOAD_EXEC_EVERY", "100"))

AGENT = """
import json
from syscalls.client import Kernel
k = Kernel.from_env()
N, EVERY = {n}, {every}
sent = {{"write": 0, "exec": 0}}
final = {{}}
k.mkdir("load")
sent["write"] += 1
for i in range(1, N):
    if i % EVERY == 0:
        r = k.exec(["ls", "load"])
        assert r.exit_code == 0, r
        sent["exec"] += 1
        continue
    path = f"load/f{{i % 40:02d}}.txt"
    body = f"{{i}}:".encode() * (1 + i % 7)
    op = i % 5
    if op == 3 and path in final:
        k.append(path, b"+" + body)
        final[path] += b"+" + body
    elif op == 4 and path in final:
        k.delete(path)
        del final[path]
    else:
        k.write(path, body)
        final[path] = body
    sent["write"] += 1
print(json.dumps({{"sent": sent, "final": {{p: v.decode() for p, v in final.items()}}}}),
      flush=True)
"""


def _policy(tmp: Path) -> Path:
    text = (ROOT / "policies" / "default.toml").read_text()
    text = re.sub(r"(?m)^syscalls = \d+$", f"syscalls = {SYSCALLS + 10}", text)
    text = re.sub(r"(?m)^files_written = \d+$", f"files_written = {SYSCALLS * 2}", text)
    text = re.sub(r"(?m)^exec_count = \d+$", f"exec_count = {SYSCALLS}", text)
    p = tmp / "load.toml"
    p.write_text(text)
    return p


def _agent_procs(uid: int) -> list[int]:
    out = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                if os.stat(f"/proc/{e}").st_uid == uid:
                    out.append(int(e))
            except OSError:
                pass
    return out


@pytest.mark.sandbox
def test_concurrent_runs_lose_nothing_and_leak_nothing(tmp_path: Path) -> None:
    skip_unless_available("native")
    agent_uid = registry.backend("native").agent_ids()[0]
    fds_before = len(os.listdir("/proc/self/fd"))
    home = tmp_path / "home"
    kernel_cmd(["key"], home=home)  # create the key once, not 32 times at the same moment
    policy = _policy(tmp_path)
    procs = []
    t0 = time.monotonic()
    for n in range(RUNS):
        base = tmp_path / f"r{n:02d}"
        base.mkdir()
        ws = make_workspace(base, {"README.md": "load\n"})
        (ws / "agent.py").write_text(textwrap.dedent(AGENT.format(n=SYSCALLS,
                                                                   every=EXEC_EVERY)))
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "KERNEL_HOME": str(home),
               "LANG": "C.UTF-8"}
        p = subprocess.Popen(
            [sys.executable, "-m", "kernel._cli", "exec", "--json", "--workspace", str(ws),
             "--runs-dir", str(base / "runs"), "--isolation", "native", "--policy",
             str(policy), "--", AGENT_PY, "agent.py"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        procs.append((p, ws, base / "runs"))
    results = []
    for p, ws, runs in procs:
        out, err = p.communicate(timeout=1200)
        results.append((p.returncode, out, err, ws, runs))
    elapsed = time.monotonic() - t0
    print(f"\nload: {RUNS} concurrent runs x {SYSCALLS} syscalls (exec every {EXEC_EVERY}) "
          f"in {elapsed:.1f} s")
    trust = ["--trust", str(home / "keys" / "kernel.pub")]
    total = 0
    run_ids: list[str] = []
    for rc, out, err, ws, runs in results:
        assert rc == 0, err[-3000:]
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["status"] == "passed", summary
        agent = next(json.loads(line) for line in err.splitlines() if line.startswith('{"sent"'))
        (run_dir,) = runs.iterdir()
        run_ids.append(run_dir.name)
        v = kernel_cmd(["verify", str(run_dir), *trust, "--json"], home=home)
        assert v.returncode == 0 and json.loads(v.stdout)["status"] == "intact", v.stdout
        events = [json.loads(line) for line in
                  (run_dir / "log" / "events.jsonl").read_text().splitlines()]
        requests = [e["body"] for e in events if e["type"] == "syscall.request"]
        calls = {c: sum(r["call"] == c for r in requests) for c in ("write", "exec")}
        assert calls == agent["sent"], (calls, agent["sent"])
        assert len(requests) == SYSCALLS
        results_ok = sum(1 for e in events if e["type"] == "syscall.result"
                         and e["body"].get("ok") and "captured_from" not in e["body"])
        assert results_ok == SYSCALLS
        total += len(requests)
        on_disk = {p.relative_to(ws).as_posix(): p.read_text()
                   for p in (ws / "load").iterdir()}
        assert on_disk == agent["final"]
    assert total == RUNS * SYSCALLS
    # nothing leaked
    deadline = time.monotonic() + 10
    while _agent_procs(agent_uid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _agent_procs(agent_uid) == []
    for run_id in run_ids:  # every exec's private copy was removed
        assert not list(Path(tempfile.gettempdir()).glob(f"agent-kernel-{run_id}-*"))
    assert len(os.listdir("/proc/self/fd")) <= fds_before
