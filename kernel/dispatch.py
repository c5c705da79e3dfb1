"""One decision per request, recorded before the effect; the effect only with a Grant.

The shared path of every workspace change, whether the agent asked for it (``write``) or an
``exec``'d command made it in its private copy (a *captured* change):

    prepare (validate, normalize, facts by fd)  ->  check (pure)  ->  record decision (durable)
        ->  perform (needs a Grant)  ->  record result (durable)  ->  answer

A denial is an answer, not an exception. A perform-time failure (ENOENT, EEXIST...) is a
recorded result of an allowed request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kernel import approval_gate, evidence
from kernel.context import RunContext
from kernel.decide import Decision, WriteRequest, check_write, grant
from syscalls import abi
from syscalls import write as write_sys


@dataclass
class Outcome:
    decision: Decision | None
    result: dict[str, Any] | None = None
    error: tuple[int, str, str | None, str] | None = None
    """``(errno, reason, rule, decision)`` when the agent gets an error."""
    seq: int | None = None
    """Sequence number of the deciding (or result) record."""


def record_decision(ctx: RunContext, decision: Decision, *, req: int | None,
                    request_digest: str, now_ns: int, extra: dict[str, Any] | None = None
                    ) -> int:
    body: dict[str, Any] = {
        "req": req, "request_digest": request_digest, **decision.as_record(),
        "policy_digest": ctx.policy.digest, "now_ns": now_ns,
    }
    if extra:
        body.update(extra)
    return ctx.recorder.append("syscall.decision", body)


def _tseq(ctx: RunContext) -> dict[str, int]:
    """``{"tseq": N}`` in an agent tree, else nothing.

    All agents of a tree change one workspace; the tree's one counter orders their changes, so a
    replay of the tree can re-apply every folder's writes in the order they happened. A failed
    write carries it too: whether it failed depended on the tree's state at that moment."""
    return {"tseq": ctx.tree_clock()} if ctx.tree_clock is not None else {}


def apply_write(ctx: RunContext, prepared: tuple[WriteRequest, bytes] | Decision, *,
                req: int | None, request_digest: str, now_ns: int,
                extra: dict[str, Any] | None = None) -> Outcome:
    """Decide, record and (if allowed) perform one prepared write."""
    dextra = dict(extra or {})
    if isinstance(prepared, Decision):
        decision, request, content = prepared, None, b""
    else:
        request, content = prepared
        usage = ctx.ledger.usage
        decision = check_write(request, ctx.policy, usage, now_ns)
        dextra["facts"] = evidence.write_facts(request, usage)  # what replay re-decides from
    dseq = record_decision(ctx, decision, req=req, request_digest=request_digest,
                           now_ns=now_ns, extra=dextra)
    if decision.pending and request is not None:
        pending_request = request
        decision, dseq = approval_gate.settle(
            ctx, decision, pending_seq=dseq, req=req, request_digest=request_digest,
            action=approval_gate.write_action(request, content),
            preview=approval_gate.write_preview(ctx, request, content),
            recheck=lambda outcome, now: check_write(pending_request, ctx.policy,
                                                     ctx.ledger.usage, now, outcome),
            extra={**(extra or {}),
                   "facts": evidence.write_facts(request, ctx.ledger.usage)})
    if not decision.allowed or request is None:
        return Outcome(decision, error=(decision.errno, decision.reason, decision.rule,
                                        approval_gate.answer(decision)), seq=dseq)
    try:
        result = write_sys.perform(grant(decision, request), ctx.ws, content)
    except OSError as e:
        reason = f"{request.target.rel}: {e.strerror or e}"
        rseq = ctx.recorder.append("syscall.result", {
            "req": req, "request_digest": request_digest, "ok": False,
            "errno": e.errno or 0, "reason": reason, **(extra or {}), **_tseq(ctx)})
        return Outcome(decision, error=(e.errno or 0, reason, decision.rule, abi.ALLOWED),
                       seq=rseq)
    ctx.ledger.debit(bytes_written=request.payload_bytes, files_written=1)
    rseq = ctx.recorder.append("syscall.result", {
        "req": req, "request_digest": request_digest, "ok": True, "result": result,
        **(extra or {}), **_tseq(ctx)})
    return Outcome(decision, result=result, seq=rseq)


def handle_write(ctx: RunContext, args: dict[str, Any], *, now_ns: int, request_digest: str,
                 req: int) -> Outcome:
    """The ``write`` syscall."""
    prepared = write_sys.prepare(args, ctx.ws, ctx.policy)
    return apply_write(ctx, prepared, req=req, request_digest=request_digest, now_ns=now_ns)
