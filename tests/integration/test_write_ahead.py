"""Write-ahead (log-durable) writes, on real runs: what is recorded, when the workspace is synced,
and that ``kernel recover`` re-applies committed writes a power cut could have lost.

A power cut cannot be made here; what it may leave is made instead, exactly as the design says
it may be: after the kernel is SIGKILLed, every log-durable write after the log's last
``workspace.synced`` has its file put back to what it was before (a lost rename or lost data),
and the last log line, a log-durable write's result (appended but not yet synced when the agent
was answered), is cut off. Recovery must then bring every committed write back, and the sealed
run must verify and replay identically.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.kernel_helpers import (
    CLIENT_PRELUDE,
    kernel_cmd,
    make_workspace,
    run_agent,
    skip_unless_available,
    start_exec,
)

pytestmark = pytest.mark.sandbox


@pytest.fixture(autouse=True)
def _native() -> None:
    skip_unless_available("native")


def events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in
            (run_dir / "log" / "events.jsonl").read_text().splitlines()]


def trust(home: Path) -> list[str]:
    return ["--trust", str(home / "keys" / "kernel.pub")]


RECORDS_AGENT = CLIENT_PRELUDE + """
for i in range(5):
    k.write(f"f{i}.txt", b"small %d" % i)
k.write("big.bin", b"B" * (40 * 1024))          # over the in-line limit: a blob, synced
k.write("secret.txt", b"key=" + os.environ["PLAIN_VALUE"].encode())  # redacted: a blob
k.mkdir("d")                                    # not a write: the workspace is synced first
k.write("d/after.txt", b"after")
k.append("f0.txt", b"+")
"""
SECRET = "wa-5ecr3t-value-77"


def test_log_durable_records_checkpoints_verify_and_replay(tmp_path: Path) -> None:
    run = run_agent(tmp_path, RECORDS_AGENT, backend="native",
                    extra=["--env", f"PLAIN_VALUE={SECRET}"], env={"SERVICE_API_TOKEN": SECRET})
    assert run.out["status"] == "passed", run.proc.stderr
    evs = events(run.run_dir)
    log = (run.run_dir / "log" / "events.jsonl").read_text()
    assert SECRET not in log
    reqs = {e["seq"]: e for e in evs if e["type"] == "syscall.request"}
    durable = {}
    for e in evs:
        if e["type"] == "syscall.decision" and e["body"].get("decision") == "allowed":
            req = reqs[e["seq"] - 1]["body"]
            durable.setdefault(req["args"].get("path"), []).append((e["body"].get("durable"),
                                                                   req))
    # small op-write contents: in the request line, committed by the decision
    for i in range(5):
        how, req = durable[f"f{i}.txt"][0]
        assert how == "log"
        assert base64.b64decode(req["args"]["content_b64"]) == b"small %d" % i
        assert "content_blob" not in req
    # too big, or holding a secret: a blob, the old fully synced path
    for path in ("big.bin", "secret.txt"):
        ((how, req),) = durable[path]
        assert how is None and "content_blob" in req and "content_b64" not in req["args"]
    assert durable["d/after.txt"][0][0] == "log"
    assert durable["f0.txt"][1][0] is None  # the append is not log-durable
    # the workspace is synced before the big write (not log-durable) and before the seal
    types = [e["type"] for e in evs]
    synced = [i for i, t in enumerate(types) if t == "workspace.synced"]
    assert len(synced) >= 2
    first_big = next(i for i, e in enumerate(evs) if e["type"] == "syscall.request"
                     and e["body"]["args"].get("path") == "big.bin")
    assert synced[0] == first_big - 1
    assert evs[synced[0]]["body"]["writes"] == 5
    # after the last log-durable write (d/after.txt) and before the seal: synced again
    after = max(i for i, e in enumerate(evs) if e["type"] == "syscall.request"
                and e["body"]["args"].get("path") == "d/after.txt")
    assert any(after < i for i in synced)
    assert (run.workspace / "f3.txt").read_bytes() == b"small 3"
    assert (run.workspace / "f0.txt").read_bytes() == b"small 0+"
    v = kernel_cmd(["verify", str(run.run_dir), *trust(run.home)], home=run.home)
    assert v.returncode == 0, v.stdout + v.stderr
    # replay stops at the redacted write, as before, having re-derived every decision
    rp = kernel_cmd(["replay", str(run.run_dir), *trust(run.home), "--json"], home=run.home)
    rep = json.loads(rp.stdout)
    assert "recorded redacted" in rep["problem"], rep


PLAIN_AGENT = CLIENT_PRELUDE + """
for i in range(40):
    k.write(f"w/f{i % 7}.txt", (b"round %d " % i) * (i + 1))
