"""Hostile agent: a spawned child that looks for what it should not have, then tries to outlive
itself.

It saves (as ``probe-<run id>.json``, through the kernel) its open descriptors with what they
point at, the names in its environment and its channel's number; for every socket it holds
besides its own channel it sends an ``info`` request, to see whether another agent's channel
answers. Then it starts a detached process (double fork, new session) that sleeps with the
marker on its command line, and exits at once.

    python3 spawn_probe.py MARKER
"""

from __future__ import annotations

import os
import socket
import sys

from spawnlib import connect, save

from syscalls import abi

marker = sys.argv[1]
channel = int(os.environ[abi.FD_ENV])
k = connect()
me = k.info()
fds: dict[str, str] = {}
for fd in os.listdir("/proc/self/fd"):
    try:
        fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        fds[fd] = f"unreadable: {e.errno}"
answers: dict[str, str] = {}
for fd, target in fds.items():
    if target.startswith("socket:") and int(fd) != channel:
        try:
            s = socket.socket(fileno=os.dup(int(fd)))
            s.settimeout(1)
            s.sendall(abi.encode_frame(abi.request("info", {}, 1)))
            answers[fd] = s.recv(4096).decode(errors="replace")[:200]
        except OSError as e:
            answers[fd] = f"error {e.errno}"
save(k, f"probe-{me['run_id']}.json", {"fds": fds, "env": sorted(os.environ),
                                       "channel": channel, "answers": answers})
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(120)", marker])
    os._exit(0)
