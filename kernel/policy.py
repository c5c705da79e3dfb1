"""Policy profiles: TOML data -> frozen dataclasses.

Every field carries a one-line ``doc``; ``docs/policy-reference.md`` is generated from these
(``python -m kernel.policy --reference``) and a test keeps the two in step. Loading is strict: an
unknown key, a value of the wrong type or out of range is a :class:`PolicyError` naming the file,
the dotted key and why. The exact bytes of the profile are kept so the run folder can store them
and every decision can be bound to their digest.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import sys
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernel.errors import PolicyError

POLICY_DIR = Path(__file__).resolve().parent.parent / "policies"
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RULE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
HEX_KEY_RE = re.compile(r"[0-9a-f]{64}")


def _f(default: Any, doc: str, **extra: Any) -> Any:
    """A dataclass field with its documentation (and optional bounds) as metadata."""
    meta = {"doc": doc, **extra}
    if isinstance(default, list | dict):
        def factory(d: Any = default) -> Any:
            return type(d)(d)

        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class SandboxPolicy:
    """How the agent and every command run for it are isolated."""

    isolation: str = _f(
        "auto",
        "Isolation backend: `native` (namespaces, Landlock, seccomp), `firejail`, or `auto` "
        "(the strongest available; the run records which).",
        choices=("native", "firejail", "auto"),
    )
    network: str = _f(
        "off",
        "Network access. Only `off` is supported: the agent has no sockets but its syscall "
        "channel; any other value is refused at load.",
        choices=("off",),
    )
    scratch_mb: int = _f(
        64, "Size of the private, writable, discarded scratch dir (`/tmp` in the sandbox), MiB.",
        min=1, max=65536,
    )
    read_paths: list[str] = _f(
        [],
        "Extra absolute host paths made visible read-only (for toolchains outside /usr). "
        "They must exist; nothing else of the host is visible.",
    )


@dataclass(frozen=True)
class Limits:
    """Resource limits; a breach kills the sandbox and the cause is recorded."""

    wall_seconds: int = _f(600, "Wall-clock limit for the whole run, seconds.", min=1, max=604800)
    cpu_seconds: int = _f(300, "CPU time limit per process (RLIMIT_CPU), seconds.", min=1,
                          max=604800)
    memory_mb: int = _f(1024, "Memory limit (cgroup where the host allows, else RLIMIT_AS), MiB.",
                        min=16, max=1048576)
    processes: int = _f(64, "Process/thread count limit (pids cgroup and RLIMIT_NPROC).", min=1,
                        max=65536)
    open_files: int = _f(256, "Open file descriptors per process (RLIMIT_NOFILE).", min=16,
                         max=1048576)
    file_size_mb: int = _f(64, "Largest file a sandboxed process may create (RLIMIT_FSIZE), MiB.",
                           min=1, max=1048576)


@dataclass(frozen=True)
class EnvPolicy:
    """Which environment variables reach the agent. Everything else is scrubbed."""

    passthrough: list[str] = _f(
        ["LANG", "LC_ALL", "TERM", "TZ"],
        "Names copied from the kernel's environment when present.",
    )
    set: dict[str, str] = _f(
        {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp"},  # noqa: S108 (sandbox view)
        "Variables set to fixed values (applied after passthrough).",
    )
    secrets: list[str] = _f(
        [],
        "Names of secrets passed to the agent from the kernel's environment; their values are "
        "redacted from everything recorded. Secrets not named here never reach the agent.",
    )


@dataclass(frozen=True)
class ProtectedPath:
    """A path glob that a `write` (or a change captured from `exec`) may not touch freely."""

    glob: str = _f(
        "",
        "Glob relative to the workspace root. `*` and `?` stay within one path component, `**` "
        "crosses them; a glob without `/` matches any single component at any depth "
        "(so `*.pem` protects `a/b/key.pem`); `dir/**` also matches `dir` itself.",
    )
    action: str = _f(
        "deny",
        "`deny`: refused. `approval`: the request waits for signed reviewer approvals "
        "(`approvals_required` of them) until `[approvals] timeout_seconds`; expiry is a denial.",
        choices=("deny", "approval"),
    )
    reason: str = _f("", "Shown to the agent and recorded with every decision this rule makes.")
    approvals_required: int = _f(1, "With `approval`: how many distinct reviewer keys must "
                                 "approve (k of the n eligible).", min=1, max=16)
    approvers: list[str] = _f([], "With `approval`: names of the reviewers (from "
                              "`[[approvals.reviewers]]` or the keyring) who may decide; empty "
                              "means every trusted reviewer.")
    operator_may_approve: bool = _f(False, "With `approval`: whether an approval by the operator "
                                    "who started the run (same uid, or one of that user's own "
                                    "reviewer keys) counts.")


@dataclass(frozen=True)
class CommandRule:
    """One allowlisted command for the `exec` syscall. Never run through a shell."""

    id: str = _f("", "Rule id, recorded with every decision (lowercase, digits, `._-`).")
    program: str = _f(
        "",
        "Program name (resolved on the sandbox PATH to an absolute path) or absolute path. The "
        "request's program must resolve to the same file.",
    )
    subcommands: list[str] = _f(
        [], "If not empty, the first argument must be one of these (e.g. `status` for git)."
    )
    deny_args: list[str] = _f(
        [], "Glob patterns (fnmatch); a request with any argument matching one is denied."
    )
    timeout_seconds: int = _f(60, "Wall-clock limit for one run of the command.", min=1,
                              max=86400)
    max_output_bytes: int = _f(1048576, "Cap on stdout and on stderr each; excess is cut off.",
                               min=0, max=1 << 30)
    approval: bool = _f(False, "Each run of this command waits for signed reviewer approvals "
                        "first (see `[approvals]`).")
    reason: str = _f("", "Why this command is allowed; recorded with decisions.")
    approvals_required: int = _f(1, "With `approval = true`: how many distinct reviewer keys "
                                 "must approve.", min=1, max=16)
    approvers: list[str] = _f([], "With `approval = true`: names of the reviewers who may "
                              "decide; empty means every trusted reviewer.")
    operator_may_approve: bool = _f(False, "With `approval = true`: whether the operator who "
                                    "started the run may approve.")


@dataclass(frozen=True)
class Quotas:
    """Budgets for the whole run; a request that would exceed one is denied."""

    syscalls: int = _f(10000, "Total syscall requests (every frame counts, denied ones too).",
                       min=1, max=1 << 40)
    bytes_written: int = _f(104857600, "Total bytes written to the workspace.", min=0,
                            max=1 << 50)
    files_written: int = _f(1000, "Total workspace entries created, changed or removed.", min=0,
                            max=1 << 40)
    exec_count: int = _f(100, "Total `exec` requests allowed.", min=0, max=1 << 40)


@dataclass(frozen=True)
class WritePolicy:
    """Bounds on paths and payloads of the `write` syscall."""

    max_path_bytes: int = _f(1024, "Longest accepted path, bytes (UTF-8).", min=16, max=4096)
    max_component_bytes: int = _f(255, "Longest accepted path component, bytes.", min=1, max=255)
    max_file_bytes: int = _f(16777216, "Largest single file a write may produce, bytes.", min=0,
                             max=1 << 40)


@dataclass(frozen=True)
class Reviewer:
    """A trusted reviewer: a name and an Ed25519 public key (`kernel keys export` prints one)."""

    name: str = _f("", "Reviewer name, shown to operators and recorded with their decisions.")
    public_key: str = _f("", "Raw Ed25519 public key, 64 lowercase hex digits.")


@dataclass(frozen=True)
class ApprovalsPolicy:
    """Who may approve protected actions, and how long a request waits."""

    timeout_seconds: int = _f(900, "How long a pending request waits for reviewers; then it "
                              "expires (a recorded denial).", min=1, max=604800)
    keyring: str = _f("", "Optional keyring file of more trusted reviewers (TOML with "
                      "`[[reviewers]]` tables). A relative path is relative to the profile's "
                      "directory; a leading `$KERNEL_HOME/` means the kernel home. Its bytes are "
                      "recorded in the run folder. A missing file adds no reviewer.")
    reviewers: list[Reviewer] = _f([], "Trusted reviewers listed inline, "
                                   "`[[approvals.reviewers]]`.")


@dataclass(frozen=True)
class GatePolicy:
    """Gate rules for every run under this profile, on top of a task's (stricter wins)."""

    agent_exit_zero: bool = _f(False, "The agent must exit 0.")
    all_verifications_pass: bool = _f(False, "Every verification command of the task must pass.")
    no_pending_approvals: bool = _f(False, "No request may be left waiting for review.")
    max_denials: int = _f(-1, "At most this many denied requests; -1: no limit.", min=-1,
                          max=1 << 40)
    forbid_denials: list[str] = _f([], "No denial whose rule id matches one of these globs "
                                   "(fnmatch), e.g. `protected:*`.")

    def active(self) -> bool:
        return (self.agent_exit_zero or self.all_verifications_pass
                or self.no_pending_approvals or self.max_denials >= 0
                or bool(self.forbid_denials))


