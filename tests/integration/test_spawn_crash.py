"""The kernel SIGKILLed at each durable step of `spawn` (kernel/failpoints.py): no process of
the tree survives, every folder is incomplete (never corrupt), and `kernel recover` of the root
seals the whole tree so that it verifies intact, with nothing the agents were told lost.

The root writes a file, spawns a child that writes a file, and waits for it; it prints
``ACK <step>`` after each answer it gets (relayed by the kernel to a file the test reads).
"""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import pytest

from kernel.errors import ExitCode
from kernel.failpoints import POINTS
from tests.kernel_helpers import BACKENDS, kernel_cmd, skip_unless_available
from tests.spawn_helpers import (
    agent_files,
    assert_linked,
    assert_tree_intact,
    no_process_left,
    reap,
    root_of,
    spawn_policy,
    start_tree,
    tree,
    tree_verdict,
)

pytestmark = [pytest.mark.sandbox]

ROOT_AGENT = """
import sys
from spawnlib import connect, spawn, wait
k = connect()
k.write("before.txt", b"root")
print("ACK before", flush=True)
c = spawn(k, ["python3", "child.py", sys.argv[1] + "-child"])
print("ACK spawn " + c["result"]["child"], flush=True)
w = wait(k, c["result"]["child"])
print("ACK wait " + w["result"]["status"], flush=True)
"""

CHILD_AGENT = """
from spawnlib import connect
k = connect()
k.write("child.txt", b"child")
print("ACK child", flush=True)
"""

SPAWN_POINTS = ("spawn.decided", "spawn.child_created", "spawn.started", "spawn.exit.before")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    skip_unless_available(name)
    return name


@pytest.mark.parametrize("point", SPAWN_POINTS)
def test_kernel_killed_at_a_spawn_failpoint_is_recovered(tmp_path: Path, backend: str,
                                                         point: str) -> None:
    assert point in POINTS
    marker = "spawn-crash-" + uuid.uuid4().hex
    policy = spawn_policy(tmp_path, max_depth=1)
    live = start_tree(tmp_path, backend=backend, policy=policy,
                      files=agent_files(extra={"agent.py": ROOT_AGENT, "child.py": CHILD_AGENT}),
                      argv=["/usr/bin/python3", "agent.py", marker],
                      env={"KERNEL_FAILPOINT": f"{point}:1"})
    try:
        rc = live.proc.wait(120)
        assert rc == -signal.SIGKILL, (f"the failpoint {point} was never reached (exit {rc})\n"
                                       + live.out.read_text()[-2000:])
        assert no_process_left(marker) == [], "a process of the tree outlived the kernel"
    finally:
        live.stop()
        reap(marker)
    acked = [line.split(" ", 2)[1:] for line in live.out.read_text().splitlines()
             if line.startswith("ACK ")]
    assert ["wait"] not in [a[:1] for a in acked]

    folders = tree(live.runs)
    root = root_of(folders)
    kids = [f for f in folders.values() if f.lineage is not None]
    ((_, dec, res),) = root.calls("spawn")
    assert dec is not None and dec["decision"] == "allowed"
    if point == "spawn.decided":
        assert kids == []  # decided and durable; the child's folder was never made
    else:
        (kid,) = kids
        assert kid.run_id == dec["child"]
    if point == "spawn.exit.before":
        assert kid.sealed and kid.status == "passed"
        assert (live.workspace / "child.txt").read_bytes() == b"child"
        assert root.of_type("spawn.exit") == []
    else:
        assert not any(f.sealed for f in folders.values())
    if point in ("spawn.decided", "spawn.child_created"):
        assert res is None  # the child never ran: no result
    if point in ("spawn.decided", "spawn.child_created", "spawn.started"):
        assert not any(a[0] == "spawn" for a in acked)  # the parent was never answered
    # before recovery: incomplete, not corrupt
    reports = tree_verdict(live.home, root.path)
    assert reports[root.run_id]["exit"] == ExitCode.INCOMPLETE, reports[root.run_id]
    assert reports[root.run_id]["status"] == "incomplete"
    for r in reports.values():
        assert r["status"] in ("incomplete", "intact"), r

    rec = kernel_cmd(["recover", str(root.path), "--json"], home=live.home)
    assert rec.returncode == 0, rec.stdout + rec.stderr
    folders = tree(live.runs)
    for f in folders.values():
        assert f.sealed, f"recover left {f.run_id} (depth {f.depth}) unsealed: {rec.stdout}"
    assert folders[root.run_id].status == "aborted"
    for kid in (f for f in folders.values() if f.lineage is not None):
        assert kid.status == ("passed" if point == "spawn.exit.before" else "aborted")
    assert_linked(folders)
    assert_tree_intact(live.home, folders)
    # nothing the agents were told is lost
    assert (live.workspace / "before.txt").read_bytes() == b"root"
    if any(a[0] == "spawn" for a in acked):
        assert res is not None and res["ok"] is True
    again = kernel_cmd(["recover", str(root.path)], home=live.home)
    assert again.returncode == ExitCode.BAD_INPUT and "already sealed" in again.stderr
