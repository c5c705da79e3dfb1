"""Hostile agent: looks through /proc for other processes' environment and memory (the
sandbox's own helper processes are copies of the kernel's memory)."""

import json
import os
import sys

needle = sys.argv[1][::-1].encode()  # given reversed: no command line holds it as is
me = os.getpid()
out = {"found": [], "mem_opened": [], "pids": []}
try:
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
except OSError as e:
    pids = []
    out["proc"] = f"errno {e.errno}"
out["pids"] = sorted(pids)
for pid in pids:
    if pid == me:
        continue
    for name in ("environ", "cmdline"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                if needle in f.read():
                    out["found"].append(f"{pid}/{name}")
        except OSError:
            pass
    try:
        mem = open(f"/proc/{pid}/mem", "rb")
    except OSError:
        continue
    out["mem_opened"].append(pid)
    with mem:
        try:
            with open(f"/proc/{pid}/maps") as f:
                regions = [line.split()[0] for line in f if " rw" in line]
        except OSError:
            regions = []
        budget = 256 * 1024 * 1024
        for r in regions:
            lo, hi = (int(x, 16) for x in r.split("-"))
            size = min(hi - lo, budget)
            budget -= size
            try:
                mem.seek(lo)
                if needle in mem.read(size):
                    out["found"].append(f"{pid}/mem")
                    break
            except (OSError, OverflowError, ValueError):
                pass
            if budget <= 0:
                break
print(json.dumps(out))
