"""Hostile agent: who am I, and can I become someone else?"""

import json
import os

out = {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid()}
with open("/proc/self/status") as f:
    for line in f:
        key, _, value = line.partition(":")
        if key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp",
                   "Uid", "Gid"):
            out[key] = value.strip()
for name, fn in (("setuid0", lambda: os.setuid(0)), ("setgid0", lambda: os.setgid(0)),
                 ("setgroups", lambda: os.setgroups([0]))):
    try:
        fn()
        out[name] = "succeeded"
    except OSError as e:
        out[name] = f"errno {e.errno}"
print(json.dumps(out))
