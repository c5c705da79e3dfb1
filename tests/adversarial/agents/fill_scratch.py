"""Hostile agent: fills the scratch dir beyond its size."""

import json
import os
import sys

size = int(sys.argv[1])
out = {}
try:
    with open("/tmp/small", "wb") as f:
        f.write(b"x" * 4096)
    out["small"] = "written"
except OSError as e:
    out["small"] = f"errno {e.errno}"
written = 0
try:
    with open("/tmp/fill", "wb") as f:
        chunk = b"\0" * 65536
        while written < 2 * size:
            written += f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    out["fill"] = f"wrote {written}"
except OSError as e:
    out["fill"] = f"errno {e.errno}"
out["written"] = written
print(json.dumps(out))
