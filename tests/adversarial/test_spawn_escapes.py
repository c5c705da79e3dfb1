"""Agents that really try to break the replication contract of `spawn`, on both backends.

A spawn bomb, siblings racing for the last replica slots, forged and replayed manifests, and
the two ways a tree is ended from outside (`kernel kill`, the kernel SIGKILLed). Each test checks
the host (files in the workspace, the host's process table) and the run folders of the tree:
the children that exist, every spawn decision and the facts it was made on.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest

from kernel import killswitch
from kernel.corpus import pids_with_marker
from kernel.errors import ExitCode
from tests.kernel_helpers import BACKENDS, kernel_cmd, results, run_agent, skip_unless_available
from tests.spawn_helpers import (
    Folder,
    agent_files,
    assert_linked,
    assert_tree_intact,
    children,
    no_process_left,
    reap,
    root_of,
    spawn_policy,
    start_tree,
    tree,
    tree_verdict,
    wait_for,
)

pytestmark = [pytest.mark.sandbox, pytest.mark.adversarial]

PRELUDE = """
import json, os, sys, time
from spawnlib import Raw, call, connect, report, save, spawn, wait
from syscalls.client import SyscallError
k = connect()
"""


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    skip_unless_available(name)
    return name


def _all_spawn_decisions(folders: dict[str, Folder]) -> list[tuple[Folder, dict[str, Any]]]:
    return [(f, d) for f in folders.values() for d in f.decisions("spawn")]


# ---- the spawn bomb ----------------------------------------------------------------------------


def test_a_spawn_bomb_is_held_exactly_to_the_contract(tmp_path: Path, backend: str) -> None:
    """Every agent spawns copies of itself as fast as it is answered. The tree gets exactly
    max_spawns children, never more than max_replicas alive, none deeper than max_depth, no
    parent twice within its cooldown; each limit is reached and each refusal recorded."""
    max_depth, max_replicas, max_spawns, cooldown = 3, 3, 6, 2
    marker = "spawn-bomb-" + uuid.uuid4().hex
    policy = spawn_policy(tmp_path, max_depth=max_depth, max_replicas=max_replicas,
                          max_spawns=max_spawns, cooldown_seconds=cooldown)
    try:
        run = run_agent(tmp_path, (Path(__file__).parent / "agents" / "spawn_bomb.py")
                        .read_text(), backend=backend, policy=str(policy),
                        files=agent_files("spawn_bomb.py"),
                        argv=["/usr/bin/python3", "agent.py", marker], timeout=120)
        assert no_process_left(marker) == [], "a process of the bomb survived its tree"
    finally:
        reap(marker)
    assert run.out["status"] == "passed", (run.out, run.agent_output[-2000:])

    folders = tree(run.run_dir.parent)
    root = root_of(folders)
    # host side: exactly max_spawns child folders, none deeper than max_depth
    assert len(folders) == 1 + max_spawns, sorted(f.depth for f in folders.values())
    assert max(f.depth for f in folders.values()) == max_depth
    # every allowed decision in the tree: one per child folder, each within the contract
    decisions = _all_spawn_decisions(folders)
    allowed = [(f, d) for f, d in decisions if d["decision"] == "allowed"]
    assert sorted(d["child"] for _, d in allowed) == sorted(
        rid for rid in folders if rid != root.run_id)
    assert sorted(d["facts"]["spawns"] for _, d in allowed) == list(range(max_spawns))
    for f, d in allowed:
        assert d["facts"]["live"] < max_replicas, d["facts"]
        assert d["facts"]["parent_depth"] == f.depth < max_depth
    assert max(d["facts"]["live"] for _, d in allowed) + 1 == max_replicas  # reached, not passed
    # no parent spawned twice within its cooldown
    for f in folders.values():
        times = [d["now_ns"] for d in f.decisions("spawn") if d["decision"] == "allowed"]
        assert all(b - a >= cooldown * 1_000_000_000 for a, b in itertools.pairwise(times))
    # each refusal has the rule its recorded facts call for
    rules = {d["rule"] for _, d in decisions if d["decision"] == "denied"}
    assert rules == {"spawn.max_depth", "spawn.max_spawns", "spawn.max_replicas",
                     "spawn.cooldown"}, rules
    for f, d in decisions:
        if d["decision"] != "denied":
            continue
        facts = d["facts"]
        if d["rule"] == "spawn.max_depth":
            assert facts["parent_depth"] == max_depth == f.depth
        elif d["rule"] == "spawn.max_spawns":
            assert facts["spawns"] == max_spawns
        elif d["rule"] == "spawn.max_replicas":
            assert facts["live"] == max_replicas
        else:
            assert d["rule"] == "spawn.cooldown", d
            assert d["now_ns"] - facts["last_spawn_ns"] < cooldown * 1_000_000_000
    # the tree ended in order: every child sealed and reported to its parent
    for f in folders.values():
        assert f.status == "passed", (f.run_id, f.status)
        kids = children(folders, f.run_id)
        assert {x["child"] for x in f.of_type("spawn.exit")} == {c.run_id for c in kids}
    assert_linked(folders)
    assert_tree_intact(run.home, folders)


# ---- racing for the last slots -----------------------------------------------------------------


def test_twenty_siblings_racing_for_the_last_three_slots_get_exactly_three(
        tmp_path: Path, backend: str) -> None:
    """Twenty children hold 20 of 23 replica slots; released at the same instant, each asks for
    a child of its own. The kernel decides their requests one at a time against one ledger:
    exactly three are allowed, seventeen refused spawn.max_replicas."""
    n, free = 20, 3
    marker = "spawn-race-" + uuid.uuid4().hex
    policy = spawn_policy(tmp_path, max_depth=2, max_replicas=n + free, max_spawns=100)
    try:
        run = run_agent(tmp_path, PRELUDE + f"""
