"""The kernel's side of approvals: a pending request waits here for signed reviewer decisions.

Order of one wait (every step recorded in the run folder before the next):

1. ``syscall.decision`` ``pending`` (recorded by the caller), then ``approval.requested``: the
   binding a reviewer signs (run, request seq and digest, action digest, policy digest, a fresh
   128-bit nonce, issue time and expiry), the eligible reviewer keys and the threshold.
2. The request is queued in the control plane (``kernel approvals`` lists it) and, in prompt
   mode, shown on the operator's terminal.
3. Until a decision or the expiry, the kernel keeps relaying the agent's output and enforcing its
   limits (``pump``), and reads new signatures from the control plane. Each one is checked with
   :func:`kernel.approvals.check_envelope` and recorded with its envelope as a blob:
   ``approval.received`` (accepted) or ``approval.rejected`` (with the reason).
4. The outcome (``approved`` once k distinct eligible keys approved, ``denied`` on the first
   accepted denial, ``expired`` at the timeout) goes back to the pure decision function, and the
   final ``syscall.decision`` (``approved``, ``denied`` or ``expired``) is recorded with the seqs
   of the approvals it rests on. Only then can the effect run.

The database is only the mailbox: the kernel trusts nothing in a row but the signature it checks.
Reviewer private keys never enter this process; prompt mode signs through a ``kernel approve``
child process run as the operator.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import select
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kernel import failpoints
from kernel.approvals import Operator, Tally, check_envelope, eligible_map, resolve
from kernel.canonical import canonical_json, digest_of
from kernel.controlplane import ControlPlane
from kernel.decide import (
    DENIED,
    EXPIRED,
    ApprovalOutcome,
    Decision,
    ExecRequest,
    WriteRequest,
    deny,
)

MODES = ("prompt", "queue", "deny")
PREVIEW_MAX = 256 * 1024
"""Bytes of current and proposed content kept for the reviewer's diff."""
POLL_S = 0.02


@dataclass
class Gate:
    """Per-run approval state, installed in ``RunContext.approvals`` by the supervisor."""

    mode: str
    operator: Operator
    runs_dir: Path
    home: Path
    pump: Callable[[float], None]
    """Relay the agent's output for up to N seconds and raise if a limit is breached."""
    cp: ControlPlane | None = None
    cp_error: str | None = None
    tty_in: IO[str] | None = None
    tty_out: IO[str] | None = None
    approve_key: Path | None = None
    lineage: dict[str, Any] = field(default_factory=dict)
    nonces: set[str] = field(default_factory=set)
    seen: set[int] = field(default_factory=set)
    """Ids of the signature rows already recorded in the run folder."""


def write_action(req: WriteRequest, content: bytes) -> dict[str, Any]:
    has_content = req.op in ("write", "create", "append")
    return {"kind": "write", "op": req.op, "path": req.target.rel,
            "dest": req.dest.rel if req.dest is not None else None, "mode": req.mode,
            "content": digest_of_bytes(content) if has_content else None,
            "size": len(content) if has_content else None, "captured": req.captured}


def exec_action(req: ExecRequest, stdin: bytes) -> dict[str, Any]:
    return {"kind": "exec", "argv": list(req.argv), "program": req.resolved,
            "cwd": req.cwd.rel, "stdin": digest_of_bytes(stdin), "stdin_size": len(stdin)}


