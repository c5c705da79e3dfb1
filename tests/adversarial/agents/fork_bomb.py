"""Hostile agent: forks until it cannot, keeping every child alive."""

import json
import os
import time

children = 0
error = None
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    try:
        pid = os.fork()
    except OSError as e:
        error = f"errno {e.errno}"
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    children += 1
print(json.dumps({"children": children, "error": error}), flush=True)
