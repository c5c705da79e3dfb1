"""A tree of sleepers: each agent spawns one child until the tree is LEVELS generations deep
below the root, then writes ``up-<depth>`` into the workspace (through the kernel) and sleeps.

Each generation's command line carries the one above's marker plus ``-L<depth>``, so the host's
process table shows which processes belong to which subtree.

    python3 spawn_tree.py MARKER LEVELS
"""

from __future__ import annotations

import sys
import time

from spawnlib import connect, spawn

marker, levels = sys.argv[1], int(sys.argv[2])
k = connect()
depth = k.info()["spawn"]["depth"]
if depth < levels:
    r = spawn(k, ["python3", "spawn_tree.py", f"{marker}-L{depth + 1}", str(levels)])
    if not r["ok"]:
        print("spawn refused:", r, flush=True)
        sys.exit(3)
k.write(f"up-{depth}", b"")
time.sleep(300)
