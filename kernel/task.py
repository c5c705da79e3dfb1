"""Task files (``kernel exec --task task.toml``): what to run, where, under which policy, and how
success is judged. Strict like policies: an unknown key or a bad value is rejected at load with
the file, the key and why (exit 11).

```toml
description = "fix the failing test"        # optional
command = ["python3", "agent.py"]             # required: the agent's argv
workspace = "ws"                              # required: relative to the task file, or absolute
policy = "default"                            # optional: profile name or path (default: default)

[[verify]]                                    # verification commands, run after the agent ends
name = "tests"                                #   unique name
argv = ["python3", "-m", "unittest", "-q"]    #   argv (argv[0] looked up on the policy's PATH)
timeout_seconds = 120                         #   optional (default 120, 1..3600)

[gate]                                        # rules turning evidence into pass/fail
agent_exit_zero = true                        # the agent must exit 0 (default true)
all_verifications_pass = true                 # every verification exits 0, none timed out (true)
no_pending_approvals = true                   # no request left waiting for review (true)
max_denials = -1                              # at most N denied requests; -1: no limit (-1)
forbid_denials = ["protected:*"]              # no denial whose rule id matches a glob ([])
```

Relative paths in the file are relative to the file's own directory.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernel.canonical import sha256_digest
from kernel.errors import BadInputError, NotFoundError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TOP_KEYS = {"description", "command", "workspace", "policy", "verify", "gate"}
VERIFY_KEYS = {"name", "argv", "timeout_seconds"}
GATE_KEYS = {"agent_exit_zero", "all_verifications_pass", "no_pending_approvals",
             "max_denials", "forbid_denials"}


class TaskError(BadInputError):
    """A task file that cannot be used: names the file, the key and why."""

    def __init__(self, file: str, key: str, why: str, *, hint: str | None = None) -> None:
        where = f"{file}: {key}" if key else file
        super().__init__(f"task error: {where}: {why}", hint=hint)
        self.file, self.key, self.why = file, key, why


@dataclass(frozen=True)
class Verification:
    name: str
    argv: tuple[str, ...]
    timeout_seconds: int = 120

    def as_record(self) -> dict[str, Any]:
        return {"name": self.name, "argv": list(self.argv),
                "timeout_seconds": self.timeout_seconds}


@dataclass(frozen=True)
class GateRules:
    agent_exit_zero: bool = True
    all_verifications_pass: bool = True
    no_pending_approvals: bool = True
    max_denials: int = -1
    forbid_denials: tuple[str, ...] = ()

    def as_record(self) -> dict[str, Any]:
        return {"agent_exit_zero": self.agent_exit_zero,
                "all_verifications_pass": self.all_verifications_pass,
                "no_pending_approvals": self.no_pending_approvals,
                "max_denials": self.max_denials, "forbid_denials": list(self.forbid_denials)}


@dataclass(frozen=True)
class Task:
    command: tuple[str, ...]
    workspace: Path
    policy: str = "default"
    description: str = ""
    verify: tuple[Verification, ...] = ()
    gate: GateRules = field(default_factory=GateRules)
    source: str = ""
    digest: str = ""
    """``sha256:`` of the task file's exact bytes."""

    def as_record(self) -> dict[str, Any]:
        return {"source": self.source, "digest": self.digest, "description": self.description,
                "command": list(self.command), "workspace": str(self.workspace),
                "policy": self.policy, "verify": [v.as_record() for v in self.verify],
                "gate": self.gate.as_record()}


def _argv(v: Any, file: str, key: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(a, str) and a for a in v):
        raise TaskError(file, key, "expected a non-empty list of non-empty strings (an argv)")
    if any("\x00" in a for a in v):
        raise TaskError(file, key, "arguments may not hold NUL bytes")
    return tuple(v)


def _unknown(d: dict[str, Any], known: set[str], file: str, prefix: str) -> None:
    for k in d:
        if k not in known:
            raise TaskError(file, f"{prefix}{k}", "unknown key",
                            hint=f"known keys here: {', '.join(sorted(known))}")


