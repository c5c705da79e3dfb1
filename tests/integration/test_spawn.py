"""`spawn` and `wait` with real agents in real sandboxes, on both backends.

A root agent started by `kernel exec` spawns children (each in its own sandbox, with its own
channel and run folder) under the `[spawn]` contract of its profile. Each test checks the
host-side evidence (files in the workspace, the host's process table) and what the folders of
the tree recorded, and that every folder verifies.
"""

from __future__ import annotations

import errno
import json
import uuid
from pathlib import Path

import pytest

from tests.kernel_helpers import BACKENDS, results, run_agent, skip_unless_available
from tests.spawn_helpers import (
    BUDGET_FIELDS,
    agent_files,
    assert_linked,
    assert_tree_intact,
    children,
    no_process_left,
    reap,
    root_of,
    spawn_policy,
    tree,
)

pytestmark = [pytest.mark.sandbox]

PRELUDE = """
import json, os, sys, time
from spawnlib import Raw, call, connect, report, save, spawn, wait
from syscalls.client import SyscallError
k = connect()
"""

DEFAULT_QUOTAS = {"syscalls": 10000, "bytes_written": 104857600, "files_written": 1000,
                  "exec_count": 100}


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    skip_unless_available(name)
    return name


def test_a_child_writes_through_the_kernel_and_its_parent_waits_for_it(
        tmp_path: Path, backend: str) -> None:
    policy = spawn_policy(tmp_path, max_depth=1)
    child = PRELUDE + """
k.write("from-child.txt", sys.argv[1].encode())
again = call(k, "register", {"manifest": os.environ["KERNEL_SPAWN_MANIFEST"]})
save(k, "child-info.json", {"info": k.info(), "again": again})
"""
    run = run_agent(tmp_path, PRELUDE + """
r = spawn(k, ["python3", "child.py", "written by the child"], budget={"files_written": 2},
          justification="test child")
report("spawn", r)
report("wait", wait(k, r["result"]["child"]))
report("info", k.info())
""", backend=backend, policy=str(policy), files=agent_files(extra={"child.py": child}))
    assert run.proc.returncode == 0, run.agent_output
    r = results(run)
    assert r["spawn"]["ok"], r["spawn"]
    sp = r["spawn"]["result"]
    child_id = sp["child"]
    assert sp["depth"] == 1
    assert set(sp["budget"]) == set(BUDGET_FIELDS)
    # asked: files_written 2; every other field: the parent's whole remainder
    assert sp["budget"]["files_written"] == 2
    assert sp["budget"]["bytes_written"] == DEFAULT_QUOTAS["bytes_written"]
    assert sp["budget"]["exec_count"] == DEFAULT_QUOTAS["exec_count"]
    assert DEFAULT_QUOTAS["syscalls"] - 2 <= sp["budget"]["syscalls"] <= DEFAULT_QUOTAS["syscalls"]
    assert sp["manifest_digest"].startswith("sha256:")

    # host side: the child's write reached the workspace through the kernel
    assert (run.workspace / "from-child.txt").read_text() == "written by the child"

    folders = tree(run.run_dir.parent)
    assert set(folders) == {run.out["run_id"], child_id}
    root, kid = root_of(folders), folders[child_id]
    assert root.run_id == run.out["run_id"]
    assert kid.lineage is not None
    assert kid.lineage["parent"] == root.run_id and kid.lineage["root"] == root.run_id
    assert kid.lineage["depth"] == 1
    assert kid.lineage["manifest_digest"] == sp["manifest_digest"]
    assert kid.status == "passed" and root.status == "passed"

    # wait answered with the child's final status and seal
    w = r["wait"]
    assert w["ok"], w
    assert w["result"]["child"] == child_id
    assert w["result"]["status"] == "passed" and w["result"]["exit_code"] == 0
    assert w["result"]["timed_out"] is False
    assert w["result"]["seal"] == kid.seal_digest
    kid_requests = kid.of_type("syscall.request")
    assert w["result"]["requests"] == len(kid_requests) and w["result"]["denials"] == 0

    # the child registered its manifest first, then wrote; its info shows its chain's remainder
    assert kid_requests[0]["call"] == "register"
    reg = kid.decisions("register")
    # the same token again on the registered channel: accepted again, nothing changes
    assert [(d["decision"], d["rule"]) for d in reg] == [("allowed", "spawn.register")] * 2
    for d in reg:
        assert d["facts"]["expect_child"] == child_id
        assert d["facts"]["manifest_digest"] == sp["manifest_digest"]
    saved = json.loads((run.workspace / "child-info.json").read_text())
    assert saved["again"]["ok"] and saved["again"]["result"]["child"] == child_id
    info = saved["info"]
    assert info["spawn"]["depth"] == 1 and info["spawn"]["parent"] == root.run_id
    assert info["spawn"]["root"] == root.run_id
    assert info["quotas"]["files_written"]["remaining"] == 1  # 2 granted, 1 spent

    # the parent's record: request, decision (with the tree facts), result, spawn.exit, wait
    ((req, dec, res),) = root.calls("spawn")
    assert req["args"]["argv"] == ["python3", "child.py", "written by the child"]
    assert dec is not None and dec["decision"] == "allowed" and dec["child"] == child_id
    assert dec["facts"]["kind"] == "spawn" and dec["facts"]["spawns"] == 0
    assert dec["facts"]["request"]["argv"] == req["args"]["argv"]
    assert dec["facts"]["request"]["resolved"].endswith("/python3")
    assert dec["budget"] == sp["budget"]
    assert res is not None and res["ok"] is True and res["child"] == child_id
    assert isinstance(res["pid"], int)
    (exit_rec,) = root.of_type("spawn.exit")
    assert exit_rec["child"] == child_id and exit_rec["status"] == "passed"
    assert exit_rec["seal"] == kid.seal_digest and exit_rec["exit_code"] == 0
    assert exit_rec["request_seq"] == dec["seq"] == kid.lineage["parent_decision_seq"]
    ((_, wdec, wres),) = root.calls("wait")
    assert wdec is not None and wdec["decision"] == "allowed" and wdec["rule"] == "wait"
    assert wres is not None and wres["status"] == "passed" and wres["seal"] == kid.seal_digest
    (root_end,) = root.of_type("run.end")
    assert root_end["spawns"] == 1
    (kid_end,) = kid.of_type("run.end")
    assert kid_end["lineage"] == {"parent": root.run_id, "root": root.run_id, "depth": 1}
    rinfo = r["info"]["spawn"]
    assert rinfo["children"] == [child_id] and rinfo["spawns"] == 1 and rinfo["live"] == 0
    assert rinfo["depth"] == 0 and rinfo["parent"] is None

    assert_linked(folders)
    assert_tree_intact(run.home, folders)


