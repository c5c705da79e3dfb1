"""Per-run state shared by the supervisor and the syscall handlers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernel.decide import Usage
from kernel.policy import Policy

if TYPE_CHECKING:
    from kernel.paths import Workspace
    from kernel.recorder import RunRecorder
    from sandbox.base import Backend


@dataclass
class Ledger:
    """The quota ledger of one run. Only the supervisor and handlers debit it, after effects."""

    usage: Usage = field(default_factory=Usage)

    def debit(self, **amounts: int) -> None:
        cur = dataclasses.asdict(self.usage)
        for k, v in amounts.items():
            cur[k] += v
        self.usage = Usage(**cur)


@dataclass
class RunContext:
    run_id: str
    policy: Policy
    workspace: Path
    """Real, absolute host path of the workspace root."""
    view_root: str
    """The workspace root as sandboxed processes see it."""
    ws: Workspace
    recorder: RunRecorder
    backend: Backend
    agent_env: dict[str, str]
    """Environment for sandboxed processes (no KERNEL_SYSCALL_FD: commands get no channel)."""
    hidden_rel: tuple[str, ...]
    """Workspace-relative paths that are invisible and untouchable (runs dir, key dir)."""
    hidden_abs: tuple[Path, ...]
    read_paths: tuple[Path, ...]
    scratch_dir: Path
    """Kernel-private host directory for exec copies; never visible to the agent."""
    ledger: Ledger = field(default_factory=Ledger)
    approvals: Any = None
    """The run's ``kernel.approval_gate.Gate`` (None: protected actions cannot be approved)."""
    request_seq: int = -1
    """Seq of the ``syscall.request`` record being served (bound into approvals)."""
    justification: str = ""
    """The agent's ``justification`` for the request being served (shown to reviewers)."""