SPAWN_METRICS = ("denials", "requests", "bytes_written", "files_written", "exec_count",
                 "spawns", "live", "expired")
"""What a spawn stop condition may test (see ``kernel/replication.py``)."""


@dataclass(frozen=True)
class StopRule:
    """A stop condition: when it holds, no more children are spawned (with `kill_tree`, \
the whole tree is ended)."""

    when: str = _f("", "A predicate `METRIC OP N`: METRIC one of " + ", ".join(
        f"`{m}`" for m in SPAWN_METRICS) + "; OP one of `>=`, `>`, `==`; N a non-negative integer. "
        "Metrics count over the whole tree (e.g. `denials >= 5`, `bytes_written > 1048576`).")
    kill_tree: bool = _f(False, "Also end every agent of the tree when the condition holds "
                         "(recorded in each folder).")


@dataclass(frozen=True)
class SpawnPolicy:
    """The replication contract: how an agent may start child agents with `spawn`."""

    max_depth: int = _f(0, "Deepest generation allowed below the agent `kernel exec` started "
                        "(its children are depth 1); 0 refuses every spawn.", min=0, max=64)
    max_replicas: int = _f(0, "Children alive at once across the whole tree.", min=0,
                           max=4096)
    max_spawns: int = _f(0, "Children started in total across the whole tree.", min=0,
                         max=1 << 20)
    cooldown_seconds: int = _f(0, "Least time between two spawns of one parent, seconds.",
                               min=0, max=86400)
    expiration_seconds: int = _f(300, "A child is killed this long after it was spawned "
                                 "(recorded in its folder and its parent's).", min=1,
                                 max=604800)
    stop: list[StopRule] = _f([], "Stop conditions, `[[spawn.stop]]`, evaluated at every "
                              "spawn and continuously while the tree runs.")


