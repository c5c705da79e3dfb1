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
    child = k.spawn(["python3", "helper.py"], budget={"syscalls": 100})["child"]
    print(k.wait(child)["status"])

In a spawned child (``KERNEL_SPAWN_MANIFEST`` is set) the connection presents the child's signed
manifest with ``register`` before its first other call; nothing needs to be done by hand.

A denial raises :class:`SyscallError`, an ``OSError`` carrying the errno, the id of the rule that
decided and its reason. The wire protocol is in docs/syscalls.md; this module is one client of it.
"""

from __future__ import annotations

import base64
import os
import socket
from collections.abc import Mapping, Sequence
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


BUDGET_FIELDS = ("syscalls", "bytes_written", "files_written", "exec_count")
"""The quotas a ``spawn`` budget may name (each a non-negative integer)."""


class Kernel:
    """A connection to the kernel over the inherited channel.

    ``manifest`` is a spawned child's signed manifest (:meth:`from_env` takes it from
    ``KERNEL_SPAWN_MANIFEST``). When one is given, the connection sends ``register`` with it
    exactly once, before its first other call; if the kernel refuses it, that first call raises
    the refusal as :class:`SyscallError` (rule ``spawn.manifest.*``) and later calls are sent
    unregistered, which the kernel denies (rule ``spawn.unregistered``).
    """

    def __init__(self, sock: socket.socket, *, manifest: str | None = None) -> None:
        self._sock = sock
        self._rbuf = bytearray()  # bytes received and not yet consumed
        self._next_id = 1
        self._manifest = manifest
        self._register_pending = manifest is not None
        self.registration: dict[str, Any] | None = None
        """The kernel's answer to ``register`` (child, parent, root, depth, budget,
        expires_ns) once the manifest was accepted; None before, and for the root agent."""

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
        return cls(sock, manifest=os.environ.get(abi.MANIFEST_ENV) or None)

    def close(self) -> None:
        self._sock.close()

    # -- transport ---------------------------------------------------------------------------

    def _recv_exact(self, n: int) -> bytes:
        # Reads ahead (a response's header and body usually arrive in one recv); what is read
        # beyond ``n`` stays in the buffer for the next call.
        buf = self._rbuf
        while len(buf) < n:
            chunk = self._sock.recv(max(n - len(buf), 65536))
            if not chunk:
                raise ChannelError("the kernel closed the syscall channel")
            buf += chunk
        data = bytes(buf[:n])
        del buf[:n]
        return data

    def call(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return its result; raise SyscallError on a denial.

        A connection holding a manifest registers first (see :class:`Kernel`)."""
        if name == "register":
            self._register_pending = False
        elif self._register_pending:
            self.register()
        return self._call(name, args)

    def _call(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
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
        """Run id, policy summary, remaining quotas and the ``spawn`` part (depth, lineage,
        contract, spawns left, own children)."""
        return self.call("info", {})

    # -- spawn, wait, register ---------------------------------------------------------------

    def spawn(self, argv: Sequence[str], budget: Mapping[str, int] | None = None,
              justification: str | None = None) -> dict[str, Any]:
        """Start a child agent running ``argv`` in its own sandbox, under the policy's
        ``[spawn]`` contract. ``budget`` names any of :data:`BUDGET_FIELDS`; a field left out
        gives the child this agent's whole remainder of it (an empty ``budget`` is sent as
        none). Returns ``{"child": RUN_ID,
        "depth", "budget", "expires_ns", "manifest_digest"}``."""
        args: dict[str, Any] = {"argv": list(argv)}
        if budget:
            args["budget"] = dict(budget)
        if justification is not None:
            args["justification"] = justification
        return self.call("spawn", args)

    def wait(self, child: str, timeout_ms: int | None = None) -> dict[str, Any]:
        """Block until ``child`` (one of this agent's own children) has ended and its folder
        is sealed, or ``timeout_ms`` has passed. Returns ``{"child", "status", "exit_code",
        "seal", "requests", "denials", "timed_out"}``; on a timeout ``status`` is
        ``"running"`` and ``seal`` is None. A child always ends, at the latest when it
        expires."""
        args: dict[str, Any] = {"child": child}
        if timeout_ms is not None:
            args["timeout_ms"] = timeout_ms
        return self.call("wait", args)

    def register(self) -> dict[str, Any]:
        """Present this connection's manifest now (normally done by the first call). Raises
        :class:`SyscallError` if the kernel refuses it, and ValueError if the connection has
        no manifest (the root agent never registers)."""
        if self._manifest is None:
            raise ValueError(f"no manifest to register: {abi.MANIFEST_ENV} is not set")
        self._register_pending = False  # once per connection, whatever the answer
        result = self._call("register", {"manifest": self._manifest})
        self.registration = result
        return result