def digest_of_bytes(b: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(b).hexdigest()


def _b64(b: bytes | None) -> str | None:
    return None if b is None else base64.b64encode(b).decode()


def write_preview(ctx: Any, req: WriteRequest, content: bytes) -> dict[str, Any]:
    current: bytes | None = None
    if req.target.kind == "file":
        try:
            current = ctx.ws.read_file(req.target.rel, PREVIEW_MAX)
        except OSError:
            current = None
    proposed = content if req.op in ("write", "create", "append") else None
    if req.op == "append" and current is not None:
        proposed = current + content
    return {"current_b64": _b64(current),
            "proposed_b64": _b64(proposed) if proposed is not None and
            len(proposed) <= PREVIEW_MAX else None,
            "proposed_too_large": proposed is not None and len(proposed) > PREVIEW_MAX,
            "current_exists": req.target.exists, "current_kind": req.target.kind}


def exec_preview(ctx: Any, req: ExecRequest) -> dict[str, Any]:
    return {"argv": list(req.argv), "program": req.resolved, "cwd": req.cwd.rel or ".",
            "env_names": sorted(ctx.agent_env)}


def _record_final(ctx: Any, final: Decision, *, req: int | None, request_digest: str,
                  now_ns: int, extra: dict[str, Any]) -> int:
    body: dict[str, Any] = {"req": req, "request_digest": request_digest, **final.as_record(),
                            "policy_digest": ctx.policy.digest, "now_ns": now_ns, **extra}
    return int(ctx.recorder.append("syscall.decision", body))


def settle(ctx: Any, pending: Decision, *, pending_seq: int, req: int | None,
           request_digest: str, action: dict[str, Any], preview: dict[str, Any],
           recheck: Callable[[ApprovalOutcome, int], Decision],
           extra: dict[str, Any] | None = None) -> tuple[Decision, int]:
    """Wait for the reviewers of one pending request; record and return the final decision."""
    gate: Gate | None = getattr(ctx, "approvals", None)
    assert pending.need is not None
    extra = dict(extra or {})
    if gate is None:
        final = deny(pending.rule, "needs approval, but this kernel has no approval channel")
        now = time.time_ns()
        return final, _record_final(ctx, final, req=req, request_digest=request_digest,
                                    now_ns=now, extra={**extra, "pending_seq": pending_seq})
    outcome, approval_id = _wait(ctx, gate, pending, pending_seq=pending_seq,
                                 request_digest=request_digest, action=action, preview=preview)
    now = time.time_ns()
    final = recheck(outcome, now)
    seq = _record_final(ctx, final, req=req, request_digest=request_digest, now_ns=now, extra={
        **extra, "pending_seq": pending_seq, "approval_id": approval_id,
        "approval_outcome": outcome.outcome, "approvals": list(outcome.approvals)})
    if gate.cp is not None:
        state = {"approved": "approved" if final.allowed else "denied"}.get(
            outcome.outcome, outcome.outcome)
        try:
            gate.cp.finish(approval_id, state, final.reason, now)
        except Exception as e:  # the folder holds the decision; the index is repaired later
            gate.cp_error = f"{type(e).__name__}: {e}"
    return final, seq


def _wait(ctx: Any, gate: Gate, pending: Decision, *, pending_seq: int, request_digest: str,
          action: dict[str, Any], preview: dict[str, Any]) -> tuple[ApprovalOutcome, str]:
    need = pending.need
    assert need is not None
    rec = ctx.recorder
    issued = time.time_ns()
    nonce = secrets.token_hex(16)
    while nonce in gate.nonces:  # pragma: no cover - 128 random bits
        nonce = secrets.token_hex(16)
    gate.nonces.add(nonce)
    approval_seq = rec.events()
    approval_id = f"{ctx.run_id}.{approval_seq}"
    binding = {"approval_id": approval_id, "run_id": ctx.run_id,
               "request_seq": getattr(ctx, "request_seq", -1), "approval_seq": approval_seq,
               "request_digest": request_digest, "action_digest": digest_of(action),
               "policy_digest": ctx.policy.digest, "nonce": nonce, "issued_ns": issued,
               "expires_ns": issued + need.timeout_seconds * 1_000_000_000}
    preview_blob = rec.put_blob(canonical_json(preview))
    seq = rec.append("approval.requested", {
        "binding": binding, "rule": pending.rule, "pending_seq": pending_seq, "action": action,
        **need.as_record(), "operator": gate.operator.as_record(), "mode": gate.mode,
        "preview_blob": preview_blob})
    assert seq == approval_seq, "the recorder is used by one thread only"
    failpoints.hit("approval.requested")
    if gate.cp is not None:
        u = ctx.ledger.usage
        q = ctx.policy.quotas
        usage = {n: {"limit": getattr(q, n), "used": getattr(u, n)}
                 for n in ("syscalls", "bytes_written", "files_written", "exec_count")}
        try:
            gate.cp.add_approval({
                "id": approval_id, "run_id": ctx.run_id, "request_seq": binding["request_seq"],
                "approval_seq": approval_seq, "kind": action["kind"],
                "summary": _summary(action), "rule": pending.rule,
                "rule_reason": pending.reason,
                "justification": getattr(ctx, "justification", "") or "",
                "binding": json.dumps(binding), "eligible": json.dumps(
                    need.as_record()["eligible"]), "threshold": need.threshold,
                "operator_uid": gate.operator.uid,
                "operator_may_approve": int(need.operator_may_approve),
                "preview": json.dumps({"action": action, **preview}), "usage": json.dumps(usage),
                "lineage": json.dumps(gate.lineage), "state": "pending", "outcome": "",
                "created_ns": issued, "expires_ns": binding["expires_ns"], "decided_ns": 0})
        except Exception as e:
            gate.cp_error = f"{type(e).__name__}: {e}"
    if gate.mode == "deny":
        return _closed(ctx, approval_id, "denied",
                       "kernel exec --approve deny: protected actions are refused"), approval_id
    if gate.cp is None or gate.cp_error:
        if gate.mode != "prompt":
            why = gate.cp_error or "no control plane"
            return _closed(ctx, approval_id, "denied",
                           f"the control plane is unavailable ({why}); nobody can approve"
                           ), approval_id
    tally = Tally(need.threshold)
    eligible = eligible_map(need.as_record()["eligible"])  # type: ignore[arg-type]
    last_id = 0
    asked = False
    try:
        while True:
            if gate.mode == "prompt" and not asked:
                asked = True
                _show_prompt(gate, approval_id, pending, action, preview)
            if gate.cp is not None and not gate.cp_error:
                try:
                    rows = gate.cp.signatures_after(approval_id, last_id)
                except Exception as e:  # a locked or broken DB: keep waiting, say so once
                    rows = []
                    rec.append("controlplane.error", {"approval_id": approval_id,
                                                      "error": f"{type(e).__name__}: {e}"})
                    gate.cp_error = str(e)
                for row in rows:
                    last_id = max(last_id, int(row["id"]))
                    gate.seen.add(int(row["id"]))
                    done = _take(ctx, gate, tally, row, binding, eligible, need)
                    if done is not None:
                        return done, approval_id
            if time.time_ns() > binding["expires_ns"]:
                rec.append("approval.expired", {"approval_id": approval_id,
                                                "expires_ns": binding["expires_ns"],
                                                "now_ns": time.time_ns()})
                return ApprovalOutcome(EXPIRED, f"expired after {need.timeout_seconds} s"), \
                    approval_id
            if gate.mode == "prompt" and gate.tty_in is not None:
                answer = _read_answer(gate)
                if answer == "n":
                    return _closed(ctx, approval_id, DENIED,
                                   "denied by the operator at the kernel exec prompt",
                                   prompt=True), approval_id
                if answer == "y":
                    _sign_at_prompt(gate, approval_id)
                    continue
            gate.pump(POLL_S)
    except BaseException as e:
        if not isinstance(e, Exception) or type(e).__name__ == "_Stop":
            rec.append("approval.cancelled", {"approval_id": approval_id,
                                              "reason": str(e) or type(e).__name__})
            if gate.cp is not None:
                try:
                    gate.cp.finish(approval_id, "cancelled", str(e), time.time_ns())
                except Exception:  # noqa: S110 - the folder holds the truth
                    pass
        raise


def _closed(ctx: Any, approval_id: str, outcome: str, reason: str, *, prompt: bool = False
            ) -> ApprovalOutcome:
    seq = ctx.recorder.append("approval.closed", {"approval_id": approval_id,
                                                  "outcome": outcome, "reason": reason,
                                                  "by": "prompt" if prompt else "kernel",
                                                  "now_ns": time.time_ns()})
    return ApprovalOutcome(outcome, reason, (seq,))


def _take(ctx: Any, gate: Gate, tally: Tally, row: dict[str, Any], binding: dict[str, Any],
          eligible: dict[str, str], need: Any) -> ApprovalOutcome | None:
    """Check and record one signature row; the outcome once the request is decided."""
    raw = row.get("envelope") or ""
    now = time.time_ns()
    try:
        env = json.loads(raw)
        blob = ctx.recorder.put_blob(canonical_json(env))
    except (ValueError, TypeError):
        env = None
        blob = ctx.recorder.put_blob(str(raw).encode("utf-8", "replace"))
    c = check_envelope(env, binding, eligible, gate.operator, need.operator_may_approve, now)
    if c.ok and tally.duplicate(c.public_key):
        c = type(c)(False, "this key has already decided this request (reuse)", c.public_key,
                    c.reviewer)
    base = {"approval_id": binding["approval_id"], "envelope_blob": blob, "now_ns": now,
            "submitted_uid": row.get("submitted_uid"), "public_key": c.public_key}
    if not c.ok:
        ctx.recorder.append("approval.rejected", {**base, "reason": c.reason})
        return None
    seq = ctx.recorder.append("approval.received", {**base, "reviewer": c.reviewer,
                                                    "decision": c.decision, "reason": c.note})
    tally.add(c, seq)
    failpoints.hit("approval.received")
    got = resolve(tally)
    if got is None:
        return None
    outcome, reason, seqs = got
    return ApprovalOutcome(outcome, reason, seqs)


def _summary(action: dict[str, Any]) -> str:
    if action["kind"] == "exec":
        return "exec " + " ".join(action["argv"])[:200]
    s = f"{action['op']} {action['path']}"
    if action.get("dest"):
        s += f" -> {action['dest']}"
    return s


def render_preview(row_like: dict[str, Any], *, color: bool = False) -> str:
    """What a reviewer sees: the unified diff, or the command; shared by prompt and CLI."""
    import difflib

    p = row_like["preview"]
    action = p["action"]
    out: list[str] = []
    if action["kind"] == "exec":
        out.append(f"  argv:    {json.dumps(p['argv'])}")
        out.append(f"  program: {p['program']}")
        out.append(f"  cwd:     {p['cwd']}")
        out.append(f"  env:     {', '.join(p['env_names'])}")
        out.append(f"  stdin:   {action['stdin_size']} bytes ({action['stdin']})")
        return "\n".join(out)
    out.append(f"  {action['op']} {action['path']}"
               + (f" -> {action['dest']}" if action.get("dest") else "")
               + (f" mode {action['mode']:o}" if isinstance(action.get("mode"), int) else ""))
    if action["op"] not in ("write", "create", "append"):
        return "\n".join(out)
    if p.get("proposed_too_large"):
        out.append(f"  (proposed content of {action['size']} bytes is too large to show; "
                   f"digest {action['content']})")
        return "\n".join(out)
    cur = base64.b64decode(p["current_b64"]) if p.get("current_b64") else b""
    new = base64.b64decode(p["proposed_b64"] or "")
    if action["op"] != "append" and digest_of_bytes(new) != action["content"]:
        out.append("  (the stored preview does not match the signed content digest)")
        return "\n".join(out)
    a = cur.decode("utf-8", "replace").splitlines(keepends=True)
    b = new.decode("utf-8", "replace").splitlines(keepends=True)
    name = action["path"]
    diff = difflib.unified_diff(a, b, f"a/{name}" if p.get("current_exists") else "/dev/null",
                                f"b/{name}")
    text = "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
                   for line in diff)
    out.append(text.rstrip("\n") if text else "  (no change in content)")
    return "\n".join(out)


