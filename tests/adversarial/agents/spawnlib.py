"""What the spawn test agents share; copied into the workspace beside them.

``call`` and friends go through the client (which registers a child's manifest before its first
other call) and return denials as data; ``Raw`` speaks the channel frame by frame, so that an
agent sends exactly what it wrote (a forged ``register``, pipelined requests) and nothing else.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from syscalls import abi
from syscalls.client import Kernel, SyscallError


def connect() -> Kernel:
    return Kernel.from_env()


def call(k: Kernel, name: str, args: dict[str, Any]) -> dict[str, Any]:
    """One call through the client: ``{"ok": True, "result": ...}`` or the denial."""
    try:
        return {"ok": True, "result": k.call(name, args)}
    except SyscallError as e:
        return {"ok": False, "errno": e.errno, "rule": e.rule, "reason": e.reason}


def spawn(k: Kernel, argv: list[str], budget: dict[str, int] | None = None,
          justification: str | None = None) -> dict[str, Any]:
    args: dict[str, Any] = {"argv": list(argv)}
    if budget is not None:
        args["budget"] = budget
    if justification is not None:
        args["justification"] = justification
    return call(k, "spawn", args)


def wait(k: Kernel, child: str, timeout_ms: int | None = None) -> dict[str, Any]:
    args: dict[str, Any] = {"child": child}
    if timeout_ms is not None:
        args["timeout_ms"] = timeout_ms
    return call(k, "wait", args)


def save(k: Kernel, name: str, obj: object) -> None:
    """Write ``obj`` as JSON into the workspace (through the kernel)."""
    k.write(name, (json.dumps(obj, sort_keys=True) + "\n").encode())


def report(name: str, value: object) -> None:
    print("RESULT " + json.dumps({name: value}), flush=True)


class Raw:
    """The syscall channel spoken directly: nothing is sent that the agent did not write (in
    particular no automatic ``register``)."""

    def __init__(self) -> None:
        self.sock = socket.socket(fileno=int(os.environ[abi.FD_ENV]))
        self.next_id = 1

    def send(self, name: str, args: dict[str, Any]) -> int:
        rid = self.next_id
        self.next_id += 1
        self.sock.sendall(abi.encode_frame(abi.request(name, args, rid)))
        return rid

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the kernel closed the channel")
            buf += chunk
        return buf

    def recv(self) -> dict[str, Any]:
        """The next answer: ``{"id", "ok": True, "result"}`` or ``{"id", "ok": False, "errno",
        "rule", "reason"}``."""
        (size,) = abi.HEADER.unpack(self._exact(abi.HEADER.size))
        resp = abi.decode_body(self._exact(size))
        if resp.get("ok"):
            return {"id": resp.get("id"), "ok": True, "result": resp.get("result")}
        err = resp.get("error") or {}
        return {"id": resp.get("id"), "ok": False, "errno": err.get("errno"),
                "rule": err.get("rule"), "reason": err.get("reason")}

    def call(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        self.send(name, args)
        return self.recv()
