"""Hostile agent: looks at host directories that must not be part of its view."""

import json
import os

out = {}
for d in ("/tmp", "/run", "/var", "/home", "/root", "/dev/shm", "/sys", "/dev", "/", "/etc"):
    try:
        out[d] = sorted(os.listdir(d))
    except OSError as e:
        out[d] = f"errno {e.errno}"
try:
    with open("/etc/passwd") as f:
        out["passwd"] = f.read()
except OSError as e:
    out["passwd"] = f"errno {e.errno}"
out["shadow"] = os.path.exists("/etc/shadow")
print(json.dumps(out))