def _show_prompt(gate: Gate, approval_id: str, pending: Decision, action: dict[str, Any],
                 preview: dict[str, Any]) -> None:
    if gate.tty_out is None:
        return
    text = render_preview({"preview": {"action": action, **preview}})
    gate.tty_out.write(
        f"\nkernel: approval needed ({approval_id})\n  rule: {pending.rule}\n"
        f"  why:  {pending.reason}\n{text}\nkernel: approve? [y/n] ")
    gate.tty_out.flush()


def _read_answer(gate: Gate) -> str | None:
    assert gate.tty_in is not None
    try:
        ready, _, _ = select.select([gate.tty_in], [], [], 0)
    except (OSError, ValueError):
        return None
    if not ready:
        return None
    line = gate.tty_in.readline()
    if line == "":
        gate.tty_in = None  # EOF: keep waiting for the queue
        return None
    ans = line.strip().lower()
    if ans in ("y", "yes"):
        return "y"
    if ans in ("n", "no"):
        return "n"
    if gate.tty_out is not None:
        gate.tty_out.write("kernel: answer y or n: ")
        gate.tty_out.flush()
    return None


def _sign_at_prompt(gate: Gate, approval_id: str) -> None:
    """Sign as the operator, in a child ``kernel approve`` (the key never enters the kernel)."""
    cmd = [sys.executable, "-m", "kernel._cli", "approve", approval_id, "--runs-dir",
           str(gate.runs_dir), "--reason", "approved at the kernel exec prompt"]
    if gate.approve_key is not None:
        cmd += ["--key", str(gate.approve_key)]
    env = dict(os.environ)
    env["KERNEL_HOME"] = str(gate.home)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60,
                       stdin=subprocess.DEVNULL)
    if gate.tty_out is not None:
        msg = (r.stdout + r.stderr).strip()
        gate.tty_out.write(f"{msg}\n")
        if r.returncode != 0:
            gate.tty_out.write("kernel: still waiting (a reviewer can decide with "
                               f"`kernel approve {approval_id}`); approve? [y/n] ")
        gate.tty_out.flush()


