"""Hostile agent: tries to push keystrokes into the terminal it was given (CVE-2017-5226),
including the variant with garbage in the upper 32 bits of the command (CVE-2019-10063)."""

import ctypes
import json
import os

libc = ctypes.CDLL(None, use_errno=True)
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
TIOCSCTTY = 0x540E
out = {}


def ioctl(name, fd, cmd, arg):
    ctypes.set_errno(0)
    r = libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(cmd), arg)
    out[name] = "succeeded" if r == 0 else f"errno {ctypes.get_errno()}"


# Become a session leader and take the terminal as controlling tty, if at all possible.
try:
    os.setsid()
    out["setsid"] = "succeeded"
except OSError as e:
    out["setsid"] = f"errno {e.errno}"
ioctl("TIOCSCTTY", 0, TIOCSCTTY, ctypes.c_long(0))
for fd in (0, 1):
    for label, cmd in (("TIOCSTI", TIOCSTI), ("TIOCSTI|1<<32", (1 << 32) | TIOCSTI)):
        for ch in b"id\n":
            ioctl(f"{label} fd{fd}", fd, cmd, ctypes.byref(ctypes.c_char(bytes([ch]))))
sel = ctypes.c_char(b"\x06")  # TIOCL_GETSHIFTSTATE-ish subcode; any subcode must fail
ioctl("TIOCLINUX", 0, TIOCLINUX, ctypes.byref(sel))
ioctl("TIOCLINUX|1<<32", 0, (1 << 32) | TIOCLINUX, ctypes.byref(sel))
os.write(2, (json.dumps(out) + "\n").encode())