@dataclass(frozen=True)
class Policy:
    """A whole profile. ``raw`` and ``digest`` identify the exact bytes the run used."""

    description: str = _f("", "What this profile is for (required).")
    sandbox: SandboxPolicy = _f(SandboxPolicy(), "Isolation.")
    limits: Limits = _f(Limits(), "Resource limits.")
    env: EnvPolicy = _f(EnvPolicy(), "Environment.")
    protected: list[ProtectedPath] = _f([], "Protected path rules, `[[protected]]`.")
    commands: list[CommandRule] = _f([], "Command allowlist, `[[commands]]`.")
    quotas: Quotas = _f(Quotas(), "Quotas.")
    write: WritePolicy = _f(WritePolicy(), "Write bounds.")
    approvals: ApprovalsPolicy = _f(ApprovalsPolicy(), "Approvals.")
    gate: GatePolicy = _f(GatePolicy(), "Gate rules for every run under this profile.")
    spawn: SpawnPolicy = _f(SpawnPolicy(), "Replication contract for `spawn`.")
    keyring_reviewers: tuple[Reviewer, ...] = field(default=(), metadata={"internal": True})
    """Reviewers read from ``approvals.keyring`` when the run starts (recorded as a blob)."""
    keyring_source: str = field(default="", metadata={"internal": True})
    keyring_raw: bytes | None = field(default=None, metadata={"internal": True}, repr=False)
    name: str = field(default="", metadata={"internal": True})
    source: str = field(default="", metadata={"internal": True})
    raw: bytes = field(default=b"", metadata={"internal": True}, repr=False)

    @functools.cached_property
    def digest(self) -> str:
        """``sha256:<hex>`` of the exact profile bytes (computed once: read per decision)."""
        return "sha256:" + hashlib.sha256(self.raw).hexdigest()

    def trusted_reviewers(self) -> tuple[Reviewer, ...]:
        """Inline reviewers, then the keyring's (first entry of a name or key wins)."""
        out: list[Reviewer] = []
        names: set[str] = set()
        keys: set[str] = set()
        for r in (*self.approvals.reviewers, *self.keyring_reviewers):
            if r.name in names or r.public_key in keys:
                continue
            names.add(r.name)
            keys.add(r.public_key)
            out.append(r)
        return tuple(out)