def test_budgets_are_handed_down_and_siblings_share_their_parents(
        tmp_path: Path, backend: str) -> None:
    """A child never exceeds the budget it was given; three siblings given "the rest" write as
    fast as they can, together, and the sum of what they wrote is exactly the parent's quota."""
    quota = 3000
    policy = spawn_policy(tmp_path, max_depth=2, max_replicas=4, quotas={"bytes_written": quota})
    greedy = PRELUDE + """
name, chunk = sys.argv[1], int(sys.argv[2])
if name == "a":
    # more than its own budget for a grandchild: refused
    rem = k.info()["quotas"]["bytes_written"]["remaining"]
    spawn(k, ["true"], budget={"bytes_written": rem + 1})
n = 0
while True:
    try:
        k.write(f"g-{name}-{n:03d}.bin", b"x" * chunk)
    except SyscallError:
        break
    n += 1
"""
    run = run_agent(tmp_path, PRELUDE + f"""
report("too_big", spawn(k, ["true"], budget={{"bytes_written": {quota + 1}}}))
a = spawn(k, ["python3", "greedy.py", "a", "300"], budget={{"bytes_written": 1000}})
report("a", a)
report("wait_a", wait(k, a["result"]["child"]))
kids = [spawn(k, ["python3", "greedy.py", n, "100"]) for n in "xyz"]
report("kids", kids)
report("waits", [wait(k, c["result"]["child"]) for c in kids])
try:
    k.write("root.bin", b"y")
    report("root_write", "allowed")
except SyscallError as e:
    report("root_write", e.rule)
""", backend=backend, policy=str(policy), files=agent_files(extra={"greedy.py": greedy}))
    assert run.proc.returncode == 0, run.agent_output
    r = results(run)
    assert r["too_big"]["ok"] is False and r["too_big"]["rule"] == "spawn.budget"
    assert r["too_big"]["errno"] == errno.EDQUOT
    assert r["a"]["ok"] and r["a"]["result"]["budget"]["bytes_written"] == 1000
    assert all(c["ok"] for c in r["kids"]), r["kids"]
    # each sibling was handed the whole remainder at its spawn: 3000 - 900 (a's three writes)
    # for the first; less for a later one if an earlier sibling had already written
    budgets = [c["result"]["budget"]["bytes_written"] for c in r["kids"]]
    assert budgets[0] == 2100 and budgets == sorted(budgets, reverse=True), budgets
    assert all(b % 100 == 0 and b > 0 for b in budgets), budgets
    assert r["root_write"] == "quota.bytes_written"

    sizes = {p.name: p.stat().st_size for p in run.workspace.glob("g-*.bin")}
    a_bytes = sum(v for k, v in sizes.items() if k.startswith("g-a-"))
    assert a_bytes == 900  # 3 x 300 fit in 1000, a 4th does not
    assert sum(sizes.values()) == quota, sizes  # the siblings together: exactly the remainder
    assert not (run.workspace / "root.bin").exists()

    folders = tree(run.run_dir.parent)
    root = root_of(folders)
    a_folder = folders[r["a"]["result"]["child"]]
    (grand,) = a_folder.decisions("spawn")
    assert grand["decision"] == "denied" and grand["rule"] == "spawn.budget"
    assert grand["facts"]["remainder"]["bytes_written"] == 1000
    for cid in [r["a"]["result"]["child"]] + [c["result"]["child"] for c in r["kids"]]:
        last = folders[cid].decisions("write")[-1]
        assert last["decision"] == "denied" and last["rule"] == "quota.bytes_written", last
    assert len(children(folders, root.run_id)) == 4
    assert_linked(folders)
    assert_tree_intact(run.home, folders)


