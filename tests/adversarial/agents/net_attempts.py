"""Hostile agent: tries to reach listeners the test runs on the host, every way it can."""

import json
import socket
import sys

tcp_port, tcp6_port, udp_port, abstract_name, unix_path = sys.argv[1:6]
out = {}


def attempt(name, family, kind, addr, payload=b"agent-was-here"):
    try:
        s = socket.socket(family, kind)
    except OSError as e:
        out[name] = f"socket: errno {e.errno}"
        return
    try:
        s.settimeout(2)
        if kind == socket.SOCK_DGRAM and family != socket.AF_UNIX:
            s.sendto(payload, addr)
            out[name] = "sent"
        else:
            s.connect(addr)
            s.sendall(payload)
            out[name] = "connected"
    except OSError as e:
        out[name] = f"errno {e.errno}"
    finally:
        s.close()


attempt("tcp4", socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", int(tcp_port)))
attempt("tcp6", socket.AF_INET6, socket.SOCK_STREAM, ("::1", int(tcp6_port)))
attempt("udp4", socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", int(udp_port)))
attempt("abstract_unix", socket.AF_UNIX, socket.SOCK_STREAM, "\0" + abstract_name)
attempt("path_unix", socket.AF_UNIX, socket.SOCK_STREAM, unix_path)
attempt("netlink", getattr(socket, "AF_NETLINK", 16), socket.SOCK_RAW, (0, 0))
print(json.dumps(out))
