"""Hostile agent: tries to read files outside its read set, directly and by listing."""

import json
import os
import sys

out = {}
for path in sys.argv[1:]:
    try:
        with open(path, "rb") as f:
            out[path] = f.read(4096).decode(errors="replace")
    except OSError as e:
        out[path] = f"errno {e.errno}"
    parent = os.path.dirname(path)
    try:
        out[parent + " (listing)"] = sorted(os.listdir(parent))
    except OSError as e:
        out[parent + " (listing)"] = f"errno {e.errno}"
print(json.dumps(out))