def test_cooldown_denies_then_allows(tmp_path: Path, backend: str) -> None:
    policy = spawn_policy(tmp_path, max_depth=1, cooldown_seconds=1)
    run = run_agent(tmp_path, PRELUDE + """
t0 = time.monotonic()
report("first", spawn(k, ["true"]))
report("second", spawn(k, ["true"]))
while True:
    third = spawn(k, ["true"])
    if third["ok"] or third["rule"] != "spawn.cooldown":
        break
    time.sleep(0.1)
report("third", third)
report("elapsed", time.monotonic() - t0)
for c in (r for r in [third] if r["ok"]):
    wait(k, c["result"]["child"])
""", backend=backend, policy=str(policy), files=agent_files())
    assert run.proc.returncode == 0, run.agent_output
    r = results(run)
    assert r["first"]["ok"] and r["third"]["ok"], r
    assert r["second"]["ok"] is False and r["second"]["rule"] == "spawn.cooldown"
    assert r["second"]["errno"] == errno.EAGAIN
    assert r["elapsed"] >= 1.0
    root = root_of(tree(run.run_dir.parent))
    decs = root.decisions("spawn")
    allowed = [d for d in decs if d["decision"] == "allowed"]
    assert len(allowed) == 2
    assert allowed[1]["now_ns"] - allowed[0]["now_ns"] >= 1_000_000_000
    for d in decs[1:-1]:
        assert d["rule"] == "spawn.cooldown"
        assert d["facts"]["last_spawn_ns"] == allowed[0]["now_ns"]
    folders = tree(run.run_dir.parent)
    assert len(folders) == 3
    assert_linked(folders)
    assert_tree_intact(run.home, folders)


