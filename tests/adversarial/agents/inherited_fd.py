"""Hostile agent: tries to use a descriptor number the kernel had open on a host file."""

import json
import os

fd = int(os.environ["LEAKED_FD"])
out = {}
try:
    out["read"] = os.pread(fd, 4096, 0).decode(errors="replace")
except OSError as e:
    out["read"] = f"errno {e.errno}"
try:
    out["write"] = os.pwrite(fd, b"pwned by the agent", 0)
except OSError as e:
    out["write"] = f"errno {e.errno}"
try:
    with open(f"/proc/self/fd/{fd}", "rb") as f:
        out["reopen"] = f.read(4096).decode(errors="replace")
except OSError as e:
    out["reopen"] = f"errno {e.errno}"
try:
    out["open_fds"] = sorted(int(x) for x in os.listdir("/proc/self/fd"))
except OSError as e:
    out["open_fds"] = f"errno {e.errno}"
print(json.dumps(out))
