"""One decision per request, recorded before the effect; the effect only with a Grant.

The shared path of every workspace change, whether the agent asked for it (``write``) or an
``exec``'d command made it in its private copy (a *captured* change):

    prepare (validate, normalize, facts by fd)  ->  check (pure)  ->  record decision (durable)
        ->  perform (needs a Grant)  ->  record result (durable)  ->  answer

A denial is an answer, not an exception. A perform-time failure (ENOENT, EEXIST...) is a
recorded result of an allowed request.

Write-ahead. When the request line holds the content itself (``content_in_log``: an op
``write`` of a lone root agent, see ``docs/runs-format.md``) and the decision is ``allowed``
at once, the decision is recorded with ``"durable": "log"``: its ``fdatasync`` makes the
request, the content and the decision durable, and from then on the write is committed. The
change is then made without syncing the workspace and the result line is left for the next
sync; the agent may be answered at once. ``kernel recover`` re-applies every such write after
the last ``workspace.synced`` checkpoint. Every other change first has the workspace synced
(``checkpoint``), so the writes recovery may have to re-apply are always the last changes.
"""


from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kernel import approval_gate, evidence, failpoints
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
    log_durable: bool = False
    """A write made durable by its decision line: its result line may still be unsynced when
    the agent is answered, and the workspace holds an unsynced change."""


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
                extra: dict[str, Any] | None = None, content_in_log: bool = False,
                checkpoint: Callable[[], None] | None = None) -> Outcome:
    """Decide, record and (if allowed) perform one prepared write.

    ``content_in_log``: the request line holds ``content`` (write-ahead, above).
    ``checkpoint``: syncs earlier log-durable changes; called before any other change."""
    dextra = dict(extra or {})
    fast = False
    if isinstance(prepared, Decision):
        decision, request, content = prepared, None, b""
    else:
        request, content = prepared
        usage = ctx.ledger.usage
        decision = check_write(request, ctx.policy, usage, now_ns)
        dextra["facts"] = evidence.write_facts(request, usage)  # what replay re-decides from
        fast = (content_in_log and decision.allowed and request.op == "write"
                and not request.captured)
        if fast:
            dextra["durable"] = "log"
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
    if not fast and checkpoint is not None:
        checkpoint()
    try:
        result = write_sys.perform(grant(decision, request), ctx.ws, content, durable=not fast)
    except OSError as e:
        reason = f"{request.target.rel}: {e.strerror or e}"
        rseq = ctx.recorder.append("syscall.result", {
            "req": req, "request_digest": request_digest, "ok": False,
            "errno": e.errno or 0, "reason": reason, **(extra or {}), **_tseq(ctx)})
        return Outcome(decision, error=(e.errno or 0, reason, decision.rule, abi.ALLOWED),
                       seq=rseq)
    ctx.ledger.debit(bytes_written=request.payload_bytes, files_written=1)
    if fast:
        failpoints.hit("ws.log_durable_applied")
    # A log-durable write's result line becomes durable with the next sync (the next request's
    # decision, a checkpoint, the seal): the decision line already committed the write.
    rseq = ctx.recorder.append("syscall.result", {
        "req": req, "request_digest": request_digest, "ok": True, "result": result,
        **(extra or {}), **_tseq(ctx)}, sync=not fast)
    return Outcome(decision, result=result, seq=rseq, log_durable=fast)


def handle_write(ctx: RunContext, args: dict[str, Any], *, now_ns: int, request_digest: str,
                 req: int, content_in_log: bool = False,
                 checkpoint: Callable[[], None] | None = None) -> Outcome:
    """The ``write`` syscall."""
    prepared = write_sys.prepare(args, ctx.ws, ctx.policy)
    return apply_write(ctx, prepared, req=req, request_digest=request_digest, now_ns=now_ns,
                       content_in_log=content_in_log, checkpoint=checkpoint)
