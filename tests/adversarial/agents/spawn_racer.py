"""Hostile agent: one of many siblings that ask for a child at the same instant.

Each racer says it is ready (``ready-<i>``), spins until the ``go`` file appears in the
workspace, then at once asks for a child that sleeps (holding its replica slot), saves the answer
as ``raced-<i>.json`` and stays alive (so its child keeps the slot) until ``done`` appears.

    python3 spawn_racer.py MARKER INDEX
"""

from __future__ import annotations

import os
import sys
import time

from spawnlib import connect, save, spawn

marker, idx = sys.argv[1], sys.argv[2]
k = connect()
k.write(f"ready-{idx}", b"")
while not os.path.exists("go"):
    time.sleep(0.0005)
r = spawn(k, ["python3", "-c", "import time; time.sleep(120)", marker])
save(k, f"raced-{idx}.json", r)
while not os.path.exists("done"):
    time.sleep(0.01)