def test_expiry_kills_a_sleeping_child(tmp_path: Path, backend: str) -> None:
    marker = "spawn-expiry-" + uuid.uuid4().hex
    policy = spawn_policy(tmp_path, max_depth=1, expiration_seconds=1)
    try:
        run = run_agent(tmp_path, PRELUDE + f"""
c = spawn(k, ["python3", "-c", "import time; time.sleep(300)", {marker!r}])
report("spawn", c)
report("early", wait(k, c["result"]["child"], timeout_ms=100))
t = time.monotonic()
report("wait", wait(k, c["result"]["child"]))
report("waited", time.monotonic() - t)
""", backend=backend, policy=str(policy), files=agent_files(), timeout=60)
        assert run.proc.returncode == 0, run.agent_output
        assert no_process_left(marker) == [], "the expired child outlived its expiry"
    finally:
        reap(marker)
    r = results(run)
    early = r["early"]["result"]
    assert early["timed_out"] is True and early["status"] == "running" and early["seal"] is None
    w = r["wait"]["result"]
    assert w["status"] == "expired" and w["timed_out"] is False
    assert r["waited"] < 15
    folders = tree(run.run_dir.parent)
    kid = folders[r["spawn"]["result"]["child"]]
    assert kid.status == "expired"
    kills = kid.of_type("run.kill")
    assert len(kills) == 1 and kills[0]["by"] == "expiry"
    (exit_rec,) = root_of(folders).of_type("spawn.exit")
    assert exit_rec["status"] == "expired" and exit_rec["seal"] == kid.seal_digest
    assert_linked(folders)
    assert_tree_intact(run.home, folders)


def test_a_grandchild_hits_the_depth_limit(tmp_path: Path, backend: str) -> None:
    deep = PRELUDE + """
me = k.info()["spawn"]
r = spawn(k, ["python3", "deep.py"])
w = wait(k, r["result"]["child"]) if r["ok"] else None
save(k, f"depth-{me['depth']}.json", {"info": me, "spawn": r, "wait": w})
"""
    policy = spawn_policy(tmp_path, max_depth=2, max_replicas=4)
    root = deep + """
grandchild = json.load(open("depth-1.json"))["spawn"]["result"]["child"]
report("wait_grandchild", wait(k, grandchild))
"""
    run = run_agent(tmp_path, root, backend=backend, policy=str(policy),
                    files=agent_files(extra={"deep.py": deep}))
    assert run.proc.returncode == 0, run.agent_output
    got = {d: json.loads((run.workspace / f"depth-{d}.json").read_text()) for d in (0, 1, 2)}
    assert got[0]["spawn"]["ok"] and got[1]["spawn"]["ok"]
    assert got[0]["wait"]["result"]["status"] == "passed"
    assert got[2]["spawn"]["ok"] is False and got[2]["spawn"]["rule"] == "spawn.max_depth"
    assert got[2]["spawn"]["errno"] == errno.EPERM
    assert got[2]["info"]["max_depth"] == 2 and got[2]["info"]["depth"] == 2
    assert not (run.workspace / "depth-3.json").exists()
    # a grandchild is not the root's own child: it cannot wait for it
    wg = results(run)["wait_grandchild"]
    assert (wg["ok"], wg["rule"], wg["errno"]) == (False, "wait.not_child", errno.ENOENT)
    folders = tree(run.run_dir.parent)
    assert sorted(f.depth for f in folders.values()) == [0, 1, 2]
    (grandchild,) = [f for f in folders.values() if f.depth == 2]
    (denied,) = grandchild.decisions("spawn")
    assert denied["decision"] == "denied" and denied["rule"] == "spawn.max_depth"
    assert denied["facts"]["parent_depth"] == 2
    assert_linked(folders)
    assert_tree_intact(run.home, folders)


