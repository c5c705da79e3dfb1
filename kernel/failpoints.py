"""Test-only crash injection: ``KERNEL_FAILPOINT=name:count`` SIGKILLs the kernel at a point.

The crash tests need to stop the kernel *exactly* around each durable step (before a log line is
written, between its write and its fdatasync, between a workspace temp file and its rename...).
Each such step calls :func:`hit` with a fixed name. When the environment variable
``KERNEL_FAILPOINT`` is unset (always, outside tests) ``hit`` is one global lookup and returns.
When it is ``name:count``, the ``count``-th time (1-based) the point ``name`` is reached the
process sends itself SIGKILL: no handler, no clean-up, like a power cut for the process.

The variable is read once, when this module is imported. It is not a policy input and never
reaches the agent (the sandbox environment is built from the policy, not from the kernel's).
Names of the points: :data:`POINTS` (documented in docs/runs-format.md, §10).
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "log.before_write",   # an event is about to be appended
    "log.after_write",    # the line is written but not yet fdatasync'd
    "log.after_sync",     # the line is durable; append has not returned yet
    "ws.tmp_written",     # a temp file is complete (fsync'd unless log-durable), not renamed
    "ws.renamed",         # renamed over the target, the directory not yet fsync'd
    "ws.log_durable_applied",  # a log-durable write is in place, unsynced; no result line yet
    "ws.checkpoint.synced",  # the workspace's file system is synced; workspace.synced not yet
    "answer.before_send", # the records are durable; the answer is not yet sent
    "exec.copied",        # an exec's private copy is made and scanned; the command has not run
    "exec.captured",      # the command has ended and its copy is scanned; nothing applied yet
    "approval.requested", # approval.requested is durable; the mailbox row is not yet written
    "approval.received",  # a valid signature is recorded; the final decision is not yet
    "seal.before_publish",  # run.end is durable and the log closed; SEAL.json not yet written
    "seal.published",     # SEAL.json is durable; the folder is not yet made read-only
    "spawn.decided",      # an allowed spawn decision is durable; no child folder yet
    "spawn.child_created",  # the child's folder exists; its sandbox is not started
    "spawn.started",      # the child runs; its parent is not yet answered
    "spawn.exit.before",  # the child is sealed; the parent's spawn.exit is not yet recorded
)

_NAME: str | None = None
_COUNT = 0
_seen = 0


def _parse(spec: str | None) -> None:
    global _NAME, _COUNT, _seen
    _NAME, _COUNT, _seen = None, 0, 0
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name not in POINTS:
        raise SystemExit(f"KERNEL_FAILPOINT: unknown point {name!r} (known: {', '.join(POINTS)})")
    try:
        n = int(count or "1")
    except ValueError:
        raise SystemExit(f"KERNEL_FAILPOINT: count {count!r} is not an integer") from None
    _NAME, _COUNT = name, max(n, 1)


_parse(os.environ.get("KERNEL_FAILPOINT"))


def hit(name: str) -> None:
    """Die here if this is the configured point and its count is reached (tests only)."""
    global _seen
    if _NAME is None or name != _NAME:
        return
    _seen += 1
    if _seen >= _COUNT:
        os.kill(os.getpid(), signal.SIGKILL)
