"""The syscall wire ABI: frame format, call names, error codes. Pure data and pure functions.

Shared by the trusted kernel and the untrusted client, so it imports the standard library only
and must stay importable by any Python 3.9+ the agent brings. The protocol is documented for
agents in other languages in ``docs/syscalls.md``.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of UTF-8 JSON holding
one object. Requests and responses alternate on the channel: one response per request, in order.
"""

from __future__ import annotations

import errno as _errno
import json
import struct
from typing import Any

VERSION = 1
HEADER = struct.Struct(">I")
MAX_FRAME = 32 * 1024 * 1024
"""Largest frame either side accepts (bytes of JSON after the 4-byte header)."""

FD_ENV = "KERNEL_SYSCALL_FD"
"""Environment variable holding the channel's file descriptor number in the agent."""
WORKSPACE_ENV = "KERNEL_WORKSPACE"
"""Environment variable holding the workspace root as the agent sees it."""
RUN_ID_ENV = "KERNEL_RUN_ID"
MANIFEST_ENV = "KERNEL_SPAWN_MANIFEST"
"""Set only in a spawned child: its signed manifest, which the client presents with
``register`` before the child's first other call."""

CALLS = ("write", "exec", "info", "spawn", "wait", "register")
"""Every call the kernel answers."""

WRITE_OPS = ("write", "create", "append", "delete", "mkdir", "rename", "chmod")
"""``write`` creates or replaces; ``create`` fails if the path exists; ``delete`` removes a file,
a symlink or an empty directory."""

# Fields each call accepts; anything else is rejected (strict fields).
CALL_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # call: (required, optional)
    "write": (("op", "path"), ("content_b64", "mode", "dest", "parents", "justification")),
    "exec": (("argv",), ("cwd", "stdin_b64", "justification")),
    "info": ((), ()),
    "spawn": (("argv",), ("budget", "justification")),
    "wait": (("child",), ("timeout_ms",)),
    "register": (("manifest",), ()),
}
REQUEST_FIELDS = ("v", "id", "call", "args")


def fields_problem(call: str, args: dict[str, Any]) -> str | None:
    """The one strict check of a request's argument names against :data:`CALL_FIELDS`: what is
    wrong (unknown names first, then missing ones), or None. Types and values are each
    call's own check."""
    required, optional = CALL_FIELDS[call]
    unknown = sorted(k for k in args if k not in required and k not in optional)
    if unknown:
        return (f"{call}: unknown field(s) {', '.join(map(repr, unknown))} ({call} accepts: "
                f"{', '.join(required + optional) or 'no arguments'})")
    missing = [k for k in required if k not in args]
    if missing:
        return f"{call}: missing field(s) {', '.join(map(repr, missing))}"
    return None

# Decisions recorded for a request.
ALLOWED = "allowed"
DENIED = "denied"


class FrameError(ValueError):
    """A frame that cannot be decoded: the message says why."""


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
"""What ``json.dumps`` with these options builds on every call, built once."""


def encode_frame(obj: dict[str, Any]) -> bytes:
    data = _ENCODER.encode(obj).encode("utf-8")
    if len(data) > MAX_FRAME:
        raise FrameError(f"frame of {len(data)} bytes exceeds the {MAX_FRAME}-byte limit")
    return HEADER.pack(len(data)) + data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):  # some key came twice: name the first one that did
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise FrameError(f"duplicate key {k!r}")
            seen.add(k)
    return out


def _no_constants(name: str) -> Any:
    raise FrameError(f"non-finite number {name} is not JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
"""What ``json.loads`` with these hooks builds on every call, built once."""


def decode_body(data: bytes) -> dict[str, Any]:
    """Decode one frame body strictly: UTF-8, one JSON object, no duplicate keys, no NaN."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FrameError(f"frame is not UTF-8 (byte {e.start})") from None
    try:
        if text.startswith("\ufeff"):  # what json.loads refuses before decoding
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        obj = _DECODER.decode(text)
    except FrameError:
        raise
    except (ValueError, RecursionError) as e:
        raise FrameError(f"frame is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise FrameError(f"frame must hold a JSON object, not {type(obj).__name__}")
    return obj


def request(call: str, args: dict[str, Any], req_id: int) -> dict[str, Any]:
    return {"v": VERSION, "id": req_id, "call": call, "args": args}


def error_name(code: int) -> str:
    return _errno.errorcode.get(code, f"E{code}")


def error_response(
    req_id: int | None,
    code: int,
    reason: str,
    *,
    rule: str | None = None,
    decision: str = DENIED,
    seq: int | None = None,
) -> dict[str, Any]:
    return {
        "v": VERSION,
        "id": req_id,
        "ok": False,
        "error": {
            "errno": code,
            "code": error_name(code),
            "reason": reason,
            "rule": rule,
            "decision": decision,
            "seq": seq,
        },
    }


def ok_response(req_id: int, result: dict[str, Any], *, seq: int | None = None) -> dict[str, Any]:
    return {"v": VERSION, "id": req_id, "ok": True, "result": result, "seq": seq}