def test_a_stop_condition_stops_spawning_and_ends_the_tree(
        tmp_path: Path, backend: str) -> None:
    """`denials >= 3` with kill_tree: a child makes three denied requests; from then on no spawn
    is allowed anywhere in the tree, and the whole tree (the root included) is ended."""
    marker = "spawn-stop-" + uuid.uuid4().hex
    denier = PRELUDE + """
for i in range(3):
    try:
        k.write(f"../outside-{i}", b"x")
    except SyscallError:
        pass
spawn(k, ["true"])
time.sleep(300)
"""
    policy = spawn_policy(tmp_path, max_depth=2, stop=(("denials >= 3", True),))
    try:
        run = run_agent(tmp_path, PRELUDE + f"""
c = spawn(k, ["python3", "denier.py", {marker!r}])
report("spawn", c)
report("wait", wait(k, c["result"]["child"]))
spawn(k, ["true"])
time.sleep(300)
""", backend=backend, policy=str(policy), files=agent_files(extra={"denier.py": denier}),
            argv=["/usr/bin/python3", "agent.py", marker], timeout=60)
        assert no_process_left(marker) == [], "a process of the stopped tree survived"
    finally:
        reap(marker)
    assert run.out["status"] == "stopped", run.out
    folders = tree(run.run_dir.parent)
    root = root_of(folders)
    (stop,) = root.of_type("spawn.stop")
    assert stop["rule"] == "spawn.stop:denials>=3" and stop["kill_tree"] is True
    assert stop["totals"]["denials"] >= 3
    # every spawn decided once three denials were counted was refused by the condition
    all_spawns = [d for f in folders.values() for d in f.decisions("spawn")]
    for d in all_spawns:
        if d["facts"]["totals"]["denials"] >= 3:
            assert d["decision"] == "denied" and d["rule"] == "spawn.stop:denials>=3", d
    assert [d["decision"] for d in all_spawns].count("allowed") == 1
    assert len(folders) == 2
    kid = folders[results(run)["spawn"]["result"]["child"]]
    assert kid.status == "stopped" and root.status == "stopped"
    kills = kid.of_type("run.kill")
    assert len(kills) == 1 and kills[0]["by"] == "stop_condition"
    assert_linked(folders)
    assert_tree_intact(run.home, folders)


def test_a_stop_condition_without_kill_tree_only_stops_spawning(
        tmp_path: Path, backend: str) -> None:
    policy = spawn_policy(tmp_path, max_depth=1, stop=(("bytes_written > 100", False),))
    run = run_agent(tmp_path, PRELUDE + """
report("before", spawn(k, ["true"]))
k.write("big.bin", b"z" * 101)
report("after", spawn(k, ["true"]))
k.write("still.txt", b"the tree goes on")
report("info", k.info()["spawn"])
""", backend=backend, policy=str(policy), files=agent_files())
    assert run.proc.returncode == 0 and run.out["status"] == "passed", run.agent_output
    r = results(run)
    assert r["before"]["ok"]
    assert (r["after"]["ok"], r["after"]["rule"], r["after"]["errno"]) == (
        False, "spawn.stop:bytes_written>100", errno.EPERM)
    assert r["info"]["stopped"] == "spawn.stop:bytes_written>100"
    assert (run.workspace / "still.txt").read_text() == "the tree goes on"
    folders = tree(run.run_dir.parent)
    assert len(folders) == 2
    (stop,) = root_of(folders).of_type("spawn.stop")
    assert stop["rule"] == "spawn.stop:bytes_written>100" and stop["kill_tree"] is False
    assert stop["totals"]["bytes_written"] == 101
    assert_linked(folders)
    assert_tree_intact(run.home, folders)