def count(prefix):
    return sum(1 for f in os.listdir(".") if f.startswith(prefix))
racers = [spawn(k, ["python3", "spawn_racer.py", {marker!r}, str(i)]) for i in range({n})]
report("racers", racers)
deadline = time.monotonic() + 90
while count("ready-") < {n} and time.monotonic() < deadline:
    time.sleep(0.01)
k.write("go", b"")
while count("raced-") < {n} and time.monotonic() < deadline:
    time.sleep(0.01)
k.write("done", b"")
report("ends", [wait(k, r["result"]["child"])["result"]["status"] for r in racers if r["ok"]])
""", backend=backend, policy=str(policy), files=agent_files("spawn_racer.py"), timeout=180)
        assert no_process_left(marker) == []
    finally:
        reap(marker)
    assert run.out["status"] == "passed", (run.out, run.agent_output[-2000:])
    r = results(run)
    assert all(x["ok"] for x in r["racers"]), r["racers"]
    raced = [json.loads((run.workspace / f"raced-{i}.json").read_text()) for i in range(n)]
    won = [x for x in raced if x["ok"]]
    lost = [x for x in raced if not x["ok"]]
    assert len(won) == free, raced
    assert {(x["rule"], x["errno"]) for x in lost} == {("spawn.max_replicas", errno.EAGAIN)}

    folders = tree(run.run_dir.parent)
    assert len(folders) == 1 + n + free
    racer_decisions = [d for f in folders.values() if f.depth == 1
                       for d in f.decisions("spawn")]
    assert len(racer_decisions) == n
    allowed = [d for d in racer_decisions if d["decision"] == "allowed"]
    # the three winners saw 20, 21 and 22 live children: each counted before the next decision
    assert sorted(d["facts"]["live"] for d in allowed) == [n, n + 1, n + 2]
    assert all(d["facts"]["live"] == n + free for d in racer_decisions
               if d["decision"] == "denied")
    grandchildren = [f for f in folders.values() if f.depth == 2]
    assert len(grandchildren) == free
    for g in grandchildren:  # ended with their racer parent
        assert g.status == "killed"
        assert [k["by"] for k in g.of_type("run.kill")] == ["parent_ended"]
    assert_linked(folders)
    assert_tree_intact(run.home, folders)


def test_pipelined_spawn_requests_get_exactly_the_free_slots(
        tmp_path: Path, backend: str) -> None:
    """One agent writes twenty spawn frames without reading an answer, then reads them all. The
    single-threaded kernel decides them in order against the ledger: three allowed (the free
    slots), seventeen refused, answers in request order."""
    n, free = 20, 3
    marker = "spawn-pipe-" + uuid.uuid4().hex
    policy = spawn_policy(tmp_path, max_depth=1, max_replicas=free, max_spawns=100)
    try:
        run = run_agent(tmp_path, f"""