def _public_fields(cls: type) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _convert(value: Any, tp: Any, key: str, meta: Mapping[str, Any], file: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise PolicyError(file, key, f"expected a table, got {type(value).__name__}")
        return _build(typing.cast(type, tp), value, key, file)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise PolicyError(file, key, f"expected a list, got {type(value).__name__}")
        return [_convert(v, item_tp, f"{key}[{i}]", {}, file) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise PolicyError(file, key, f"expected a table, got {type(value).__name__}")
        out = {}
        for k, v in value.items():
            if not isinstance(v, str):
                raise PolicyError(file, f"{key}.{k}", "expected a string")
            out[k] = v
        return out
    if tp is bool:
        if not isinstance(value, bool):
            raise PolicyError(file, key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PolicyError(file, key, f"expected an integer, got {value!r}")
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and value < lo:
            raise PolicyError(file, key, f"{value} is below the minimum {lo}")
        if hi is not None and value > hi:
            raise PolicyError(file, key, f"{value} is above the maximum {hi}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise PolicyError(file, key, f"expected a string, got {value!r}")
        choices = meta.get("choices")
        if choices and value not in choices:
            raise PolicyError(file, key, f"{value!r} is not one of {', '.join(choices)}")
        return value
    raise PolicyError(file, key, f"unsupported type {tp}")  # pragma: no cover - schema bug


def _build(cls: type, data: Mapping[str, Any], prefix: str, file: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in _public_fields(cls)}
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in known:
            raise PolicyError(file, key, "unknown key",
                              hint=f"known keys here: {', '.join(sorted(known))}")
        kwargs[k] = _convert(v, hints[k], key, known[k].metadata, file)
    return cls(**kwargs)


def _validate(p: Policy, file: str) -> None:
    if not p.description.strip():
        raise PolicyError(file, "description", "missing: every profile says what it is for")
    for i, name in enumerate([*p.env.passthrough, *p.env.secrets, *p.env.set]):
        if not ENV_NAME_RE.match(name):
            raise PolicyError(file, "env", f"{name!r} is not a valid variable name")
        del i
    for name in p.env.set:
        if name == "KERNEL_SYSCALL_FD" or name.startswith("KERNEL_"):
            raise PolicyError(file, f"env.set.{name}", "KERNEL_* variables are the kernel's own")
    for rp in p.sandbox.read_paths:
        if not rp.startswith("/"):
            raise PolicyError(file, "sandbox.read_paths", f"{rp!r} is not an absolute path")
    for i, pr in enumerate(p.protected):
        key = f"protected[{i}].glob"
        if not pr.glob or pr.glob.startswith("/") or "\x00" in pr.glob:
            raise PolicyError(file, key, f"{pr.glob!r}: a non-empty glob relative to the root")
        if any(part == ".." for part in pr.glob.split("/")):
            raise PolicyError(file, key, f"{pr.glob!r}: `..` has no meaning in a protected glob")
    rnames: set[str] = set()
    for i, r in enumerate(p.approvals.reviewers):
        key = f"approvals.reviewers[{i}]"
        if not RULE_ID_RE.match(r.name):
            raise PolicyError(file, f"{key}.name", f"{r.name!r}: lowercase letters, digits, `._-`")
        if r.name in rnames:
            raise PolicyError(file, f"{key}.name", f"duplicate reviewer {r.name!r}")
        rnames.add(r.name)
        if not HEX_KEY_RE.fullmatch(r.public_key):
            raise PolicyError(file, f"{key}.public_key",
                              "expected 64 lowercase hex digits (a raw Ed25519 public key)")
    seen: set[str] = set()
    for i, c in enumerate(p.commands):
        key = f"commands[{i}]"
        if not RULE_ID_RE.match(c.id):
            raise PolicyError(file, f"{key}.id", f"{c.id!r}: lowercase letters, digits, `._-`")
        if c.id in seen:
            raise PolicyError(file, f"{key}.id", f"duplicate command id {c.id!r}")
        seen.add(c.id)
        if not c.program or "\x00" in c.program or (
            "/" in c.program and not c.program.startswith("/")
        ):
            raise PolicyError(file, f"{key}.program",
                              f"{c.program!r}: a program name or an absolute path")
    from kernel.replication import contract_of  # replication builds on this module

    contract_of(p.spawn, file)  # a bad stop condition is a PolicyError naming its key


def load_bytes(raw: bytes, *, source: str, name: str = "") -> Policy:
    """Parse and validate profile bytes. ``source`` names the file in error messages."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError(source, "", f"not UTF-8 (byte {e.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(source, "", f"invalid TOML: {e}") from None
    built = _build(Policy, data, "", source)
    policy: Policy = dataclasses.replace(
        built, name=name or Path(source).stem, source=source, raw=raw
    )
    _validate(policy, source)
    return policy


def resolve_profile(name_or_path: str) -> Path:
    """A profile name (``default``) found in ``policies/``, or a path to a TOML file."""
    if "/" not in name_or_path and not name_or_path.endswith(".toml"):
        candidate = POLICY_DIR / f"{name_or_path}.toml"
        if not candidate.is_file():
            known = sorted(p.stem for p in POLICY_DIR.glob("*.toml"))
            raise PolicyError(str(candidate), "", "no such profile",
                              hint=f"known profiles: {', '.join(known)}; or give a path")
        return candidate
    return Path(name_or_path)


def load(name_or_path: str) -> Policy:
    """Load a profile by name or path; every failure is a :class:`PolicyError`."""
    path = resolve_profile(name_or_path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PolicyError(str(path), "", "file not found") from None
    except IsADirectoryError:
        raise PolicyError(str(path), "", "is a directory, not a TOML file") from None
    except OSError as e:
        raise PolicyError(str(path), "", f"cannot read: {e.strerror}") from None
    return load_bytes(raw, source=str(path), name=path.stem)


def reference_markdown() -> str:
    """The policy reference page, generated from the field docs above."""
    lines = [
        "# Policy reference",
        "",
        "<!-- Generated by `python -m kernel.policy --reference`; a test keeps it in step. -->",
        "",
        "A profile is a TOML file in `policies/` (chosen by name) or anywhere (chosen by path).",
        "Unknown keys and bad values are rejected at load, naming the file, the key and why.",
        "The exact bytes are copied into each run folder; their SHA-256 digest is bound into",
        "every recorded decision.",
        "",
    ]

    def section(cls: type, title: str) -> None:
        lines.append(f"## `{title}`")
        lines.append("")
        lines.append((cls.__doc__ or "").strip())
        lines.append("")
        lines.append("| key | type | default | meaning |")
        lines.append("|---|---|---|---|")
        hints = typing.get_type_hints(cls)
        for f in _public_fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp) or (typing.get_origin(tp) is list and \
                    dataclasses.is_dataclass(typing.get_args(tp)[0])):
                continue
            default = f.default_factory() if callable(f.default_factory) else f.default
            tname = getattr(tp, "__name__", str(tp)).replace("|", "or")
            if isinstance(tp, types.GenericAlias):
                tname = str(tp)
            doc = f.metadata["doc"]
            bounds = []
            if "min" in f.metadata:
                bounds.append(f"{f.metadata['min']}..{f.metadata['max']}")
            if "choices" in f.metadata:
                bounds.append(" / ".join(f"`{c}`" for c in f.metadata["choices"]))
            extra = f" ({'; '.join(bounds)})" if bounds else ""
            dflt = tomlish(default)
            lines.append(f"| `{f.name}` | {tname} | `{dflt}` | {doc}{extra} |")
        lines.append("")

    section(Policy, "top level")
    section(SandboxPolicy, "[sandbox]")
    section(Limits, "[limits]")
    section(EnvPolicy, "[env]")
    section(ProtectedPath, "[[protected]]")
    section(CommandRule, "[[commands]]")
    section(Quotas, "[quotas]")
    section(WritePolicy, "[write]")
    section(ApprovalsPolicy, "[approvals]")
    section(Reviewer, "[[approvals.reviewers]]")
    section(GatePolicy, "[gate]")
    section(SpawnPolicy, "[spawn]")
    section(StopRule, "[[spawn.stop]]")
    return "\n".join(lines).rstrip() + "\n"


def tomlish(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v + '"'
    if isinstance(v, list):
        return "[" + ", ".join(tomlish(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {tomlish(x)}" for k, x in v.items()) + " }"
    return str(v)


if __name__ == "__main__":  # pragma: no cover - developer tool
    if sys.argv[1:] == ["--reference"]:
        sys.stdout.write(reference_markdown())
    else:
        sys.stderr.write("usage: python -m kernel.policy --reference\n")
        sys.exit(2)
