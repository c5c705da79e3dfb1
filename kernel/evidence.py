"""The facts a decision used, as recorded data, and back: what makes ``kernel replay`` exact.

``check_write`` and ``check_exec`` are pure, but their requests carry facts that ``prepare``
gathered from the filesystem (is the target a file, how big, is a component a symlink; where
``argv[0]`` resolves on the sandbox PATH). The kernel records those facts, with the quota usage
the check saw, in the decision event (``facts``), so that replay can rebuild the very same
request object and call the very same function, with no filesystem, clock or environment.

Record shapes (all JSON, canonical in the log)::

    path facts:  {"rel", "exists", "kind", "size", "violation": [rule, reason, errno] | null}
    write facts: {"kind": "write", "op", "target": <path facts>, "dest": <path facts> | null,
                  "new_size", "payload_bytes", "mode", "captured", "parents", "usage"}
    exec facts:  {"kind": "exec", "argv", "resolved", "candidates", "cwd": <path facts>,
                  "usage"}
    usage:       {"syscalls", "bytes_written", "files_written", "exec_count"}
"""

from __future__ import annotations

from typing import Any

from kernel.decide import ExecRequest, PathFacts, Usage, WriteRequest


def usage_record(u: Usage) -> dict[str, int]:
    return {"syscalls": u.syscalls, "bytes_written": u.bytes_written,
            "files_written": u.files_written, "exec_count": u.exec_count}


def usage_from(d: Any) -> Usage:
    _need_dict(d, "usage")
    return Usage(syscalls=_int(d, "syscalls"), bytes_written=_int(d, "bytes_written"),
                 files_written=_int(d, "files_written"), exec_count=_int(d, "exec_count"))


def path_record(f: PathFacts) -> dict[str, Any]:
    return {"rel": f.rel, "exists": f.exists, "kind": f.kind, "size": f.size,
            "violation": list(f.violation) if f.violation is not None else None}


def path_from(d: Any) -> PathFacts:
    _need_dict(d, "path facts")
    v = d.get("violation")
    violation: tuple[str, str, int] | None = None
    if v is not None:
        if (not isinstance(v, list) or len(v) != 3 or not isinstance(v[0], str)
                or not isinstance(v[1], str) or type(v[2]) is not int):
            raise ValueError(f"path facts: bad violation {v!r}")
        violation = (v[0], v[1], v[2])
    rel, kind = d.get("rel"), d.get("kind")
    if not isinstance(rel, str) or not isinstance(kind, str) or not isinstance(
            d.get("exists"), bool):
        raise ValueError(f"path facts: bad rel/kind/exists in {d!r}")
    return PathFacts(rel=rel, exists=d["exists"], kind=kind, size=_int(d, "size"),
                     violation=violation)


def write_facts(req: WriteRequest, usage: Usage) -> dict[str, Any]:
    return {"kind": "write", "op": req.op, "target": path_record(req.target),
            "dest": path_record(req.dest) if req.dest is not None else None,
            "new_size": req.new_size, "payload_bytes": req.payload_bytes, "mode": req.mode,
            "captured": req.captured, "parents": req.parents, "usage": usage_record(usage)}


def exec_facts(req: ExecRequest, usage: Usage) -> dict[str, Any]:
    return {"kind": "exec", "argv": list(req.argv), "resolved": req.resolved,
            "candidates": dict(sorted(req.candidates.items())), "cwd": path_record(req.cwd),
            "usage": usage_record(usage)}


def request_from(facts: Any) -> tuple[WriteRequest | ExecRequest, Usage]:
    """Rebuild the request object and the usage the check saw. Raises ValueError if malformed."""
    _need_dict(facts, "facts")
    usage = usage_from(facts.get("usage"))
    if facts.get("kind") == "write":
        op = facts.get("op")
        mode = facts.get("mode")
        if not isinstance(op, str) or (mode is not None and type(mode) is not int):
            raise ValueError("write facts: bad op or mode")
        for k in ("captured", "parents"):
            if not isinstance(facts.get(k), bool):
                raise ValueError(f"write facts: {k} must be true or false")
        dest = facts.get("dest")
        return WriteRequest(op=op, target=path_from(facts.get("target")),
                            dest=path_from(dest) if dest is not None else None,
                            new_size=_int(facts, "new_size"),
                            payload_bytes=_int(facts, "payload_bytes"), mode=mode,
                            captured=facts["captured"], parents=facts["parents"]), usage
    if facts.get("kind") == "exec":
        argv, resolved, cands = facts.get("argv"), facts.get("resolved"), facts.get("candidates")
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise ValueError("exec facts: argv must be a list of strings")
        if resolved is not None and not isinstance(resolved, str):
            raise ValueError("exec facts: resolved must be a string or null")
        if not isinstance(cands, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in cands.items()):
            raise ValueError("exec facts: candidates must map rule ids to paths")
        return ExecRequest(argv=tuple(argv), resolved=resolved, candidates=dict(cands),
                           cwd=path_from(facts.get("cwd"))), usage
    raise ValueError(f"facts: unknown kind {facts.get('kind')!r}")


def _need_dict(d: Any, what: str) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be an object, got {type(d).__name__}")


def _int(d: dict[str, Any], k: str) -> int:
    v = d.get(k)
    if type(v) is not int:
        raise ValueError(f"{k} must be an integer, got {v!r}")
    return v
