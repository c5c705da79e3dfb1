"""Items 6 and 7 of ``python -m benchmarks``: the cost of one ``spawn`` and the largest tree.

6. ``spawn``: a root agent spawns N children one after the other (each waited for before the
   next), per available backend, rounds interleaved. Each child is the smallest real agent:
   ``python3 spawned.py``, which makes one call through the client (so its first request on the
   channel is ``register``). Measured from the run folders, on the kernel's one clock: from the
   parent's ``spawn`` request to the child's sandbox started, to the parent answered (the child
   is running), and to the child's first request arriving. Beside it: the same child program
   started bare (no sandbox, no kernel), the floor of the last column.
7. ``tree``: one tree as large as asked (``--tree-shape 10,10``: the root spawns 10 children and
   each of them 10, 111 agents). Every agent spawns its children, says it is up, and stays alive
   until the root has seen every agent up; then all end. Reported: how many agents were alive at
   once (the kernel's own count, from ``info``), the time to bring the tree up, to end it, and
   one ``kernel verify`` of the root (which verifies every folder of the tree).

The functions take the runner's ``say``, ``Env`` and list of backends, so this module holds
only what is particular to spawn.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY = "/usr/bin/python3"

SPAWNER = """
import json, sys, time
from syscalls.client import Kernel
k = Kernel.from_env()
answered = []
for i in range(int(sys.argv[1])):
    t = time.perf_counter()
    c = k.spawn(["python3", "spawned.py"])
    answered.append(time.perf_counter() - t)
    k.wait(c["child"])
print("BENCH " + json.dumps({"answered": answered}))
"""

SPAWNED = """
from syscalls.client import Kernel
Kernel.from_env().info()
"""

TREE_AGENT = """
import json, os, sys, time
from syscalls.client import Kernel
shape = [int(x) for x in sys.argv[1].split(",")]
k = Kernel.from_env()
depth = k.info()["spawn"]["depth"]
t0 = time.perf_counter()
kids = [k.spawn(["python3", "tree.py", sys.argv[1]])["child"]
        for _ in range(shape[depth] if depth < len(shape) else 0)]
k.write(f"up/{os.environ['KERNEL_RUN_ID']}", b"")
if depth == 0:
    total, n = 1, 1
    for fan in shape:
        n *= fan
        total += n
    while len(os.listdir("up")) < total:
        time.sleep(0.01)
    up = time.perf_counter() - t0
    live = k.info()["spawn"]["live"]
    k.write("go", b"")
    t1 = time.perf_counter()
else:
    while not os.path.exists("go"):
        time.sleep(0.05)
for c in kids:
    k.wait(c)
if depth == 0:
    print("BENCH " + json.dumps({"agents": total, "live_children": live, "up": up,
                                 "end": time.perf_counter() - t1}))