from spawnlib import Raw, report
raw = Raw()
ids = [raw.send("spawn", {{"argv": ["python3", "-c", "import time; time.sleep(120)",
                                    {marker!r}]}})
       for _ in range({n})]
answers = [raw.recv() for _ in ids]
report("ids", ids)
report("answers", answers)
""", backend=backend, policy=str(policy), files=agent_files(), timeout=120)
        assert no_process_left(marker) == []
    finally:
        reap(marker)
    assert run.out["status"] == "passed", (run.out, run.agent_output[-2000:])
    r = results(run)
    assert [a["id"] for a in r["answers"]] == r["ids"]
    oks = [a["ok"] for a in r["answers"]]
    assert oks == [True] * free + [False] * (n - free)
    assert {(a["rule"], a["errno"]) for a in r["answers"] if not a["ok"]} == {
        ("spawn.max_replicas", errno.EAGAIN)}
    folders = tree(run.run_dir.parent)
    assert len(folders) == 1 + free
    decs = root_of(folders).decisions("spawn")
    assert len(decs) == n
    assert [d["facts"]["live"] for d in decs] == [0, 1, 2] + [free] * (n - free)
    for kid in children(folders, root_of(folders).run_id):
        assert kid.status == "killed"  # ended with the root, which did not wait for them
        assert [k["by"] for k in kid.of_type("run.kill")] == ["parent_ended"]
    assert_linked(folders)
    assert_tree_intact(run.home, folders)


def test_a_wide_tree_of_150_agents_runs_and_ends_cleanly(tmp_path: Path, backend: str) -> None:
    """The root starts 150 children that stay alive (each holds the kernel's descriptors for its
    channel, output and process), then ends: every child is ended with it, every folder sealed
    and linked, no process left."""
    n = 150
    marker = "spawn-wide-" + uuid.uuid4().hex
    policy = spawn_policy(tmp_path, max_depth=1, max_replicas=n, max_spawns=n,
                          quotas={"files_written": 10})
    try:
        run = run_agent(tmp_path, PRELUDE + f"""
got = [spawn(k, ["python3", "-c", "import time; time.sleep(120)", {marker!r}])
       for _ in range({n})]
report("spawned", sum(1 for r in got if r["ok"]))
report("refused", sorted({{r["rule"] for r in got if not r["ok"]}}))
report("live", k.info()["spawn"]["live"])
""", backend=backend, policy=str(policy), files=agent_files(), timeout=300)
        assert no_process_left(marker, timeout=30) == []
    finally:
        reap(marker)
    assert run.out["status"] == "passed", (run.out, run.agent_output[-2000:])
    r = results(run)
    assert (r["spawned"], r["refused"], r["live"]) == (n, [], n)
    folders = tree(run.run_dir.parent)
    assert len(folders) == n + 1
    for f in folders.values():
        if f.lineage is not None:
            assert f.status == "killed" and f.of_type("run.kill")[0]["by"] == "parent_ended"
    assert_linked(folders)
    assert_tree_intact(run.home, folders)


# ---- manifests ---------------------------------------------------------------------------------


def test_a_tampered_manifest_is_refused_and_the_child_can_do_nothing(
        tmp_path: Path, backend: str) -> None:
    canary = f"canary-{uuid.uuid4().hex}.txt"
    policy = spawn_policy(tmp_path, max_depth=2)
    run = run_agent(tmp_path, PRELUDE + f"""
