"""Hostile agent: a spawned child that forges its manifest.

Before sending anything else, over the raw channel (the client would register the genuine token
first), it presents: a string that is no token; its own token with every budget raised to 10^12
(the body re-encoded canonically, the signature kept); its own token with its depth set to 0
(to pass for the root). Each must be refused. Then it tries to do something anyway: write the
canary file named on its command line, spawn, read info. The evidence is on the host (no
canary) and in its run folder (every refusal recorded); it also prints what it was answered.

    python3 spawn_tamper.py CANARY
"""

from __future__ import annotations

import base64
import json
import os
import sys
from typing import Any

from spawnlib import Raw

canary = sys.argv[1]
token = os.environ["KERNEL_SPAWN_MANIFEST"]
body_b64, _, signature = token.partition(".")
body = json.loads(base64.urlsafe_b64decode(body_b64))


def forged(change: dict[str, Any]) -> str:
    b = dict(body, **change)
    raw = json.dumps(b, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).decode() + "." + signature


raw = Raw()
answers = {
    "garbage": raw.call("register", {"manifest": "not-a-manifest"}),
    "budget": raw.call("register", {"manifest": forged(
        {"budget": {k: 10**12 for k in body["budget"]}})}),
    "depth": raw.call("register", {"manifest": forged({"depth": 0})}),
    "write": raw.call("write", {"op": "write", "path": canary,
                                "content_b64": base64.b64encode(b"forged").decode()}),
    "spawn": raw.call("spawn", {"argv": ["true"]}),
    "info": raw.call("info", {}),
}
print("TAMPER " + json.dumps(answers), flush=True)