"""


def _ts(event: dict[str, Any]) -> float:
    return datetime.strptime(event["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def _events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "log" / "events.jsonl").read_text()
            .splitlines()]


def _spawn_latencies(runs: Path) -> dict[str, list[float]]:
    """From the folders of every tree in ``runs``: for each child, seconds from its parent's
    spawn request to the allowed decision, to the child's folder started (``run.start``), to
    its sandbox started, to the parent's spawn result, to the child's first request."""
    folders = {d.name: _events(d) for d in runs.iterdir() if d.is_dir()}
    out: dict[str, list[float]] = {k: [] for k in ("decided", "folder", "sandbox", "result",
                                                    "first")}
    for events in folders.values():
        requests = {e["body"]["req"]: e for e in events if e["type"] == "syscall.request"
                    and e["body"]["call"] == "spawn"}
        decisions = {e["body"]["req"]: e for e in events if e["type"] == "syscall.decision"
                     and e["body"].get("req") in requests}
        for e in events:
            b = e["body"]
            if e["type"] == "syscall.result" and b.get("req") in requests and b.get("ok"):
                t0 = _ts(requests[b["req"]])
                child = folders[b["child"]]
                first_of = {x["type"]: x for x in reversed(child)}
                out["decided"].append(_ts(decisions[b["req"]]) - t0)
                out["folder"].append(_ts(first_of["run.start"]) - t0)
                out["sandbox"].append(_ts(first_of["sandbox.start"]) - t0)
                out["result"].append(_ts(e) - t0)
                out["first"].append(_ts(first_of["syscall.request"]) - t0)
    return out


def _ms(values: list[float]) -> str:
    v = sorted(values)
    p90 = v[min(len(v) - 1, math.ceil(len(v) * 0.9) - 1)]
    return f"{statistics.median(v) * 1000:.0f} ms (p90 {p90 * 1000:.0f})"


def bench_spawn(n: int, rounds: int, *, say: Callable[[str], None], env_cls: Any,
                backends: list[str]) -> None:
    say(f"\n## 6. One `spawn`: request to child running ({rounds} interleaved rounds of {n} "
        "children spawned one after the other; median and p90)\n")
    e = env_cls(quotas={"max_spawns": n * rounds + 10, "expiration_seconds": 600})
    e.script("spawner.py", SPAWNER)
    e.script("spawned.py", SPAWNED)
    runs: dict[str, list[Path]] = {b: [] for b in backends}
    answered: dict[str, list[float]] = {b: [] for b in backends}
    bare: list[float] = []
    env = dict(e.env, PYTHONPATH=str(ROOT))
    for _ in range(rounds):
        for b in backends:
            before = {p.name for p in e.runs.iterdir()} if e.runs.exists() else set()
            r = e.run_agent(b, PY, "spawner.py", str(n))
            answered[b].extend(r["answered"])
            runs[b].extend(p for p in e.runs.iterdir() if p.name not in before)
        for _ in range(n):
            t = time.perf_counter()
            subprocess.run([PY, "-c", "from syscalls.client import Kernel"], env=env,
                           check=True)
            bare.append(time.perf_counter() - t)
    say("| backend | request → child's sandbox started | request → parent answered (child "
        "running) | request → child's first request | spawn call as the parent sees it |")
    say("| --- | ---: | ---: | ---: | ---: |")
    lats: dict[str, dict[str, list[float]]] = {}
    for b in backends:
        tmp = e.tmp / f"by-backend-{b}"
        tmp.mkdir()
        for p in runs[b]:
            (tmp / p.name).symlink_to(p)
        lat = lats[b] = _spawn_latencies(tmp)
        say(f"| {b} | {_ms(lat['sandbox'])} | {_ms(lat['result'])} | {_ms(lat['first'])} | "
            f"{_ms(answered[b])} |")
    say("\n   Where the time to a running child goes (median from the request, per backend): "
        + "; ".join(
            f"{b}: decision durable {statistics.median(lats[b]['decided']) * 1000:.1f} ms, "
            f"child's folder started {statistics.median(lats[b]['folder']) * 1000:.1f} ms, "
            f"sandbox started {statistics.median(lats[b]['sandbox']) * 1000:.1f} ms"
            for b in backends) + ".")
    say(f"\n   floor: the child's program started bare, no sandbox and no kernel "
        f"(`{PY} -c 'from syscalls.client import Kernel'`): {_ms(bare)}.")
    e.close()


def bench_tree(shape: list[int], *, say: Callable[[str], None], env_cls: Any,
               backends: list[str]) -> None:
    total, level = 1, 1
    for fan in shape:
        level *= fan
        total += level
    say(f"\n## 7. The largest tree: shape {','.join(map(str, shape))} ({total} agents, "
        f"{len(shape)} generations below the root, all alive at once)\n")
    say("| backend | agents | alive at once (kernel's count + root) | all up | all ended | "
        "`kernel verify` of the root (whole tree) | tree intact |")
    say("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for b in backends:
        e = env_cls(quotas={"max_spawns": total, "max_replicas": total,
                            "max_depth": len(shape), "expiration_seconds": 600,
                            "files_written": total + 10, "syscalls": 10 * total + 100})
        e.script("tree.py", TREE_AGENT)
        (e.ws / "up").mkdir()
        (e.ws / "up").chmod(0o755)
        t = time.perf_counter()
        try:
            r = e.run_agent(b, PY, "tree.py", ",".join(map(str, shape)))
        except RuntimeError as err:
            say(f"| {b} | {total} | failed: {str(err)[:200]} | | | | |")
            e.close()
            continue
        whole = time.perf_counter() - t
        root = next(d for d in e.runs.iterdir() if d.is_dir() and "lineage" not in json.loads(
            (d / "run.json").read_text()))
        pub = str(e.tmp / "home" / "keys" / "kernel.pub")
        tv = time.perf_counter()
        v = subprocess.run([str(ROOT / ".venv" / "bin" / "kernel"), "verify", "--json",
                            "--trust", pub, str(root)], capture_output=True, text=True,
                           env=e.env, check=False)
        verify_s = time.perf_counter() - tv
        rep = json.loads(v.stdout)
        todo, count, intact = [rep], 0, 0
        while todo:
            x = todo.pop()
            count += 1
            intact += x["status"] == "intact"
            todo.extend(x.get("children") or [])
        say(f"| {b} | {r['agents']} | {r['live_children'] + 1} | {r['up']:.1f} s | "
            f"{r['end']:.1f} s | {verify_s:.1f} s | {intact}/{count} folders "
            f"(whole run {whole:.1f} s) |")
        e.close()
