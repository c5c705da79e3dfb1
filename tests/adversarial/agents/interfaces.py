"""Hostile agent: enumerates network interfaces through /proc and through socket ioctls."""

import array
import fcntl
import json
import os
import socket
import struct

out = {}
for path in ("/proc/net/dev", "/proc/self/net/dev"):
    try:
        with open(path) as f:
            lines = f.read().splitlines()[2:]
        out[path] = sorted(line.split(":")[0].strip() for line in lines)
    except OSError as e:
        out[path] = f"errno {e.errno}"
try:
    out["if_nameindex"] = sorted(name for _, name in socket.if_nameindex())
except OSError as e:
    out["if_nameindex"] = f"errno {e.errno}"
# SIOCGIFCONF works on any socket, so try it on the only family that may be allowed.
SIOCGIFCONF = 0x8912
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    buf = array.array("B", b"\0" * 40 * 32)
    addr, _ = buf.buffer_info()
    req = struct.pack("iL", len(buf), addr)
    res = fcntl.ioctl(s.fileno(), SIOCGIFCONF, req)
    size, _ = struct.unpack("iL", res)
    raw = buf.tobytes()[:size]
    out["SIOCGIFCONF"] = sorted(raw[i:i + 16].split(b"\0", 1)[0].decode()
                                for i in range(0, size, 40))
except OSError as e:
    out["SIOCGIFCONF"] = f"errno {e.errno}"
try:
    out["sys_class_net"] = sorted(os.listdir("/sys/class/net"))
except OSError as e:
    out["sys_class_net"] = f"errno {e.errno}"
print(json.dumps(out))