# ---- run set-up and tear-down (called by the supervisor) ----------------------------------------

def load_keyring(policy: Any, home: Path) -> Any:
    """The policy with its keyring's reviewers (``approvals.keyring``); a malformed keyring is a
    :class:`kernel.errors.BadKeyError` before anything runs. A missing file adds no reviewer."""
    import dataclasses

    from kernel.reviewers import keyring_path, parse_keyring

    spec = policy.approvals.keyring
    if not spec:
        return policy
    path = keyring_path(spec, policy.source, home)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return policy
    except OSError as e:
        from kernel.errors import BadKeyError

        raise BadKeyError(f"keyring {path}: cannot be read: {e.strerror}") from None
    return dataclasses.replace(policy, keyring_reviewers=parse_keyring(data, str(path)),
                               keyring_source=str(path), keyring_raw=data)


def open_gate(ctx: Any, pump: Callable[[float], None], *, runs_dir: Path, home: Path,
              mode: str, approve_key: Path | None, tty_in: IO[str] | None,
              tty_out: IO[str] | None) -> Gate:
    """Record the trusted reviewers, open the control plane, index the run, install the gate."""
    from kernel.reviewers import own_public_keys

    p = ctx.policy
    keyring_blob = ctx.recorder.put_blob(p.keyring_raw) if p.keyring_raw is not None else None
    operator = Operator(os.getuid(), own_public_keys(home))
    ctx.recorder.append("approval.setup", {
        "mode": mode, "keyring": p.approvals.keyring, "keyring_source": p.keyring_source,
        "keyring_blob": keyring_blob,
        "reviewers": [{"name": r.name, "public_key": r.public_key}
                      for r in p.trusted_reviewers()],
        "operator": operator.as_record()})
    gate = Gate(mode=mode, operator=operator, runs_dir=runs_dir, home=home, pump=pump,
                tty_in=tty_in, tty_out=tty_out, approve_key=approve_key)
    tree = tree_columns(ctx)
    gate.lineage = {"run_id": ctx.run_id, "parent": tree["parent"], "root": tree["root"],
                    "depth": tree["depth"], "workspace": str(ctx.workspace), "policy": p.name,
                    "policy_digest": p.digest, "operator_uid": operator.uid,
                    "operator": operator.as_record()}
    try:
        gate.cp = ControlPlane.open(runs_dir, create=True)
        hdr = json.loads((ctx.recorder.run_dir / "run.json").read_bytes())
        gate.cp.upsert_run({
            "run_id": ctx.run_id, "run_dir": str(ctx.recorder.run_dir),
            "workspace": str(ctx.workspace), "policy_name": p.name,
            "policy_digest": p.digest, "argv": json.dumps(hdr.get("argv", [])),
            "operator_uid": operator.uid, "isolation": ctx.backend.name,
            "kernel_pid": os.getpid(), "status": "running", "exit_code": None,
            "requests": 0, "denials": 0, "started": hdr.get("created", ""), "ended": "",
            "seal": "", "final_tree_digest": "", **tree})
    except Exception as e:  # the run goes on; nothing can be approved through the queue
        gate.cp_error = f"{type(e).__name__}: {e}"
        ctx.recorder.append("controlplane.error", {"error": gate.cp_error})
    ctx.approvals = gate
    return gate