def test_the_strict_profile_refuses_every_spawn(tmp_path: Path, backend: str) -> None:
    run = run_agent(tmp_path, PRELUDE + """
report("true", spawn(k, ["true"]))
report("python", spawn(k, ["python3", "-c", "pass"], budget={"syscalls": 1}))
report("ls", spawn(k, ["/bin/ls"], justification="please"))
report("info", k.info()["spawn"])
""", backend=backend, policy="strict", files=agent_files())
    assert run.proc.returncode == 0, run.agent_output
    r = results(run)
    for name in ("true", "python", "ls"):
        assert r[name]["ok"] is False and r[name]["rule"] == "spawn.max_depth", r[name]
        assert r[name]["errno"] == errno.EPERM
    assert r["info"]["max_depth"] == 0 and r["info"]["remaining_spawns"] == 0
    folders = tree(run.run_dir.parent)
    assert list(folders) == [run.out["run_id"]]  # no child folder was made
    decs = folders[run.out["run_id"]].decisions("spawn")
    assert [d["rule"] for d in decs] == ["spawn.max_depth"] * 3
    assert_tree_intact(run.home, folders)


def test_malformed_requests_and_unknown_programs_are_denied(
        tmp_path: Path, backend: str) -> None:
    policy = spawn_policy(tmp_path, max_depth=1)
    run = run_agent(tmp_path, PRELUDE + """
bad_spawns = {
    "empty_argv": {"argv": []},
    "argv_string": {"argv": "python3"},
    "argv_ints": {"argv": [1, 2]},
    "argv_missing": {},
    "budget_negative": {"argv": ["true"], "budget": {"bytes_written": -1}},
    "budget_unknown": {"argv": ["true"], "budget": {"cpu": 1}},
    "budget_not_object": {"argv": ["true"], "budget": "all"},
    "budget_float": {"argv": ["true"], "budget": {"syscalls": 1.5}},
    "justification_int": {"argv": ["true"], "justification": 5},
    "extra_field": {"argv": ["true"], "priority": 1},
    "argv_nul": {"argv": ["tr\\x00ue"]},
    "argv_empty_string": {"argv": [""]},
    "budget_empty": {"argv": ["true"], "budget": {}},
}
for name, args in bad_spawns.items():
    report(name, call(k, "spawn", args))
report("not_found", spawn(k, ["no-such-program-" + "x" * 8]))
report("not_found_path", spawn(k, ["./missing/agent.py"]))
report("wait_empty", call(k, "wait", {}))
report("wait_int", call(k, "wait", {"child": 5}))
report("wait_timeout", call(k, "wait", {"child": "x", "timeout_ms": -1}))
report("wait_unknown", call(k, "wait", {"child": "20261122T000000Z-00000000"}))
report("register_root", call(k, "register", {"manifest": "abc.def"}))
""", backend=backend, policy=str(policy), files=agent_files())
    assert run.proc.returncode == 0, run.agent_output
    r = results(run)
    invalid = ["empty_argv", "argv_string", "argv_ints", "argv_missing", "budget_negative",
               "budget_unknown", "budget_not_object", "budget_float", "justification_int",
               "extra_field", "argv_nul", "argv_empty_string", "budget_empty", "wait_empty",
               "wait_int", "wait_timeout", "register_root"]
    for name in invalid:
        assert r[name]["ok"] is False, (name, r[name])
        assert (r[name]["rule"], r[name]["errno"]) == ("request.invalid", errno.EINVAL), (
            name, r[name])
    for name in ("not_found", "not_found_path"):
        assert (r[name]["rule"], r[name]["errno"]) == ("spawn.not_found", errno.ENOENT), (
            name, r[name])
    assert (r["wait_unknown"]["rule"], r["wait_unknown"]["errno"]) == ("wait.not_child",
                                                                      errno.ENOENT)
    folders = tree(run.run_dir.parent)
    assert list(folders) == [run.out["run_id"]]
    root = root_of(folders)
    # every request recorded with exactly one decision, all denied
    reqs = root.of_type("syscall.request")
    decs = root.of_type("syscall.decision")
    assert len(reqs) == len(decs) == len(r)
    assert all(d["decision"] == "denied" for d in decs)
    assert root.status == "passed"
    assert_tree_intact(run.home, folders)