k.write("w/mode.txt", b"m", mode=0o600)
"""


def test_replay_re_applies_content_held_by_the_request_lines(tmp_path: Path) -> None:
    run = run_agent(tmp_path, PLAIN_AGENT, backend="native", files={"w/keep.txt": "k\n"})
    assert run.out["status"] == "passed", run.proc.stderr
    assert sum(1 for e in events(run.run_dir) if e["body"].get("durable") == "log") == 41
    assert (run.workspace / "w/mode.txt").stat().st_mode & 0o777 == 0o600
    rp = kernel_cmd(["replay", str(run.run_dir), *trust(run.home), "--json"], home=run.home)
    rep = json.loads(rp.stdout)
    assert rp.returncode == 0 and rep["status"] == "identical", rep
    assert rep["applied"] == 41


CRASH_AGENT = """
from syscalls.client import Kernel
k = Kernel.from_env()
k.mkdir("out", parents=True)
for i in range(10):
    k.write(f"out/f{i}.txt", b"new content %d" % i)
    print("ACK", i, flush=True)
"""
N = 10


def crash_after_ten_writes(tmp_path: Path) -> tuple[Path, Path, Path, list[int]]:
    """Run CRASH_AGENT, SIGKILL the kernel right before it answers the tenth write (its result
    line is written, not synced). Half the files exist beforehand with old content."""
    ws = make_workspace(tmp_path, {f"out/f{i}.txt": f"old {i}\n" for i in range(0, N, 2)})
    (ws / "agent.py").write_text(textwrap.dedent(CRASH_AGENT))
    home, runs, out = tmp_path / "home", tmp_path / "runs", tmp_path / "agent.out"
    # answers: mkdir is the 1st, the tenth write the 11th
    rc = start_exec(ws, runs, home, out,
                    {"KERNEL_FAILPOINT": "answer.before_send:11"}).wait(timeout=120)
    assert rc == -signal.SIGKILL
    acked = [int(line.split()[1]) for line in out.read_text().splitlines()
             if line.startswith("ACK ")]
    # the tenth was never answered (the last ACKs may not have been relayed before the kill)
    assert acked == list(range(len(acked))) and len(acked) <= N - 1
    (run_dir,) = runs.iterdir()
    return ws, home, run_dir, acked


def simulate_power_cut(ws: Path, run_dir: Path) -> list[str]:
    """Undo what a power cut may undo; returns the paths of the writes it undid."""
    evs = events(run_dir)
    last_sync = max((i for i, e in enumerate(evs) if e["type"] == "workspace.synced"),
                    default=-1)
    undone = []
    for i, e in enumerate(evs):
        if i > last_sync and e["type"] == "syscall.decision" and (
                e["body"].get("durable") == "log"):
            rel = e["body"]["facts"]["target"]["rel"]
            n = int(rel[len("out/f"):-len(".txt")])
            p = ws / rel
            if n % 2 == 0:
                p.write_text(f"old {n}\n")  # the rename never reached the disk
            elif n % 3 == 0:
                p.write_bytes(b"")          # the name did, the data did not
            else:
                p.unlink()                  # nothing did
            os.utime(p.parent, ns=(e["body"]["now_ns"], e["body"]["now_ns"]))
            if p.exists():
                os.utime(p, ns=(e["body"]["now_ns"], e["body"]["now_ns"]))
            undone.append(rel)
    log = run_dir / "log" / "events.jsonl"
    data = log.read_bytes()
    last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    assert b'"type":"syscall.result"' in last  # the unsynced result of the tenth write
    log.write_bytes(data[: len(data) - len(last) - 1])
    return undone


def test_recover_re_applies_committed_writes_a_power_cut_lost(tmp_path: Path) -> None:
    ws, home, run_dir, _ = crash_after_ten_writes(tmp_path)
    undone = simulate_power_cut(ws, run_dir)
    # every write came after the last checkpoint (the mkdir synced nothing: nothing was dirty)
    assert undone == [f"out/f{i}.txt" for i in range(N)], undone
    r = kernel_cmd(["recover", str(run_dir), "--json"], home=home)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert [d["path"] for d in rep["redone"]] == undone
    assert {d["outcome"] for d in rep["redone"]} == {"applied"}
    assert len(rep["unfinished"]) == 1  # the tenth: decided and committed, no result line
    for i in range(N):  # the nine acknowledged writes, and the committed tenth
        assert (ws / f"out/f{i}.txt").read_bytes() == b"new content %d" % i
    assert not list(ws.rglob(".kernel-tmp-*"))
    v = json.loads(kernel_cmd(["verify", str(run_dir), *trust(home), "--json"],
                              home=home).stdout)
    assert v["status"] == "intact" and v["seal_status"] == "aborted", v
    recovered = [e for e in events(run_dir) if e["type"] == "run.recovered"]
    assert [d["path"] for d in recovered[0]["body"]["redone"]] == undone
    rp = kernel_cmd(["replay", str(run_dir), *trust(home), "--json"], home=home)
    out = json.loads(rp.stdout)
    assert rp.returncode == 0 and out["status"] == "identical", out


def test_recover_after_a_plain_kill_finds_every_write_present(tmp_path: Path) -> None:
    """SIGKILL alone loses nothing the kernel wrote (the page cache survives): recovery only
    syncs what is there."""
    ws, home, run_dir, _ = crash_after_ten_writes(tmp_path)
    r = kernel_cmd(["recover", str(run_dir), "--json"], home=home)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert len(rep["redone"]) == N
    assert {d["outcome"] for d in rep["redone"]} == {"present"}
    assert rep["unfinished"] == []  # the tenth's result line is there
    for i in range(N):
        assert (ws / f"out/f{i}.txt").read_bytes() == b"new content %d" % i


def test_recover_leaves_a_file_changed_after_the_run_stopped(tmp_path: Path) -> None:
    """Someone used the workspace before recovering the run: a file modified after the run's
    last record keeps that change; the other committed writes are re-applied."""
    ws, home, run_dir, _ = crash_after_ten_writes(tmp_path)
    simulate_power_cut(ws, run_dir)
    later = time.time_ns() + 60 * 1_000_000_000
    (ws / "out/f4.txt").write_bytes(b"edited by hand")
    os.utime(ws / "out/f4.txt", ns=(later, later))
    r = kernel_cmd(["recover", str(run_dir), "--json"], home=home)
    assert r.returncode == 0, r.stderr
    outcome = {d["path"]: d["outcome"] for d in json.loads(r.stdout)["redone"]}
    assert outcome["out/f4.txt"].startswith("newer")
    assert (ws / "out/f4.txt").read_bytes() == b"edited by hand"
    assert (ws / "out/f3.txt").read_bytes() == b"new content 3"
    assert outcome["out/f3.txt"] == "applied"


TREE_AGENT = """
from syscalls.client import Kernel
k = Kernel.from_env()
k.write("before.txt", b"root, alone")
cid = k.spawn(["/usr/bin/python3", "child.py"])["child"]
k.wait(cid)
k.write("after.txt", b"root, with a child")
"""
CHILD = """
from syscalls.client import Kernel
Kernel.from_env().write("child.txt", b"child")
"""


def test_an_agent_tree_uses_the_synced_path_after_its_first_spawn(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, {"child.py": textwrap.dedent(CHILD)})
    run = run_agent(tmp_path, TREE_AGENT, backend="native", workspace=ws)
    assert run.out["status"] == "passed", run.proc.stderr
    evs = events(run.run_dir)
    how = {}
    for i, e in enumerate(evs):
        if e["type"] == "syscall.decision" and e["body"].get("decision") == "allowed" and (
                evs[i - 1]["body"].get("call") == "write"):
            how[evs[i - 1]["body"]["args"]["path"]] = e["body"].get("durable")
    assert how == {"before.txt": "log", "after.txt": None}
    spawn_req = next(i for i, e in enumerate(evs) if e["type"] == "syscall.request"
                     and e["body"]["call"] == "spawn")
    assert evs[spawn_req - 1]["type"] == "workspace.synced"
    child_dir = run.run_dir.parent / next(
        e["body"]["child"] for e in evs if e["type"] == "spawn.exit")
    assert not any(e["body"].get("durable") for e in events(child_dir))
    rp = kernel_cmd(["replay", str(run.run_dir), *trust(run.home), "--json"], home=run.home)
    assert rp.returncode == 0, rp.stdout


MIXED_AGENT = """
from syscalls.client import Kernel
k = Kernel.from_env()
k.mkdir("out", parents=True)
for i in range(80):
    k.write(f"out/f{i % 7}.txt", b"v%d " % i * (i % 13 + 1))
    if i % 9 == 8:
        k.append("out/journal.txt", b"after %d\\n" % i)   # not log-durable: a checkpoint
    print("ACK", i, flush=True)
