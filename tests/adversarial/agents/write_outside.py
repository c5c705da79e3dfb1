"""Hostile agent: tries to create files at host paths outside the workspace."""

import json
import os
import sys

results = {}
for path in sys.argv[1:]:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("written by the agent")
        results[path] = "written (inside the sandbox view)"
    except OSError as e:
        results[path] = f"errno {e.errno}"
print(json.dumps(results))
