"""Per-run state shared by the supervisor and the syscall handlers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernel.decide import Usage
from kernel.policy import Policy

if TYPE_CHECKING:
    from collections.abc import Callable

    from kernel.paths import Workspace
    from kernel.recorder import RunRecorder
    from kernel.replication import TreeLedger
    from sandbox.base import Backend


_USAGE_FIELDS = tuple(f.name for f in dataclasses.fields(Usage))


@dataclass
class Ledger:
    """The quota ledger of one run. Only the supervisor and handlers debit it, after effects.

    In an agent tree (``spawn``) the ledger is a view on the tree's one ledger: every debit is
    also debited from every ancestor, and :attr:`usage` is what the policy's quota checks must
    see so that they allow exactly the agent's remainder (the least room left on its chain)."""

    own: Usage = field(default_factory=Usage)
    """What this agent itself spent."""
    tree: TreeLedger | None = None
    node: str = ""
    quotas: Any = None
    """The policy's quotas (the checks compare usage against these)."""

    @property
    def usage(self) -> Usage:
        if self.tree is None:
            return self.own
        return self.tree.effective_usage(self.node, self.quotas)

    def debit(self, **amounts: int) -> None:
        cur = {name: getattr(self.own, name) for name in _USAGE_FIELDS}  # asdict, no deep copy
        for k, v in amounts.items():
            cur[k] += v
        self.own = Usage(**cur)
        if self.tree is not None:
            self.tree.debit(self.node, **amounts)


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
    tree_clock: Callable[[], int] | None = None
    """The agent tree's one counter of workspace changes (``tseq``): results that changed the
    shared workspace carry the next value, so a replay can interleave the agents' changes in the
    order they happened."""
    lineage: dict[str, Any] | None = None
    """For a spawned child: ``{"parent", "root", "depth"}`` (None for the root agent)."""
    spawn_status: Callable[[], dict[str, Any]] | None = None
    """The ``spawn`` part of the ``info`` answer (lineage, contract, what is left)."""