c = spawn(k, ["python3", "spawn_tamper.py", {canary!r}])
report("spawn", c)
report("wait", wait(k, c["result"]["child"]))
""", backend=backend, policy=str(policy), files=agent_files("spawn_tamper.py"))
    assert run.proc.returncode == 0, run.agent_output
    assert not (run.workspace / canary).exists(), "the forged child wrote into the workspace"
    r = results(run)
    folders = tree(run.run_dir.parent)
    assert len(folders) == 2  # the forged child spawned nothing
    kid = folders[r["spawn"]["result"]["child"]]
    regs = kid.decisions("register")
    assert [(d["decision"], d["rule"]) for d in regs] == [
        ("denied", "spawn.manifest.malformed"),
        ("denied", "spawn.manifest.signature"),
        ("denied", "spawn.manifest.signature"),
    ]
    assert all(d["errno"] == errno.EPERM for d in regs)
    for call in ("write", "spawn", "info"):
        (d,) = kid.decisions(call)
        assert (d["decision"], d["rule"], d["errno"]) == ("denied", "spawn.unregistered",
                                                          errno.EPERM), (call, d)
    assert r["wait"]["result"]["denials"] == 6
    assert_linked(folders)
    assert_tree_intact(run.home, folders)


def test_a_siblings_used_manifest_is_refused_as_replayed(tmp_path: Path, backend: str) -> None:
    canary = f"canary-{uuid.uuid4().hex}.txt"
    policy = spawn_policy(tmp_path, max_depth=1)
    run = run_agent(tmp_path, PRELUDE + f"""
a = spawn(k, ["python3", "spawn_replay.py", "leak"])
report("a", wait(k, a["result"]["child"]))
b = spawn(k, ["python3", "spawn_replay.py", "replay", {canary!r}])
report("b", b)
report("b_end", wait(k, b["result"]["child"]))
""", backend=backend, policy=str(policy), files=agent_files("spawn_replay.py"))
    assert run.proc.returncode == 0, run.agent_output
    r = results(run)
    assert r["a"]["result"]["status"] == "passed"
    assert (run.workspace / "leaked-manifest.txt").exists()
    assert not (run.workspace / canary).exists()
    folders = tree(run.run_dir.parent)
    b = folders[r["b"]["result"]["child"]]
    (reg,) = b.decisions("register")
    assert (reg["decision"], reg["rule"], reg["errno"]) == ("denied", "spawn.manifest.replayed",
                                                            errno.EPERM)
    (w,) = b.decisions("write")
    assert (w["decision"], w["rule"]) == ("denied", "spawn.unregistered")
    assert_linked(folders)
    assert_tree_intact(run.home, folders)


# ---- what a child holds -------------------------------------------------------------------------


def test_a_child_holds_only_its_own_channel_and_nothing_it_starts_outlives_it(
        tmp_path: Path, backend: str) -> None:
    """A child, with a sibling alive beside it, holds no descriptor but its own channel (no
    other agent's channel answers it), has the root's environment plus its manifest, and a
    detached process it starts dies when it ends, while the rest of the tree lives on."""
    marker = "spawn-probe-" + uuid.uuid4().hex
    policy = spawn_policy(tmp_path, max_depth=1)
    root = f"""
import json, os, time
from spawnlib import connect, save, spawn, wait
k = connect()
save(k, "root-env.json", sorted(os.environ))
a = spawn(k, ["python3", "-c", "import time; time.sleep(120)", "{marker}-sibling"])
b = spawn(k, ["python3", "spawn_probe.py", "{marker}-probe"])
save(k, "b-done.json", wait(k, b["result"]["child"]))
deadline = time.monotonic() + 60
while not os.path.exists("host-checked") and time.monotonic() < deadline:
    time.sleep(0.02)
"""
    live = start_tree(tmp_path, backend=backend, policy=policy,
                      files=agent_files("spawn_probe.py", extra={"agent.py": root}),
                      argv=["/usr/bin/python3", "agent.py", marker])
    try:
        wait_for(lambda: (live.workspace / "b-done.json").exists(), "the probe's end", live)
        assert no_process_left(f"{marker}-probe") == [], "the child's detached process lived on"
        assert pids_with_marker(f"{marker}-sibling"), "the sibling should still be alive"
        assert live.proc.poll() is None
        (live.workspace / "host-checked").write_text("")
        assert live.proc.wait(60) == 0, live.out.read_text()[-2000:]
        assert no_process_left(marker) == []
    finally:
        live.stop()
        reap(marker)
    folders = live.folders()
    probe_id = json.loads((live.workspace / "b-done.json").read_text())["result"]["child"]
    probe = json.loads((live.workspace / f"probe-{probe_id}.json").read_text())
    channel = str(probe["channel"])
    sockets = sorted(fd for fd, target in probe["fds"].items() if target.startswith("socket:"))
    assert sockets == [channel], probe["fds"]
    assert probe["answers"] == {}
    others = {fd for fd, t in probe["fds"].items()
              if fd not in ("0", "1", "2", channel) and not t.startswith("unreadable")}
    assert others == set(), probe["fds"]  # nothing else inherited (the listing's own fd aside)
    root_env = set(json.loads((live.workspace / "root-env.json").read_text()))
    assert set(probe["env"]) == root_env | {"KERNEL_SPAWN_MANIFEST"}, (
        sorted(set(probe["env"]) ^ root_env))
    assert folders[probe_id].status == "passed"
    assert_linked(folders)
    assert_tree_intact(live.home, folders)


# ---- what spawn may reveal ---------------------------------------------------------------------


def test_spawn_is_no_oracle_for_host_files(tmp_path: Path, backend: str) -> None:
    """The sandbox hides the host's files outside its view (here a root-only directory beside
    the workspace). Naming such a file as a program must answer exactly as naming a file that
    does not exist: otherwise an agent learns which host files exist by asking for children.
    A visible file that is not executable is not a program either (`spawn.not_found`)."""
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    (hidden / "secret.txt").write_text("s")
    (hidden / "secret.txt").chmod(0o600)
    policy = spawn_policy(tmp_path, max_depth=1)
    run = run_agent(tmp_path, PRELUDE + f"""
