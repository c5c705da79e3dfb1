"""Hostile agents: two siblings, one leaking its manifest, the other presenting it as its own.

``leak``: registers (through the client) and writes its token, now used, into the workspace.
``replay``: reads the leaked token and, over the raw channel before anything else, presents it
with ``register``; then tries to write the canary named on its command line. It prints what it
was answered; the evidence is on the host (no canary) and in its run folder.

    python3 spawn_replay.py leak
    python3 spawn_replay.py replay CANARY
"""

from __future__ import annotations

import base64
import json
import os
import sys

from spawnlib import Raw, connect

if sys.argv[1] == "leak":
    k = connect()
    k.write("leaked-manifest.txt", os.environ["KERNEL_SPAWN_MANIFEST"].encode())
else:
    canary = sys.argv[2]
    with open("leaked-manifest.txt") as f:
        leaked = f.read()
    raw = Raw()
    answers = {
        "register": raw.call("register", {"manifest": leaked}),
        "write": raw.call("write", {"op": "write", "path": canary,
                                    "content_b64": base64.b64encode(b"replayed").decode()}),
    }
    print("REPLAY " + json.dumps(answers), flush=True)