def tree_columns(ctx: Any) -> dict[str, Any]:
    """The run's place in its agent tree, as the runs index stores it (``ctx.lineage``)."""
    lin = getattr(ctx, "lineage", None)
    if not lin:
        return {"parent": None, "root": ctx.run_id, "depth": 0}
    return {"parent": lin["parent"], "root": lin["root"], "depth": lin["depth"]}


def close_gate(ctx: Any, status: str, code: int | None, summary: dict[str, Any],
               seal: str) -> None:
    """Update the run's index row once it is sealed (best effort: reconcile repairs it)."""
    gate: Gate | None = getattr(ctx, "approvals", None)
    if gate is None or gate.cp is None:
        return
    try:
        from kernel.recorder import utc_timestamp

        gate.cp.upsert_run({"run_id": ctx.run_id, "status": status, "exit_code": code,
                            "requests": summary.get("requests", 0),
                            "denials": summary.get("denials", 0), "ended": utc_timestamp(),
                            "seal": seal,
                            "final_tree_digest": summary.get("final_tree_digest", ""),
                            **tree_columns(ctx)})
        gate.cp.close()
    except Exception:  # noqa: S110 - the folder is the record; `kernel reconcile` repairs
        pass


def answer(decision: Decision) -> str:
    """The ``decision`` value the agent is told for a refused request: ``denied``, or
    ``expired`` when no reviewer decided in time."""
    return EXPIRED if decision.decision == EXPIRED else DENIED


def drain_late(ctx: Any) -> None:
    """Before ``run.end``: record attempts that reached the control plane after their request
    was decided (``approval.late``; never counted), so every attempt on a live run is in its
    folder."""
    gate: Gate | None = getattr(ctx, "approvals", None)
    if gate is None or gate.cp is None or gate.cp_error:
        return
    try:
        rows = gate.cp.signatures_of_run(ctx.run_id)
    except Exception as e:  # the folder stays the record; reconcile repairs the index
        ctx.recorder.append("controlplane.error", {"error": f"{type(e).__name__}: {e}"})
        return
    for row in rows:
        if int(row["id"]) in gate.seen:
            continue
        gate.seen.add(int(row["id"]))
        raw = str(row.get("envelope") or "")
        ctx.recorder.append("approval.late", {
            "approval_id": row["approval_id"], "submitted_uid": row.get("submitted_uid"),
            "decision": row.get("decision"), "submitted_ns": row.get("submitted_ns"),
            "envelope_blob": ctx.recorder.put_blob(raw.encode("utf-8", "replace"))
            if raw else None,
            "reason": row.get("note") or "arrived after the request was decided"})

