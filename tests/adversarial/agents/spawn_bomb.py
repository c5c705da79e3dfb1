"""Hostile agent: a spawn bomb. Every agent of the tree runs this program and asks for copies of
itself as fast as the kernel answers, recursively.

A refusal that may pass later (``spawn.max_replicas``, ``spawn.cooldown``) is retried after a
20 ms pause; a final one (``spawn.max_depth``: this agent is at the bottom; ``spawn.max_spawns``:
the tree has had all its children; a stop condition) ends the loop. A spawned agent also gives up
after one second of replica refusals in a row (its ancestors hold the slots); the root never
does. Then the agent waits for its own children, saves what it saw as ``bomb-<run id>.json``
and exits.

    python3 spawn_bomb.py MARKER
"""

from __future__ import annotations

import sys
import time

from spawnlib import connect, save, spawn, wait

FINAL = ("spawn.max_depth", "spawn.max_spawns")

marker = sys.argv[1]
k = connect()
me = k.info()
depth = me["spawn"]["depth"]
kids: list[str] = []
refusals: dict[str, int] = {}
replicas_since: float | None = None
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    r = spawn(k, ["python3", "spawn_bomb.py", marker])
    if r["ok"]:
        kids.append(r["result"]["child"])
        replicas_since = None
        continue
    rule = str(r["rule"])
    refusals[rule] = refusals.get(rule, 0) + 1
    if rule in FINAL or rule.startswith("spawn.stop"):
        break
    if rule == "spawn.max_replicas":
        replicas_since = replicas_since or time.monotonic()
        if depth > 0 and time.monotonic() - replicas_since > 1.0:
            break
    elif rule != "spawn.cooldown":
        break  # not a refusal of the contract: nothing to retry
    time.sleep(0.02)
ends = {c: wait(k, c) for c in kids}
save(k, f"bomb-{me['run_id']}.json", {"depth": depth, "kids": kids, "refusals": refusals,
                                      "ends": ends})