for name, prog in [("exists", {str(hidden / "secret.txt")!r}),
                   ("missing", {str(hidden / "nothing.txt")!r}),
                   ("exists_rel", "../hidden/secret.txt"),
                   ("missing_rel", "../hidden/nothing.txt"),
                   ("not_executable", "/etc/passwd")]:
    r = spawn(k, [prog])
    report(name, {{"ok": r["ok"], "rule": r.get("rule"), "errno": r.get("errno")}})
""", backend=backend, policy=str(policy), files=agent_files())
    assert run.proc.returncode == 0, run.agent_output
    r = results(run)
    assert r["missing"] == r["missing_rel"] == {"ok": False, "rule": "spawn.not_found",
                                                "errno": errno.ENOENT}
    assert r["exists"] == r["missing"], f"spawn tells an existing hidden host file apart: {r}"
    assert r["exists_rel"] == r["missing_rel"], r
    assert r["not_executable"] == r["missing"], r
    assert list(tree(run.run_dir.parent)) == [run.out["run_id"]], "a child folder was made"


# ---- ending a tree from outside ----------------------------------------------------------------

LEVELS = 3  # the root and three generations below it


def _start_sleeping_tree(tmp_path: Path, backend: str, marker: str) -> Any:
    policy = spawn_policy(tmp_path, max_depth=LEVELS, max_replicas=LEVELS)
    live = start_tree(tmp_path, backend=backend, policy=policy,
                      files=agent_files("spawn_tree.py"),
                      argv=["/usr/bin/python3", "spawn_tree.py", marker, str(LEVELS)])
    wait_for(lambda: all((live.workspace / f"up-{d}").exists() for d in range(LEVELS + 1)),
             "the whole tree to be up", live)
    return live


def test_kernel_kill_ends_a_subtree_then_the_whole_tree(tmp_path: Path, backend: str) -> None:
    marker = "spawn-kill-" + uuid.uuid4().hex
    live = _start_sleeping_tree(tmp_path, backend, marker)
    try:
        folders = live.folders()
        assert len(folders) == LEVELS + 1
        by_depth = {f.depth: f for f in folders.values()}
        assert set(killswitch.live_runs(live.runs)) == set(folders)  # each holds a live mark
        # kill the subtree below the first generation: depths 2 and 3 end, 0 and 1 live on
        sub = f"{marker}-L1-L2"
        k = kernel_cmd(["kill", by_depth[2].run_id, "--runs-dir", str(live.runs), "--json"],
                       home=live.home)
        assert k.returncode == 0, k.stderr
        assert no_process_left(sub) == [], "a process of the killed subtree survived"
        assert pids_with_marker(f"{marker}-L1"), "the killed child's parent died with it"
        assert live.proc.poll() is None
        wait_for(lambda: by_depth[1].of_type("spawn.exit") != [], "the parent's spawn.exit",
                 live)
        for d in (2, 3):
            assert by_depth[d].status == "killed"
        # then the root: everything ends
        k = kernel_cmd(["kill", by_depth[0].run_id, "--runs-dir", str(live.runs), "--json"],
                       home=live.home)
        assert k.returncode == 0, k.stderr
        assert live.proc.wait(60) == ExitCode.KILLED
        assert no_process_left(marker) == [], "a process of the killed tree survived"
        assert killswitch.live_runs(live.runs) == {}
    finally:
        live.stop()
        reap(marker)
    folders = live.folders()
    by_depth = {f.depth: f for f in folders.values()}
    for d, f in by_depth.items():
        assert f.status == "killed", (d, f.status)
        kills = f.of_type("run.kill")
        assert len(kills) == 1, (d, kills)
        expected = {"kernel kill"} if d in (0, 2) else {"kernel kill", "parent_ended"}
        assert kills[0]["by"] in expected, (d, kills)
    (exit_2,) = by_depth[1].of_type("spawn.exit")
    assert exit_2["child"] == by_depth[2].run_id and exit_2["status"] == "killed"
    assert_linked(folders)
    assert_tree_intact(live.home, folders)


@pytest.mark.parametrize("how", ["kill --all", "SIGTERM"])
def test_kill_all_or_a_signal_ends_the_whole_tree_recorded(tmp_path: Path, backend: str,
                                                           how: str) -> None:
    """`kernel kill --all` (which finds a live mark for every agent of the tree) and SIGTERM to
    the kernel both end every agent: no process left, every folder sealed `killed` with its
    `run.kill`, the tree intact."""
    marker = "spawn-end-" + uuid.uuid4().hex
    live = _start_sleeping_tree(tmp_path, backend, marker)
    try:
        if how == "SIGTERM":
            live.proc.send_signal(signal.SIGTERM)
        else:
            k = kernel_cmd(["kill", "--all", "--runs-dir", str(live.runs), "--json"],
                           home=live.home)
            assert k.returncode == 0, k.stderr
        assert live.proc.wait(60) == ExitCode.KILLED
        assert no_process_left(marker) == [], "a process of the tree survived"
        assert killswitch.live_runs(live.runs) == {}
    finally:
        live.stop()
        reap(marker)
    folders = live.folders()
    assert len(folders) == LEVELS + 1
    for f in folders.values():
        assert f.status == "killed", (f.depth, f.status)
        assert len(f.of_type("run.kill")) == 1, (f.depth, f.of_type("run.kill"))
    assert_linked(folders)
    assert_tree_intact(live.home, folders)


def test_sigkill_of_the_kernel_leaves_no_process_of_the_tree(
        tmp_path: Path, backend: str) -> None:
    marker = "spawn-sigkill-" + uuid.uuid4().hex
    live = _start_sleeping_tree(tmp_path, backend, marker)
    try:
        assert len(pids_with_marker(f"{marker}-L1-L2-L3")) >= 1
        os.kill(live.proc.pid, signal.SIGKILL)
        live.proc.wait(30)
        assert no_process_left(marker) == [], "a process of the tree outlived the kernel"
    finally:
        live.stop()
        reap(marker)
    folders = live.folders()
    assert len(folders) == LEVELS + 1
    assert not any(f.sealed for f in folders.values())
    reports = tree_verdict(live.home, root_of(folders).path)
    root_id = root_of(folders).run_id
    assert reports[root_id]["exit"] == ExitCode.INCOMPLETE, reports[root_id]
    for f in folders.values():
        assert reports[f.run_id]["status"] == "incomplete", (f.depth, reports.get(f.run_id))