def _bool(d: dict[str, Any], k: str, default: bool, file: str, prefix: str) -> bool:
    v = d.get(k, default)
    if not isinstance(v, bool):
        raise TaskError(file, f"{prefix}{k}", f"expected true or false, got {v!r}")
    return v


def parse(raw: bytes, *, source: str, base: Path) -> Task:
    """Parse task bytes; relative paths are taken from ``base``."""
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TaskError(source, "", f"not UTF-8 (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise TaskError(source, "", f"invalid TOML: {e}") from None
    _unknown(data, TOP_KEYS, source, "")
    if "command" not in data:
        raise TaskError(source, "command", "missing: the agent's argv, e.g. [\"python3\", "
                        "\"agent.py\"]")
    command = _argv(data["command"], source, "command")
    ws = data.get("workspace")
    if not isinstance(ws, str) or not ws:
        raise TaskError(source, "workspace", "missing or not a string (a directory path)")
    policy = data.get("policy", "default")
    if not isinstance(policy, str) or not policy:
        raise TaskError(source, "policy", f"expected a profile name or path, got {policy!r}")
    if "/" in policy or policy.endswith(".toml"):
        policy = str((base / policy) if not policy.startswith("/") else Path(policy))
    desc = data.get("description", "")
    if not isinstance(desc, str):
        raise TaskError(source, "description", "expected a string")
    verify_raw = data.get("verify", [])
    if not isinstance(verify_raw, list):
        raise TaskError(source, "verify", "expected an array of tables ([[verify]])")
    verifs: list[Verification] = []
    for i, v in enumerate(verify_raw):
        key = f"verify[{i}]."
        if not isinstance(v, dict):
            raise TaskError(source, f"verify[{i}]", "expected a table")
        _unknown(v, VERIFY_KEYS, source, key)
        name = v.get("name")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise TaskError(source, f"{key}name", f"{name!r}: 1-64 of letters, digits, `._-`")
        if any(x.name == name for x in verifs):
            raise TaskError(source, f"{key}name", f"duplicate verification name {name!r}")
        if "argv" not in v:
            raise TaskError(source, f"{key}argv", "missing")
        t = v.get("timeout_seconds", 120)
        if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= 3600:
            raise TaskError(source, f"{key}timeout_seconds", f"{t!r}: an integer 1..3600")
        verifs.append(Verification(name, _argv(v["argv"], source, f"{key}argv"), t))
    g = data.get("gate", {})
    if not isinstance(g, dict):
        raise TaskError(source, "gate", "expected a table")
    _unknown(g, GATE_KEYS, source, "gate.")
    md = g.get("max_denials", -1)
    if isinstance(md, bool) or not isinstance(md, int) or md < -1:
        raise TaskError(source, "gate.max_denials", f"{md!r}: an integer >= 0, or -1 (no limit)")
    fd = g.get("forbid_denials", [])
    if not isinstance(fd, list) or not all(isinstance(x, str) and x for x in fd):
        raise TaskError(source, "gate.forbid_denials", "expected a list of rule-id globs")
    gate = GateRules(agent_exit_zero=_bool(g, "agent_exit_zero", True, source, "gate."),
                     all_verifications_pass=_bool(g, "all_verifications_pass", True, source,
                                                  "gate."),
                     no_pending_approvals=_bool(g, "no_pending_approvals", True, source,
                                                "gate."),
                     max_denials=md, forbid_denials=tuple(fd))
    return Task(command=command, workspace=Path(ws) if ws.startswith("/") else base / ws,
                policy=policy, description=desc, verify=tuple(verifs), gate=gate,
                source=source, digest=sha256_digest(raw))


def load(path: Path) -> Task:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"task file {path} does not exist") from None
    except IsADirectoryError:
        raise TaskError(str(path), "", "is a directory, not a TOML file") from None
    except OSError as e:
        raise TaskError(str(path), "", f"cannot read: {e.strerror}") from None
    return parse(raw, source=str(path), base=path.absolute().parent)
