"""The kernel's error family and its exit codes: the only place exit codes are defined.

A *denial* is not an error: it is a recorded answer to the agent (see ``kernel/decide.py``).
These exceptions are for the operator's mistakes (bad input) and for the kernel's own failures,
and each maps to one documented exit code (``docs/cli.md``; a test keeps the two in step).
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit codes of the ``kernel`` command. Documented in docs/cli.md."""

    OK = 0
    """The run completed and passed (agent exited 0), or the command succeeded."""
    RUN_FAILED = 1
    """The run completed but did not pass: the agent exited non-zero."""
    USAGE = 2
    """Bad command line: unknown option, missing argument."""
    POLICY = 3
    """The policy profile could not be loaded: file, key and reason are printed."""
    SANDBOX_UNAVAILABLE = 4
    """The isolation asked for is not available here; nothing ran."""
    INTEGRITY = 5
    """A run folder failed verification: the first thing wrong is printed."""
    INCOMPLETE = 6
    """A run folder is incomplete (never sealed) but intact up to its last record."""
    LIMIT = 7
    """The run was killed because it breached a resource limit (cause recorded)."""
    NOT_FOUND = 8
    """A named file, folder, run or key does not exist."""
    PROTOCOL = 9
    """The agent broke the syscall protocol and was stopped (error recorded)."""
    KILLED = 10
    """The run was ended from outside (signal, ``kernel kill``)."""
    BAD_INPUT = 11
    """Some other input was invalid (a workspace that is not a directory, a bad --env)."""
    APPROVAL_CLOSED = 12
    """The approval request is no longer pending (already decided or expired); nothing changed."""
    APPROVAL_REFUSED = 13
    """A decision was refused: wrong key, bad signature, signed for another request or run, or
    reused; nothing changed, and a live run records the refusal."""
    BAD_KEY = 14
    """A key or keyring file is malformed, unsafe (readable by others) or already exists."""
    GATE_FAILED = 20
    """The run completed but its gate failed (the gate report names each failed rule)."""
    REPLAY_DIVERGED = 21
    """Replay re-derived a different decision, effect or final tree (first divergence shown)."""
    INTERNAL = 70
    """A bug or an unexpected host failure in the kernel itself; the message says where."""


class KernelError(Exception):
    """Base of every error the CLI turns into a message and an exit code."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def diagnostics(self) -> str:
        """One clear message: what went wrong, where, and what to do."""
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class UsageError(KernelError):
    exit_code = ExitCode.USAGE


class PolicyError(KernelError):
    """A profile with an unknown key, a bad value or bad TOML: names file, key and why."""

    exit_code = ExitCode.POLICY

    def __init__(self, file: str, key: str, why: str, *, hint: str | None = None) -> None:
        where = f"{file}: {key}" if key else file
        super().__init__(f"policy error: {where}: {why}", hint=hint)
        self.file = file
        self.key = key
        self.why = why


class SandboxError(KernelError):
    """The requested isolation is not available: fail closed, nothing ran."""

    exit_code = ExitCode.SANDBOX_UNAVAILABLE


class ProtocolError(KernelError):
    """A malformed, oversized or truncated frame on the syscall channel."""

    exit_code = ExitCode.PROTOCOL


class RunIntegrityError(KernelError):
    """A run folder is corrupt: broken chain, bad digest, bad signature."""

    exit_code = ExitCode.INTEGRITY


class RunIncompleteError(KernelError):
    """A run folder was never sealed but is intact up to its last durable record."""

    exit_code = ExitCode.INCOMPLETE


class NotFoundError(KernelError):
    exit_code = ExitCode.NOT_FOUND


class BadInputError(KernelError):
    exit_code = ExitCode.BAD_INPUT


class BadKeyError(KernelError):
    """A reviewer key or keyring that cannot be used."""

    exit_code = ExitCode.BAD_KEY


class ApprovalError(KernelError):
    """Base of the approval errors (STYLE: unknown id, already decided, bad signature)."""

    exit_code = ExitCode.APPROVAL_REFUSED


class ApprovalClosedError(ApprovalError):
    exit_code = ExitCode.APPROVAL_CLOSED


class ApprovalRefusedError(ApprovalError):
    exit_code = ExitCode.APPROVAL_REFUSED
