"""Hostile agent: opens descriptors until it cannot."""

import json
import os

fds = []
error = None
try:
    while len(fds) < 100000:
        fds.append(os.open("/dev/null", os.O_RDONLY))
except OSError as e:
    error = f"errno {e.errno}"
print(json.dumps({"opened": len(fds), "error": error}))
