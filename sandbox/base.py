"""What every isolation backend takes and returns: the contract between the kernel and sandboxes.

A backend turns a :class:`SandboxSpec` into a running, isolated process tree and reports what it
actually enforced. Every backend must give every guarantee of SPEC §4 (the tests check each one
on each backend); a backend that cannot must refuse in :meth:`Backend.probe` (fail closed,
nothing runs), never run with less.

The agent's view of the filesystem, common to all backends:

* the system directories needed to run programs (``/usr``, ``/bin``, ``/lib*``, ``/sbin``, a
  curated ``/etc``), read-only;
* the workspace at its host path (``SandboxSpec.workspace_view``), read-only for the agent; an
  ``exec``'d command instead gets a private, writable copy bound at the same view path, whose
  changes the kernel captures afterwards;
* ``SandboxSpec.read_paths`` read-only at their host paths (the client bundle, toolchains);
* a private, size-limited, discarded scratch dir at ``/tmp`` (and ``HOME`` points there);
* a fresh ``/proc`` of its own pid namespace (or none), a minimal ``/dev`` (null, zero, full,
  random, urandom, tty absent);
* nothing else: no host ``/tmp``, ``/run``, ``/var``, ``/home``, ``/root``, ``/dev/shm``, ``/sys``;
* every path in ``SandboxSpec.hidden`` (the runs dir, the kernel's key dir when they lie inside
  the workspace) invisible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kernel.policy import Limits


@dataclass(frozen=True)
class SandboxSpec:
    """Everything a backend needs to start one sandboxed process tree."""

    argv: tuple[str, ...]
    """Program and arguments. ``argv[0]`` is an absolute path (the kernel resolves it)."""
    workspace: Path
    """Host directory mounted at ``workspace_view``: the real workspace (read-only) for the
    agent, or a private copy (writable) for an ``exec``'d command."""
    workspace_view: Path
    """Absolute path at which the workspace appears inside the sandbox."""
    workspace_writable: bool
    cwd: Path
    """Working directory inside the sandbox (absolute; at or under ``workspace_view``)."""
    env: Mapping[str, str]
    """The complete environment of the sandboxed program; nothing else is inherited."""
    limits: Limits
    scratch_bytes: int
    """Size cap of the writable scratch dir mounted at ``/tmp``."""
    pass_fds: tuple[int, ...] = ()
    """Descriptors kept open, at the same numbers (the syscall channel). All others close."""
    stdin: int | None = None
    """Descriptor for the program's stdin; ``None`` means ``/dev/null``."""
    stdout: int | None = None
    """Descriptor for stdout; ``None`` means ``/dev/null``. Never a terminal (TIOCSTI)."""
    stderr: int | None = None
    hidden: tuple[Path, ...] = ()
    """Host paths that must be invisible even when they lie under a visible path."""
    read_paths: tuple[Path, ...] = ()
    """Extra host paths visible read-only at the same path."""
    wall_seconds: float | None = None
    """Wall-clock cap the backend enforces itself if it can (the kernel enforces it too)."""


@dataclass
class Availability:
    """Result of probing a backend on this host."""

    available: bool
    missing: list[str] = field(default_factory=list)
    """Human-readable list of what is missing (``"firejail binary not found on PATH"``)."""
    facts: dict[str, Any] = field(default_factory=dict)
    """What the host offers (kernel release, Landlock ABI, cgroup version...), recorded."""


class Sandboxed(Protocol):
    """A started sandbox: one process tree, observed and ended from the kernel."""

    pid: int
    """Host pid of the process the kernel waits for."""
    enforced: dict[str, Any]
    """What was actually enforced (backend, namespaces, Landlock ABI, seccomp filter digest,
    limits, cgroup paths...). Recorded in the run folder as is: JSON-serializable, ints and
    strings only (no floats)."""

    def poll(self) -> int | None:
        """The exit status once ended (``-N`` for death by signal N), else ``None``. Never
        blocks."""
        ...

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait up to ``timeout`` seconds; like :meth:`poll` afterwards."""
        ...

    def breach(self) -> str | None:
        """Name of the limit the tree breached (``"memory"``, ``"processes"``, ``"cpu_seconds"``,
        ``"file_size"``), if the backend can tell, else ``None``. Cheap; polled by the kernel."""
        ...

    def kill(self) -> None:
        """End the whole tree now (SIGKILL to every process in it). Idempotent."""
        ...

    def cleanup(self) -> None:
        """Release host resources (cgroups, temp dirs) after the tree has ended."""
        ...


class Backend(Protocol):
    name: str

    def agent_ids(self) -> tuple[int, int]:
        """Host (uid, gid) that sandboxed processes run as and that must own anything they are
        meant to write (the private copy an ``exec``'d command works in). Never 0 when the
        kernel runs as root."""
        ...

    def probe(self) -> Availability:
        """Can this backend give every guarantee here? Cheap, cached by the caller."""
        ...

    def start(self, spec: SandboxSpec) -> Sandboxed:
        """Start ``spec.argv`` in a new sandbox. Raises :class:`kernel.errors.SandboxError` when
        the sandbox cannot be built (nothing of the agent has run then)."""
        ...


def spec_summary(spec: SandboxSpec) -> dict[str, Any]:
    """The parts of a spec worth recording (no environment values: they may hold secrets)."""
    d = dataclasses.asdict(spec)
    return {
        "argv": list(spec.argv),
        "workspace_view": str(spec.workspace_view),
        "workspace_writable": spec.workspace_writable,
        "cwd": str(spec.cwd),
        "env_names": sorted(spec.env),
        "scratch_bytes": spec.scratch_bytes,
        "limits": d["limits"],
        "hidden": [str(p) for p in spec.hidden],
        "read_paths": [str(p) for p in spec.read_paths],
    }