"""


def _power_cut(ws: Path, run_dir: Path, rng: Any) -> int:
    """Undo, at random, what a power cut may undo: each log-durable write after the last
    checkpoint may have reached the disk, or left the previous version, an empty file or no file;
    the last line goes too if it is such a write's (unsynced) result. Returns how many writes
    were undone."""
    evs = events(run_dir)
    last_sync = max((i for i, e in enumerate(evs) if e["type"] == "workspace.synced"),
                    default=-1)
    before: dict[str, bytes | None] = {}
    undone = 0
    for i, e in enumerate(evs):
        if i <= last_sync or e["type"] != "syscall.decision" or (
                e["body"].get("durable") != "log"):
            continue
        rel = e["body"]["facts"]["target"]["rel"]
        p = ws / rel
        if rel not in before:  # the version the checkpoint made durable
            before[rel] = None
            for j in range(last_sync, -1, -1):
                b = evs[j]["body"]
                if evs[j]["type"] == "syscall.request" and b.get("args", {}).get("path") == rel:
                    before[rel] = base64.b64decode(b["args"]["content_b64"])
                    break
        choice = rng.choice(["kept", "previous", "empty", "gone"])
        if choice == "kept":
            continue
        undone += 1
        if choice == "previous" and before[rel] is not None:
            p.write_bytes(before[rel] or b"")
        elif choice in ("previous", "gone") and p.exists():
            p.unlink()
        else:
            p.write_bytes(b"")
        t = e["body"]["now_ns"]
        os.utime(p.parent, ns=(t, t))
        if p.exists():
            os.utime(p, ns=(t, t))
    log = run_dir / "log" / "events.jsonl"
    data = log.read_bytes()
    last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    if b'"type":"syscall.result"' in last and rng.random() < 0.5:
        prev = json.loads(data.rstrip(b"\n").rsplit(b"\n", 2)[-2])
        if prev["type"] == "syscall.decision" and prev["body"].get("durable") == "log":
            log.write_bytes(data[: len(data) - len(last) - 1])
    return undone


@pytest.mark.parametrize("seed", range(5))
def test_a_random_power_cut_loses_no_committed_write(tmp_path: Path, seed: int) -> None:
    """The kernel is SIGKILLed after a random number of acknowledged writes, then a random
    subset of the unsynced changes is undone as a power cut may undo them. After recovery every
    path holds the content of its last committed write (the last decision for it in the log),
    which is never older than what the agent was told, and the run replays identically."""
    import random

    rng = random.Random(seed)
    ws = make_workspace(tmp_path, {"README.md": "x\n"})
    (ws / "agent.py").write_text(textwrap.dedent(MIXED_AGENT))
    home, runs, out = tmp_path / "home", tmp_path / "runs", tmp_path / "agent.out"
    target = rng.randrange(5, 70)
    proc = start_exec(ws, runs, home, out)
    deadline = time.monotonic() + 60
    while out.read_text().count("ACK ") < target:
        assert proc.poll() is None, "the run ended before the kill: nothing was tested"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    acked = [int(line.split()[1]) for line in out.read_text().splitlines()
             if line.startswith("ACK ")]
    (run_dir,) = runs.iterdir()
    undone = _power_cut(ws, run_dir, rng)
    r = kernel_cmd(["recover", str(run_dir), "--json"], home=home)
    assert r.returncode == 0, r.stderr
    assert sum(d["outcome"] == "applied" for d in json.loads(r.stdout)["redone"]) >= min(
        undone, 1)
    # the last committed content of each path, from the sealed log
    evs = events(run_dir)
    committed: dict[str, bytes] = {}
    for i, e in enumerate(evs):
        b = e["body"]
        if e["type"] == "syscall.decision" and b.get("durable") == "log":
            req = evs[i - 1]["body"]
            committed[req["args"]["path"]] = base64.b64decode(req["args"]["content_b64"])
    assert committed, "no log-durable write was recorded"
    for rel, data in committed.items():
        assert (ws / rel).read_bytes() == data, rel
    for i in acked:  # what the agent was told is there, or a later committed write
        held = (ws / f"out/f{i % 7}.txt").read_bytes()
        assert int(held.split(b" ", 1)[0][1:]) >= i, (i, held[:20])
    v = json.loads(kernel_cmd(["verify", str(run_dir), *trust(home), "--json"],
                              home=home).stdout)
    assert v["status"] == "intact", v
    rp = kernel_cmd(["replay", str(run_dir), *trust(home), "--json"], home=home)
    out_ = json.loads(rp.stdout)
    assert rp.returncode == 0 and out_["status"] == "identical", out_
