"""The ``info`` call: the run id, a policy summary and the remaining quotas. Non-mutating.

Why this is safe: it reads only the run's own policy and ledger, takes no arguments, changes
nothing, and is recorded (and counted against the syscall quota) like every other request.
"""

from __future__ import annotations

from typing import Any

from kernel.context import RunContext
from kernel.decide import ALLOWED, Decision, deny
from kernel.dispatch import Outcome, record_decision
from syscalls import abi


def handle(ctx: RunContext, args: dict[str, Any], *, now_ns: int, request_digest: str,
           req: int) -> Outcome:
    if args:
        decision = deny("request.invalid", f"info takes no arguments, got {sorted(args)}", 22)
    else:
        decision = Decision(ALLOWED, "info", "allowed")
    seq = record_decision(ctx, decision, req=req, request_digest=request_digest, now_ns=now_ns)
    if not decision.allowed:
        return Outcome(decision, error=(decision.errno, decision.reason, decision.rule,
                                        abi.DENIED), seq=seq)
    p = ctx.policy
    u = ctx.ledger.usage
    quotas = {}
    for name in ("syscalls", "bytes_written", "files_written", "exec_count"):
        limit = getattr(p.quotas, name)
        used = getattr(u, name)
        quotas[name] = {"limit": limit, "used": used, "remaining": max(limit - used, 0)}
    result = {
        "run_id": ctx.run_id,
        "workspace": ctx.view_root,
        "isolation": ctx.backend.name,
        "policy": {"name": p.name, "digest": p.digest, "description": p.description.strip()},
        "quotas": quotas,
        "commands": [c.id for c in p.commands],
        "protected": [{"glob": r.glob, "action": r.action} for r in p.protected],
    }
    if ctx.spawn_status is not None:
        result["spawn"] = ctx.spawn_status()
    return Outcome(decision, result=result, seq=seq)
