"""The agent's side of the syscall channel. UNTRUSTED: imports the standard library and abi only.

Agent code imports this module to change its workspace::

    from syscalls.client import Kernel, SyscallError
    k = Kernel.from_env()
    k.write("notes.txt", b"hello\\n")
    try:
        k.write("/etc/passwd", b"x")
    except SyscallError as e:
        print(e.errno, e.rule, e.reason)
    r = k.exec(["ls", "-l"])
    print(r.exit_code, r.stdout)

A denial raises :class:`SyscallError`, an ``OSError`` carrying the errno, the id of the rule that
decided and its reason. The wire protocol is in docs/syscalls.md; this module is one client of it.
"""

from __future__ import annotations

import base64
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from syscalls import abi


class SyscallError(OSError):
    """A request the kernel denied or could not carry out."""

    def __init__(self, code: int, reason: str, *, rule: str | None = None,
                 decision: str = abi.DENIED, filename: str | None = None,
                 seq: int | None = None) -> None:
        super().__init__(code, reason, filename)
        self.rule = rule
        self.reason = reason
        self.decision = decision
        self.seq = seq

    def __str__(self) -> str:
        where = f" [{self.filename}]" if self.filename else ""
        rule = f" (rule {self.rule})" if self.rule else ""
        return f"{abi.error_name(self.errno or 0)}: {self.reason}{rule}{where}"


class ChannelError(ConnectionError):
    """The channel to the kernel is missing, closed or speaking nonsense."""


@dataclass
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    changes: list[dict[str, Any]] = field(default_factory=list)
    """Each file change the command made: ``{op, path, decision, rule, reason}``. Denied
    changes were not applied to the workspace."""


class Kernel:
    """A connection to the kernel over the inherited channel."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._next_id = 1

    @classmethod
    def from_env(cls) -> Kernel:
        raw = os.environ.get(abi.FD_ENV)
        if raw is None or not raw.isdigit():
            raise ChannelError(f"no syscall channel: {abi.FD_ENV} is not set; "
                               "this program must run under `kernel exec`")
        try:
            sock = socket.socket(fileno=int(raw))
        except OSError as e:
            raise ChannelError(f"syscall channel fd {raw} is not usable: {e}") from None
        return cls(sock)

    def close(self) -> None:
        self._sock.close()

    # -- transport ---------------------------------------------------------------------------

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                raise ChannelError("the kernel closed the syscall channel")
            buf += chunk
        return bytes(buf)

    def call(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return its result; raise SyscallError on a denial."""
        req_id = self._next_id
        self._next_id += 1
        self._sock.sendall(abi.encode_frame(abi.request(name, args, req_id)))
        (size,) = abi.HEADER.unpack(self._recv_exact(abi.HEADER.size))
        if size > abi.MAX_FRAME:
            raise ChannelError(f"response of {size} bytes exceeds the frame limit")
        try:
            resp = abi.decode_body(self._recv_exact(size))
        except abi.FrameError as e:
            raise ChannelError(f"bad response from the kernel: {e}") from None
        if resp.get("id") != req_id:
            raise ChannelError(f"response for request {resp.get('id')}, expected {req_id}")
        if resp.get("ok"):
            result = resp.get("result")
            return result if isinstance(result, dict) else {}
        err = resp.get("error") or {}
        raise SyscallError(int(err.get("errno") or 0), str(err.get("reason") or "denied"),
                           rule=err.get("rule"), decision=str(err.get("decision") or "denied"),
                           filename=args.get("path") if isinstance(args.get("path"), str)
                           else None, seq=err.get("seq"))

    # -- write -------------------------------------------------------------------------------

    def _write(self, op: str, path: str, **extra: Any) -> dict[str, Any]:
        args: dict[str, Any] = {"op": op, "path": path}
        args.update({k: v for k, v in extra.items() if v is not None})
        return self.call("write", args)

    def write(self, path: str, data: bytes, *, mode: int | None = None,
              justification: str | None = None) -> dict[str, Any]:
        """Create or replace ``path`` with ``data`` (atomically)."""
        return self._write("write", path, content_b64=base64.b64encode(data).decode(),
                           mode=mode, justification=justification)

    def create(self, path: str, data: bytes, *, mode: int | None = None) -> dict[str, Any]:
        """Create ``path``; fails with EEXIST if it exists."""
        return self._write("create", path, content_b64=base64.b64encode(data).decode(),
                           mode=mode)

    def append(self, path: str, data: bytes) -> dict[str, Any]:
        return self._write("append", path, content_b64=base64.b64encode(data).decode())

    def delete(self, path: str) -> dict[str, Any]:
        """Remove a file, a symlink or an empty directory."""
        return self._write("delete", path)

    def mkdir(self, path: str, *, parents: bool = False, mode: int | None = None
              ) -> dict[str, Any]:
        return self._write("mkdir", path, parents=parents or None, mode=mode)

    def rename(self, path: str, dest: str) -> dict[str, Any]:
        return self._write("rename", path, dest=dest)

    def chmod(self, path: str, mode: int) -> dict[str, Any]:
        return self._write("chmod", path, mode=mode)

    # -- exec, info --------------------------------------------------------------------------

    def exec(self, argv: Sequence[str], *, cwd: str | None = None,
             stdin: bytes | None = None, justification: str | None = None) -> ExecResult:
        """Run an allowlisted command in a fresh sandbox; its file changes are checked like
        writes before they reach the workspace."""
        args: dict[str, Any] = {"argv": list(argv)}
        if cwd is not None:
            args["cwd"] = cwd
        if stdin is not None:
            args["stdin_b64"] = base64.b64encode(stdin).decode()
        if justification is not None:
            args["justification"] = justification
        r = self.call("exec", args)
        return ExecResult(
            exit_code=int(r.get("exit_code", -1)),
            stdout=base64.b64decode(r.get("stdout_b64", "")),
            stderr=base64.b64decode(r.get("stderr_b64", "")),
            timed_out=bool(r.get("timed_out")),
            stdout_truncated=bool(r.get("stdout_truncated")),
            stderr_truncated=bool(r.get("stderr_truncated")),
            changes=list(r.get("changes") or []),
        )

    def info(self) -> dict[str, Any]:
        """Run id, policy summary and remaining quotas."""
        return self.call("info", {})
