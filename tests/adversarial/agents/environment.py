"""Hostile agent: looks for anything of the kernel's environment."""

import json

with open("/proc/self/environ", "rb") as f:
    raw = f.read()
env = dict(kv.split(b"=", 1) for kv in raw.split(b"\0") if b"=" in kv)
print(json.dumps({k.decode(): v.decode(errors="replace") for k, v in env.items()}))
